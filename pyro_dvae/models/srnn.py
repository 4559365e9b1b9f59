"""SRNN: stochastic recurrent neural network (chapter 9, Fraccaro et al. 2016), predictive mode.

Generative model (9.1-9.7):
  h_t = d_h(x_{t-1}, h_{t-1})                       (9.1)  [driven mode: d_h(x_{t-1}, u_t, h_{t-1})]
  p(z_t | z_{t-1}, h_t) = N(d_z(z_{t-1}, h_t))       (9.4-9.5)
  p(x_t | z_t, h_t) with d_x(z_t, h_t)               (9.2-9.3)
compact form: p(x, z) = prod_t p(x_t | x_{1:t-1}, z_t) p(z_t | z_{t-1}, x_{1:t-1})  (9.7).

Architecture (13.1.5): d_h is an LSTM (128) with input MLP(x_{t-1}, 256, Tanh);
d_z = MLP([z_{t-1}, h_t], 64, Tanh, 32, Tanh); d_x = MLP([z_t, h_t], 256, Tanh); linear outputs.
h_t depends on observed inputs only, so it is computed once per sequence and shared with the guide.

Conventions the paper leaves open, fixed to the authors' implementation (DVAE-speech), so that
their trained weights map onto these layers by name:

- first step: x_0 = 0 (a zero frame) goes through the input MLP, so h_1 is the LSTM's first output
  on MLP(0) from a zero state; z_0 = 0 enters d_z (and the guide's e_z) raw.
- concatenation order: h (or the guide's g) first, [h_t, z_{t-1}] in d_z and [h_t, z_t] in d_x (the
  paper writes [z_{t-1}, h_t] and [z_t, h_t]; the function is the same up to a column permutation).
  In driven mode u_t is appended to the LSTM input: [MLP(x_{t-1}), u_t].

Architecture options (the authors' config.ini names, defaults of 13.1.5): ``dense_x_h`` (256),
``dim_rnn_h`` / ``num_rnn_h`` (128, 1), ``dense_hz_z`` (d_z, 64,32), ``dense_hz_x`` (d_x, 256); for
the guides ``dense_hx_g`` (256; the filtering guide's x MLP), ``dim_rnn_g`` / ``num_rnn_g`` (128,
1), ``dense_gz_z`` (e_z, 64,32); ``activation``.
"""

from __future__ import annotations

import torch

from ..nn import RNN, GaussianHead, shift_right
from .base import DVAE


class SRNN(DVAE):
    """SRNN: deterministic h_t(x_{1:t-1}) and a Markov z_t on top of it."""

    name = "srnn"
    predictive = True

    architecture = {"dense_x_h": (256,), "dim_rnn_h": 128, "num_rnn_h": 1, "dense_hx_g": (256,),
                    "dim_rnn_g": 128, "num_rnn_g": 1, "dense_gz_z": (64, 32),
                    "dense_hz_x": (256,), "dense_hz_z": (64, 32), "activation": "tanh"}

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0, **architecture):
        super().__init__(x_dim, z_dim, likelihood, u_dim, **architecture)
        self.hidden = hidden = self.arch["dim_rnn_h"]
        self.x_features = self.mlp(x_dim, "dense_x_h")
        #: d_h (9.1): forward LSTM over MLP(x_{t-1}, 256, Tanh) [and u_t]
        self.h_rnn = RNN(self.x_features.out_dim + u_dim, hidden,
                         num_layers=self.arch["num_rnn_h"])
        #: parameterises p(z_t | z_{t-1}, h_t) (9.4)
        self.prior_net = self.mlp(hidden + z_dim, "dense_hz_z")
        self.prior_head = GaussianHead(self.prior_net.out_dim, z_dim)
        #: parameterises p(x_t | z_t, h_t) (9.2)
        self.decoder = self.mlp(hidden + z_dim, "dense_hz_x")
        self.x_out = self.output_layer(self.decoder.out_dim)

    def context(self, x, u, mask):
        inp = self.x_features(shift_right(x))                    # MLP(x_{t-1}), x_0 = 0
        if u is not None:
            inp = torch.cat([inp, u], -1)
        return {"h": self.h_rnn(inp)}

    def prior(self, z, ctx, x, u):
        return self.prior_head(self.prior_net(torch.cat([ctx["h"], shift_right(z)], -1)))

    def emission(self, z, ctx, x, u):
        return self.x_out(self.decoder(torch.cat([ctx["h"], z], -1)))
