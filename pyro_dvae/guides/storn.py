"""Guides of STORN (7.2).

The exact posterior is prod_t p(z_t | z_{1:t-1}, x_{1:T}) (7.12): D-separation removes nothing.

- ``filtering`` (the paper's, 7.15-7.19): g_t = e_g(x_t, g_{t-1}) a forward LSTM (128) over
  MLP(x_t, 256, Tanh), e_z = MLP(g_t, 64, Tanh, 32, Tanh) and the linear Gaussian head (13.1.3):
  q(z_t | x_{1:t}).  It misses z_{1:t-1} and x_{t+1:T} (7.2, Fig. 7.2).
- ``consistent``: q(z_t | z_{1:t-1}, x_{1:T}), the form of the exact posterior.  The same x features
  feed a forward and a backward LSTM, z_{1:t-1} enters through a forward LSTM over
  MLP(z_{t-1}, 32, Tanh, 64, Tanh), and e_z = MLP([g<-^x_t, g->^x_t, g^z_t], 64, Tanh, 32, Tanh):
  the architecture of the non-causal RVAE guide (10.24-10.28, 13.1.6), which has the same form.

In driven mode the x features read [x_t, u_t].
"""

from __future__ import annotations

import torch

from ..models.base import Guide
from ..nn import RNN, GaussianHead
from .rvae import RecurrentGuide


class STORNGuide(Guide):
    """Parameterises q(z_t | x_{1:t}) with a forward LSTM g_t(x_{1:t}) (7.15-7.17)."""

    name = "filtering"

    def __init__(self, model):
        super().__init__(model)
        arch = model.arch
        self.x_features = model.mlp(model.x_dim + model.u_dim, "dense_x_g")
        self.g_rnn = RNN(self.x_features.out_dim, arch["dim_rnn_g"],
                         num_layers=arch["num_rnn_g"])                    # e_g (7.15)
        self.combiner = model.mlp(arch["dim_rnn_g"], "dense_g_z")        # e_z (7.16)
        self.head = GaussianHead(self.combiner.out_dim, model.z_dim)

    def guide(self, x, u=None, mask=None):
        g = self.g_rnn(self.x_features(x if u is None else torch.cat([x, u], -1)))
        loc, scale = self.head(self.combiner(g))                         # (7.16-7.17)
        self.sample_independent("z", x, mask, loc, scale)


class STORNConsistentGuide(RecurrentGuide):
    """Parameterises q(z_t | z_{1:t-1}, x_{1:T}), the form of STORN's exact posterior (7.12)."""

    name = "consistent"
    x_directions = ("forward", "backward")
    #: STORN's options for the x path and e_z; the z path keeps the 13.1.6 sizes
    options = {"x_features": "dense_x_g", "x_rnn": "dim_rnn_g", "x_layers": "num_rnn_g",
               "combiner": "dense_g_z"}


GUIDES = {g.name: g for g in (STORNGuide, STORNConsistentGuide)}
