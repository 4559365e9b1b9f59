"""DKF / DMM: deep Kalman filter (chapter 5, Krishnan et al. 2015, 2017).

Generative model (3.9-3.12, 5.1):  p(x, z | u) = prod_t p(x_t | z_t) p(z_t | z_{t-1}, u_t),  z_0 = 0.

Architecture (13.1.1):
- gated transition d_z (13.1-13.5):
  nu_t = MLP(z_{t-1}, 16, ReLU, 16, Sigmoid),  mu^nonlin_t = MLP(z_{t-1}, 16, ReLU, 16, I),
  mu^lin_t = MLP(z_{t-1}, 16, I),  mu_t = (1 - nu_t) * mu^lin_t + nu_t * mu^nonlin_t,
  sigma^2_t = MLP(ReLU(mu^nonlin_t), 16, Softplus);
- emission d_x = MLP(z_t, 32, Tanh, 64, Tanh, 128, Tanh, 256, Tanh) + linear output.

In driven mode the transition networks take [z_{t-1}, u_t].  The guides (DKS and the variants of
5.2) are in guides/dkf.py.

First step (the authors' convention, DVAE-speech, as the paper's z_0 = 0): z_0 = 0 goes through the
gated transition, so p(z_1) = transition(0) is a learned Gaussian, not N(0, I), and the guide's
MLP(z_{t-1}) receives z_0 = 0 at t = 1.

Architecture options (the authors' config.ini names): ``dense_z_x`` (decoder widths, default
32,64,128,256), and for the guides ``dense_x_gx`` (x features, 256), ``dim_rnn_gx`` / ``num_rnn_gx``
(LSTM size 128, 1 layer), ``bidir_gx`` (False: the direction is the guide variant's),
``dense_ztm1_g`` (the z_{t-1} MLP before the layer to ``dim_rnn_gx``, 32,64), ``dense_g_z`` (e_z,
64,32) and ``activation`` (tanh).  The gated transition's sizes are fixed by 13.1.1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import MLP, ArchitectureError, shift_right
from .base import DVAE


class GatedTransition(nn.Module):
    """Parameterises p(z_t | z_{t-1}, u_t): the gated transition of 13.1-13.5."""

    def __init__(self, in_dim: int, z_dim: int, hidden: int = 16):
        super().__init__()
        self.gate = MLP(in_dim, hidden, "relu", z_dim, "sigmoid")           # (13.1)
        self.nonlin = MLP(in_dim, hidden, "relu", z_dim, "linear")          # (13.2)
        self.lin = nn.Linear(in_dim, z_dim)                                 # (13.3)
        self.var = MLP(z_dim, z_dim, "softplus")                            # (13.5)

    def forward(self, z_prev):
        nu = self.gate(z_prev)
        mu_nonlin = self.nonlin(z_prev)
        loc = (1 - nu) * self.lin(z_prev) + nu * mu_nonlin                  # (13.4)
        scale = torch.sqrt(self.var(torch.relu(mu_nonlin)) + 1e-8)
        return loc, scale


class DKF(DVAE):
    """Deep Kalman filter: first-order Markov z_t, x_t | z_t."""

    name = "dkf"

    architecture = {"dense_x_gx": (256,), "dim_rnn_gx": 128, "num_rnn_gx": 1, "bidir_gx": False,
                    "dense_ztm1_g": (32, 64), "dense_g_z": (64, 32),
                    "dense_z_x": (32, 64, 128, 256), "activation": "tanh"}

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0, **architecture):
        super().__init__(x_dim, z_dim, likelihood, u_dim, **architecture)
        if self.arch["bidir_gx"]:
            raise ArchitectureError("bidir_gx=True cannot be expressed: the direction of the x "
                                    "LSTM is the guide's (--guide st-lr reads x both ways)")
        self.transition = GatedTransition(z_dim + u_dim, z_dim)
        #: parameterises p(x_t | z_t) (3.11)
        self.decoder = self.mlp(z_dim, "dense_z_x")
        self.x_out = self.output_layer(self.decoder.out_dim)

    def prior(self, z, ctx, x, u):
        z_prev = shift_right(z)
        return self.transition(z_prev if u is None else torch.cat([z_prev, u], -1))

    def emission(self, z, ctx, x, u):
        return self.x_out(self.decoder(z))
