"""Guides of the VRNN (8.2, 8.4).

The exact posterior is prod_t p(z_t | z_{1:t-1}, x_{1:T}) (8.10).  Both guides share the model's
state h_t(x_{1:t-1}, z_{1:t-1}) (8.13) and feature extractor phi_x, stepping the model's LSTM d_h
frame by frame as they sample z_t (h_1 = 0, the model's first-step convention).

- ``filtering`` (the paper's, 8.11-8.14): e_z(phi_x(x_t), h_t) = MLP([phi_x(x_t), h_t], 128, Tanh,
  64, Tanh) and the linear Gaussian head (13.1.4): q(z_t | z_{1:t-1}, x_{1:t}), which misses
  x_{t+1:T}.
- ``backward`` (Goyal et al. 2017, 8.4 first point): a backward LSTM (128) on phi_x(x_t) gives
  b_t(x_{t:T}), and e_z = MLP([b_t, h_t], 128, Tanh, 64, Tanh): q(z_t | z_{1:t-1}, x_{1:T}), the form
  of the exact posterior.  (Goyal et al.'s auxiliary costs on b_t and their change of the
  generative model are not part of this guide.)
"""

from __future__ import annotations

import torch

from ..models.base import Guide
from ..nn import RNN, GaussianHead, gaussian_head_step, lstm_step, shift_right, stepwise


class VRNNGuide(Guide):
    """Parameterises q(z_t | x_t, h_t) = q(z_t | z_{1:t-1}, x_{1:t}) (8.11-8.14)."""

    name = "filtering"

    def __init__(self, model):
        super().__init__(model)
        self.encoder = model.mlp(self.x_part_dim() + model.hidden, "dense_hx_z")  # e_z (8.11)
        self.head = GaussianHead(self.encoder.out_dim, model.z_dim)

    def x_part_dim(self) -> int:
        return self.model.x_features.out_dim

    def x_part(self, ctx, mask) -> torch.Tensor:
        """The x-dependent input of e_z for all t: phi_x(x_t)."""
        return ctx["fx"]

    def guide(self, x, u=None, mask=None):
        model = self.model
        ctx = model.shared_context(x, u, mask)
        xp, fx = self.x_part(ctx, mask), ctx["fx"]
        state, hs = None, []
        # d_h and e_z with the shares of their x inputs computed once per sequence: step t of
        # d_h reads [phi_x(x_{t-1}), phi_z(z_{t-1}), u_t], e_z reads [xp_t, h_t] (nn.lstm_step,
        # nn.stepwise)
        d_h = lstm_step(model.h_rnn, model.rnn_input_parts(shift_right(fx), None, u))
        e_z = stepwise(self.encoder, [xp, None])
        head = gaussian_head_step(self.head)

        def step(t, z_prev):
            nonlocal state
            if t == 0:
                h = model.initial_state(x)                                        # h_1 = 0
            else:  # h_t = d_h([phi_x(x_{t-1}), phi_z(z_{t-1}), u_t], h_{t-1})     (8.1)
                h, state = d_h(t, model.z_features(z_prev), state)
            hs.append(h)
            return head(e_z(t, h))                                                # (8.11-8.12)

        seq = self.sample_chain("z", x, mask, step)
        # h_{1:T} for the model (8.13), with the z values it was computed from
        model.share_states(ctx, seq.values, torch.stack(hs, 1), seq.stacked())


class VRNNBackwardGuide(VRNNGuide):
    """Parameterises q(z_t | b_t(x_{t:T}), h_t) = q(z_t | z_{1:t-1}, x_{1:T}) (8.4, Goyal et al.)."""

    name = "backward"

    def __init__(self, model):
        super().__init__(model)
        self.b_rnn = RNN(model.x_features.out_dim, model.hidden, reverse=True,
                         num_layers=model.arch["num_rnn"])

    def x_part_dim(self) -> int:
        return self.model.hidden

    def x_part(self, ctx, mask):
        return self.b_rnn(ctx["fx"], mask)


GUIDES = {g.name: g for g in (VRNNGuide, VRNNBackwardGuide)}
