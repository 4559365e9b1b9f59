"""Guides of the SRNN (9.2).

- ``smoothing`` (the paper's, 9.9-9.12): q(z_t | z_{t-1}, g<-_t) with g<-_t = e_g([h_t, x_t], g<-_{t+1}) a
  backward LSTM over MLP([h_t, x_t], 256, Tanh), and e_z = MLP([g<-_t, z_{t-1}], 64, Tanh, 32,
  Tanh) (13.1.5, in the authors' concatenation order: g first); equivalently q(z_t | z_{t-1},
  x_{1:T}) (9.13), the form of the exact posterior (9.8).
- ``filtering`` (end of 9.2): the "instantaneous" e_z(z_{t-1}, h_t, x_t), i.e. q(z_t | z_{t-1}, x_{1:t}),
  here MLP([h_t, MLP(x_t, 256, Tanh), z_{t-1}], 64, Tanh, 32, Tanh).

Both use the model's h_t, computed once per sequence (shared with the model, 13.1.5).  z_0 = 0
enters e_z raw (the authors' convention, see models/srnn.py).
"""

from __future__ import annotations

import torch

from ..models.base import Guide
from ..nn import RNN, GaussianHead, gaussian_head_step, stepwise


class SRNNGuide(Guide):
    """Parameterises q(z_t | z_{t-1}, x_{1:T}) with a backward LSTM on [h_t, x_t] (9.9-9.12)."""

    name = "smoothing"

    def __init__(self, model):
        super().__init__(model)
        arch = model.arch
        self.hx_features = model.mlp(model.hidden + model.x_dim, "dense_hx_g")
        self.g_rnn = RNN(self.hx_features.out_dim, arch["dim_rnn_g"], reverse=True,
                         num_layers=arch["num_rnn_g"])                              # (9.10)
        self.combiner = model.mlp(arch["dim_rnn_g"] + model.z_dim, "dense_gz_z")   # (9.11)
        self.head = GaussianHead(self.combiner.out_dim, model.z_dim)

    def summary(self, x, h, mask):
        return self.g_rnn(self.hx_features(torch.cat([h, x], -1)), mask)

    def guide(self, x, u=None, mask=None):
        h = self.model.shared_context(x, u, mask)["h"]
        # e_z([g_t, z_{t-1}]): the g_t share of its first layer once per sequence (nn.stepwise)
        e_z = stepwise(self.combiner, [self.summary(x, h, mask), None])
        head = gaussian_head_step(self.head)

        def step(t, z_prev):
            return head(e_z(t, z_prev))

        self.sample_chain("z", x, mask, step)


class SRNNFilteringGuide(SRNNGuide):
    """Parameterises q(z_t | z_{t-1}, h_t, x_t) = q(z_t | z_{t-1}, x_{1:t}) (end of 9.2)."""

    name = "filtering"

    def __init__(self, model):
        super(SRNNGuide, self).__init__(model)
        self.x_features = model.mlp(model.x_dim, "dense_hx_g")
        self.combiner = model.mlp(model.hidden + self.x_features.out_dim + model.z_dim,
                                  "dense_gz_z")
        self.head = GaussianHead(self.combiner.out_dim, model.z_dim)

    def summary(self, x, h, mask):
        return torch.cat([h, self.x_features(x)], -1)


GUIDES = {g.name: g for g in (SRNNGuide, SRNNFilteringGuide)}
