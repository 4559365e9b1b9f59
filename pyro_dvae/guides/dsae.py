"""Guides of the DSAE (11.2).

The exact posterior is p(v | x_{1:T}) prod_t p(z_t | z_{1:t-1}, v, x_{t:T}) (11.7-11.9).  Both guides
sample the sequence-level site ``v`` first, then z_1 .. z_T (the model's order).

- ``full`` (the paper's, 11.11-11.22): q(v | x_{1:T}) from a bidirectional many-to-one LSTM (128 per
  direction) over MLP(x_t, 256, Tanh), g^v = [g->^v_T, g<-^v_1] (11.14), e_v = MLP(g^v, 64, Tanh,
  32, Tanh) and a linear Gaussian head; q(z_t | v, x_{1:T}) from a bidirectional LSTM (128 per
  direction) over MLP([v, MLP(x_t, 256, Tanh)], 256, Tanh) (11.17-11.19) and e_z a simple (tanh) RNN
  with 32 units followed by the linear Gaussian head (11.20, 13.1.7).  It misses z_{1:t-1} and has
  the extra x_{1:t-1} (11.2, Fig. 11.2).  One MLP(x_t, 256, Tanh) feeds both encoders, as in the
  authors' implementation.
- ``factorized`` (11.10): the same q(v | x_{1:T}) and a frame-wise q(z_t | x_t) =
  MLP(MLP(x_t, 256, Tanh), 64, Tanh, 32, Tanh) and the linear Gaussian head.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ..models.base import Guide
from ..nn import MLP, RNN, BiRNN, GaussianHead


class DSAEGuide(Guide):
    """Parameterises q(v | x_{1:T}) q(z_{1:T} | v, x_{1:T}) = q(v | x_{1:T}) prod_t q(z_t | v, x_{1:T})
    (11.12-11.22)."""

    name = "full"
    hidden = 128

    def __init__(self, model):
        super().__init__(model)
        H, v_dim = self.hidden, model.v_dim
        self.x_features = MLP(model.x_dim, 256, "tanh")
        self.v_rnn = BiRNN(256, H)                                   # (11.12-11.13)
        self.v_net = MLP(2 * H, 64, "tanh", 32, "tanh")              # e_v (11.15)
        self.v_head = GaussianHead(32, v_dim)
        self.build_z_encoder()

    def build_z_encoder(self):
        H = self.hidden
        self.xv_features = MLP(256 + self.model.v_dim, 256, "tanh")
        self.gz_rnn = BiRNN(256, H)                                  # (11.17-11.19)
        self.z_rnn = RNN(2 * H, 32, cell="rnn")                      # e_z (11.20)
        self.head = GaussianHead(32, self.model.z_dim)

    def sample_v(self, feat, mask) -> torch.Tensor:
        """Site ``v`` ~ q(v | x_{1:T}) (11.12-11.16), (batch, v_dim)."""
        H = self.hidden
        g = self.v_rnn(feat, mask)
        if mask is None:
            last = g[:, -1, :H]
        else:  # forward state at each sequence's own last frame
            idx = (mask.sum(1).long() - 1).clamp(min=0)
            last = g[torch.arange(g.shape[0], device=g.device), idx, :H]
        gv = torch.cat([last, g[:, 0, H:]], -1)                    # g^v = [g->_T, g<-_1] (11.14)
        loc, scale = self.v_head(self.v_net(gv))
        return pyro.sample("v", dist.Normal(loc, scale).to_event(1))

    def z_params(self, feat, v, mask):
        vt = v.unsqueeze(1).expand(-1, feat.shape[1], -1)
        g = self.gz_rnn(self.xv_features(torch.cat([vt, feat], -1)), mask)
        return self.head(self.z_rnn(g))                             # (11.20-11.21)

    def guide(self, x, u=None, mask=None):
        feat = self.x_features(x)
        v = self.sample_v(feat, mask)
        loc, scale = self.z_params(feat, v, mask)
        self.sample_independent("z", x, mask, loc, scale)


class DSAEFactorizedGuide(DSAEGuide):
    """Parameterises q(v | x_{1:T}) prod_t q(z_t | x_t) (11.10)."""

    name = "factorized"

    def build_z_encoder(self):
        self.z_net = MLP(256, 64, "tanh", 32, "tanh")
        self.head = GaussianHead(32, self.model.z_dim)

    def z_params(self, feat, v, mask):
        return self.head(self.z_net(feat))


GUIDES = {g.name: g for g in (DSAEGuide, DSAEFactorizedGuide)}
