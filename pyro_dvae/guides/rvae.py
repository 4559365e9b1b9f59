"""Guides of the RVAE (10.2; Leglaive et al. 2020).

The exact posterior is prod_t p(z_t | z_{1:t-1}, x_{T'}) (10.16) with T' = t:T for the causal model
and 1:T for the non-causal one; both guides have exactly this form (10.17).

- ``backward`` (causal model, 10.18-10.23): g->_t = e(z_{t-1}, g->_{t-1}) a forward LSTM over
  MLP(z_{t-1}, 32, Tanh, 64, Tanh); g<-_t = e(x_t, g<-_{t+1}) a backward LSTM over MLP(x_t, 256, Tanh);
  e_z = MLP([g->_t, g<-_t], 64, Tanh, 32, Tanh) and the linear Gaussian head (13.1.6):
  q(z_t | z_{1:t-1}, x_{t:T}).
- ``bidirectional`` (non-causal model, 10.24-10.30): the same with a forward LSTM over the same x
  features added (10.25), g_t = [g->^z_t, g->^x_t, g<-^x_t] (10.27): q(z_t | z_{1:t-1}, x_{1:T}).
  The forward and backward x LSTMs read one MLP(x_t, 256, Tanh) (a bidirectional LSTM, as in the
  authors' implementation).

Conventions fixed to the authors' implementation (DVAE-speech), so that their trained weights map
onto these layers by name: z_0 = 0 enters the z-LSTM through the same MLP (so g->^z_1 is the LSTM's
first output on MLP(0) from a zero state, not zero), and e_z reads [g<-^x_t, g->^x_t, g->^z_t]: the
x summaries first, backward before forward, then the z summary (the paper writes [g->_t, g<-_t]).

:class:`RecurrentGuide` is the shared machinery, also used by STORN's structure-consistent guide
(guides/storn.py).
"""

from __future__ import annotations

import torch

from ..models.base import Guide
from ..nn import RNN, GaussianHead, gaussian_head_step, lstm_step, mlp, stepwise


class RecurrentGuide(Guide):
    """Parameterises q(z_t | z_{1:t-1}, x_{S(t)}): a forward LSTM over MLP(z_{t-1}, 32, Tanh, 64, Tanh)
    and LSTMs over MLP([x_t, u_t], 256, Tanh) in ``x_directions`` ("forward": x_{1:t},
    "backward": x_{t:T}), combined by e_z = MLP(g_t, 64, Tanh, 32, Tanh) (10.18-10.30, 13.1.6)."""

    x_directions: tuple[str, ...] = ("backward",)
    #: part -> the model's architecture option that sizes it; a part without one keeps its
    #: 13.1.6 default (:attr:`defaults`)
    options = {"x_features": "dense_x_gx", "x_rnn": "dim_rnn_g_x", "x_layers": "num_rnn_g_x",
               "z_features": "dense_z_gz", "z_rnn": "dim_rnn_g_z", "z_layers": "num_rnn_g_z",
               "combiner": "dense_g_z"}
    defaults = {"x_features": (256,), "x_rnn": 128, "x_layers": 1, "z_features": (32, 64),
                "z_rnn": 128, "z_layers": 1, "combiner": (64, 32)}

    def __init__(self, model):
        super().__init__(model)
        size = {part: model.arch[self.options[part]] if part in self.options else default
                for part, default in self.defaults.items()}
        act = model.arch.get("activation", "tanh")
        Hx, Hz = size["x_rnn"], size["z_rnn"]
        self.x_features = mlp(model.x_dim + model.u_dim, size["x_features"], act)
        F = self.x_features.out_dim
        if "forward" in self.x_directions:
            self.x_fwd = RNN(F, Hx, num_layers=size["x_layers"])                  # (10.25)
        if "backward" in self.x_directions:
            self.x_bwd = RNN(F, Hx, reverse=True, num_layers=size["x_layers"])    # (10.19)/(10.26)
        self.z_features = mlp(model.z_dim, size["z_features"], act)
        self.z_rnn = RNN(self.z_features.out_dim, Hz,
                         num_layers=size["z_layers"])                             # (10.18)/(10.24)
        self.combiner = mlp(Hx * len(self.x_directions) + Hz, size["combiner"], act)  # (10.21)
        self.head = GaussianHead(self.combiner.out_dim, model.z_dim)

    def x_summary(self, x, u, mask) -> torch.Tensor:
        """[g<-^x_t, g->^x_t] (those of ``x_directions``) for all t, (batch, T, H * len(...))."""
        feat = self.x_features(x if u is None else torch.cat([x, u], -1))
        parts = []
        if "backward" in self.x_directions:
            parts.append(self.x_bwd(feat, mask))
        if "forward" in self.x_directions:
            parts.append(self.x_fwd(feat))
        return torch.cat(parts, -1)

    def guide(self, x, u=None, mask=None):
        # e_z on [g^x_t, g->^z_t]: the g^x share of its first layer once per sequence; the z-LSTM
        # stepped with written-out gates (nn.stepwise, nn.lstm_step)
        e_z = stepwise(self.combiner, [self.x_summary(x, u, mask), None])
        z_rnn, head = lstm_step(self.z_rnn), gaussian_head_step(self.head)
        state = None

        def step(t, z_prev):
            nonlocal state
            gz, state = z_rnn(t, self.z_features(z_prev), state)   # g->^z_t(z_{1:t-1})
            return head(e_z(t, gz))                                 # (10.21-10.22)

        self.sample_chain("z", x, mask, step)


class RVAECausalGuide(RecurrentGuide):
    """Parameterises q(z_t | z_{1:t-1}, x_{t:T}) (10.18-10.23)."""

    name = "backward"
    x_directions = ("backward",)


class RVAENonCausalGuide(RecurrentGuide):
    """Parameterises q(z_t | z_{1:t-1}, x_{1:T}) (10.24-10.30)."""

    name = "bidirectional"
    x_directions = ("forward", "backward")


CAUSAL_GUIDES = {g.name: g for g in (RVAECausalGuide,)}
NONCAUSAL_GUIDES = {g.name: g for g in (RVAENonCausalGuide,)}
