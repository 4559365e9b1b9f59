"""Guides of the DKF (5.2; Krishnan et al. 2015, 2017).

The exact posterior factorises as prod_t p(z_t | z_{t-1}, x_{t:T}, u_{t:T}) (5.2).  The deep Kalman
smoother (DKS, 5.4-5.7) has exactly this form; the other inference models of 5.2 drop z_{t-1} and/or
see other parts of x.  All share one architecture (13.1.1): x_t features MLP(x_t, 256, Tanh) [with u_t
in driven mode], an RNN of 128 units in the direction the variant needs, z_{t-1} through
MLP(z_{t-1}, 32, Tanh, 64, Tanh) and a linear layer to 128 inside the tanh of (5.5), the parts
averaged into g_t (5.5; Krishnan's ST-LR averages three parts), and e_z = MLP(g_t, 64, Tanh, 32, Tanh)
followed by the linear Gaussian head (5.6-5.7).

| variant    | density                          | x summary                               |
|------------|----------------------------------|-----------------------------------------|
| ``dks``    | q(z_t | z_{t-1}, x_{t:T})         | backward LSTM (5.4)  -- the paper's guide |
| ``st-l``   | q(z_t | z_{t-1}, x_{1:t})         | forward LSTM                            |
| ``st-lr``  | q(z_t | z_{t-1}, x_{1:T})         | forward and backward LSTMs              |
| ``mf-t``   | q(z_t | x_t)                      | MLP(features_t, 128, Tanh)              |
| ``mf-local`` | q(z_t | x_{t-1:t+1})            | MLP([features_{t-1}, _t, _{t+1}], 128, Tanh) |
| ``mf-l``   | q(z_t | x_{1:t})                  | forward LSTM                            |
| ``mf-lr``  | q(z_t | x_{1:T})                  | forward and backward LSTMs              |
"""

from __future__ import annotations

import torch

from ..models.base import Guide
from ..nn import MLP, RNN, GaussianHead, gaussian_head_step, mlp, shift_right
from ..precision import fp32


class DKFGuide(Guide):
    """Parameterises q(z_t | [z_{t-1}], x_{S(t)}) with S(t) set by ``context``.

    ``context``: "t", "local" (t-1:t+1), "past" (1:t), "future" (t:T) or "all" (1:T);
    ``markov``: whether z_{t-1} enters g_t.
    """

    context = "future"
    markov = True

    def __init__(self, model):
        super().__init__(model)
        arch = model.arch
        H, layers, act = arch["dim_rnn_gx"], arch["num_rnn_gx"], arch["activation"]
        self.x_features = model.mlp(model.x_dim + model.u_dim, "dense_x_gx")
        F = self.x_features.out_dim
        if self.context in ("past", "all"):
            self.fwd_rnn = RNN(F, H, num_layers=layers)
        if self.context in ("future", "all"):
            self.bwd_rnn = RNN(F, H, reverse=True, num_layers=layers)
        if self.context == "t":
            self.frame_net = MLP(F, H, act)
        if self.context == "local":
            self.frame_net = MLP(3 * F, H, act)
        if self.markov:
            #: the z_{t-1} part of g_t (5.5), MLP(z_{t-1}, 32, Tanh, 64, Tanh) then tanh(W . + b)
            self.z_net = mlp(model.z_dim, arch["dense_ztm1_g"] + (H,), act)
        #: e_z (5.6)
        self.combiner = model.mlp(H, "dense_g_z")
        self.head = GaussianHead(self.combiner.out_dim, model.z_dim)

    def x_summary(self, x, u, mask):
        """The x-dependent parts of g_t, each (batch, T, H)."""
        feat = self.x_features(x if u is None else torch.cat([x, u], -1))
        parts = []
        if self.context in ("past", "all"):
            parts.append(self.fwd_rnn(feat))
        if self.context in ("future", "all"):
            parts.append(self.bwd_rnn(feat, mask))
        if self.context == "t":
            parts.append(self.frame_net(feat))
        if self.context == "local":
            if mask is not None:  # a padded neighbour is treated like the boundary (zeros)
                feat = torch.where(mask.bool().unsqueeze(-1), feat, feat.new_zeros(()))
            nxt = shift_right(feat.flip(1)).flip(1)
            parts.append(self.frame_net(torch.cat([shift_right(feat), feat, nxt], -1)))
        return parts

    def guide(self, x, u=None, mask=None):
        parts = self.x_summary(x, u, mask)
        if not self.markov:
            g = torch.stack(parts).mean(0)
            loc, scale = self.head(self.combiner(g))
            self.sample_independent("z", x, mask, loc, scale)
            return
        x_part = fp32(torch.stack(parts).mean(0) * len(parts)).unbind(1)  # loop in fp32
        n = len(parts) + 1
        head = gaussian_head_step(self.head)

        def step(t, z_prev):
            g = (self.z_net(z_prev) + x_part[t]) / n            # (5.5)
            return head(self.combiner(g))                       # (5.6-5.7)

        self.sample_chain("z", x, mask, step)


def _variant(name, context, markov, doc):
    return type(f"DKFGuide_{name.replace('-', '_')}", (DKFGuide,),
                {"name": name, "context": context, "markov": markov, "__doc__": doc,
                 "__module__": __name__})


DKSGuide = _variant("dks", "future", True, "Parameterises q(z_t | z_{t-1}, x_{t:T}): DKS (5.4-5.7).")
STLGuide = _variant("st-l", "past", True, "Parameterises q(z_t | z_{t-1}, x_{1:t}).")
STLRGuide = _variant("st-lr", "all", True, "Parameterises q(z_t | z_{t-1}, x_{1:T}).")
MFTGuide = _variant("mf-t", "t", False, "Parameterises q(z_t | x_t).")
MFLocalGuide = _variant("mf-local", "local", False, "Parameterises q(z_t | x_{t-1:t+1}).")
MFLGuide = _variant("mf-l", "past", False, "Parameterises q(z_t | x_{1:t}).")
MFLRGuide = _variant("mf-lr", "all", False, "Parameterises q(z_t | x_{1:T}).")

GUIDES = {g.name: g for g in (DKSGuide, STLGuide, STLRGuide, MFTGuide, MFLocalGuide, MFLGuide,
                              MFLRGuide)}
