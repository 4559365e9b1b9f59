"""STORN: stochastic recurrent networks (chapter 7, Bayer and Osendorfer 2014), predictive mode.

Generative model (7.4-7.7, compact form 7.10):
  z_t ~ N(0, I) i.i.d.                                   (7.7)
  h_t = d_h(x_{t-1}, z_t, h_{t-1})                        (7.4)  [driven: d_h(x_{t-1}, u_t, z_t, h_{t-1})]
  p(x_t | h_t) with decoder d_x(h_t)                      (7.5-7.6)
so p(x, z) = prod_t p(x_t | x_{1:t-1}, z_{1:t}) p(z_t)   (7.10).

Architecture (13.1.3): d_h is a forward LSTM (128) whose input is the concatenation of
MLP(z_t, 32, Tanh, 64, Tanh) and MLP(x_{t-1}, 256, Tanh); d_x = MLP(h_t, 256, Tanh) followed by the
linear output layer.

Conventions the paper leaves open, fixed to the authors' implementation (DVAE-speech), so that
their trained weights map onto these layers by name:

- first step: x_0 = 0 (a zero frame) goes through the x MLP, so the LSTM's first input holds
  MLP(0) = tanh(bias) in its x slots (not a zero feature vector); the LSTM starts from a zero state.
- concatenation order of the LSTM input: [MLP(z_t), MLP(x_{t-1})], then u_t in driven mode.

Architecture options (the authors' config.ini names, defaults of 13.1.3): ``dense_z_h`` (32,64),
``dense_xtm1_h`` (256), ``dim_rnn_h`` / ``num_rnn_h`` (128, 1), ``dense_h_x`` (256); for the guides
``dense_x_g`` (256), ``dim_rnn_g`` / ``num_rnn_g`` (128, 1), ``dense_g_z`` (64,32); ``activation``.

The prior needs no network; once z_{1:T} is known, h_{1:T} is one LSTM call over the whole sequence,
so the model is fully vectorised.  Guides (7.15-7.17 and a structure-consistent variant) are in
guides/storn.py.
"""

from __future__ import annotations

import torch

from ..nn import RNN, shift_right
from .base import DVAE


class STORN(DVAE):
    """STORN: z_t i.i.d., h_t(x_{1:t-1}, z_{1:t}), x_t | h_t."""

    name = "storn"
    predictive = True

    architecture = {"dense_x_g": (256,), "dim_rnn_g": 128, "num_rnn_g": 1, "dense_g_z": (64, 32),
                    "dense_z_h": (32, 64), "dense_xtm1_h": (256,), "dim_rnn_h": 128,
                    "num_rnn_h": 1, "dense_h_x": (256,), "activation": "tanh"}

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0, **architecture):
        super().__init__(x_dim, z_dim, likelihood, u_dim, **architecture)
        self.hidden = self.arch["dim_rnn_h"]
        #: feature extractors of d_h (13.1.3): MLP(z_t, 32, Tanh, 64, Tanh), MLP(x_{t-1}, 256, Tanh)
        self.z_features = self.mlp(z_dim, "dense_z_h")
        self.x_features = self.mlp(x_dim, "dense_xtm1_h")
        #: d_h (7.4): forward LSTM over [z features, x features, (u_t)]
        self.h_rnn = RNN(self.z_features.out_dim + self.x_features.out_dim + u_dim, self.hidden,
                         num_layers=self.arch["num_rnn_h"])
        #: parameterises p(x_t | h_t) (7.5-7.6)
        self.decoder = self.mlp(self.hidden, "dense_h_x")
        self.x_out = self.output_layer(self.decoder.out_dim)

    def states(self, z, x, u=None):
        """h_t = d_h(x_{t-1}, z_t, h_{t-1}) for all t (7.4), (batch, T, hidden)."""
        x_in = self.x_features(shift_right(x))                  # MLP(x_{t-1}), x_0 = 0
        parts = [self.z_features(z), x_in] + ([] if u is None else [u])
        return self.h_rnn(torch.cat(parts, -1))

    def emission(self, z, ctx, x, u):
        # h_t depends on z, so nothing is shared with the guide: computed here, once per model run
        return self.x_out(self.decoder(self.states(z, x, u)))   # (7.5)
