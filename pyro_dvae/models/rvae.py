"""RVAE: recurrent variational autoencoder (chapter 10, Leglaive et al. 2020), causal and non-causal.

Generative model: z_t ~ N(0, I) i.i.d. (10.3) and
- causal (10.4-10.8):      h_t = d_h(z_t, h_{t-1}),  p(x_t | h_t):  p(x, z) = prod_t p(x_t | z_{1:t}) p(z_t);
- non-causal (10.9-10.15): h_t = [h->_t, h<-_t] a bidirectional RNN on z_{1:T},  p(x_t | h_t):
  p(x, z) = prod_t p(x_t | z_{1:T}) p(z_t).

Architecture (13.1.6): d_h is a forward (causal) or bidirectional (non-causal) LSTM (128 per
direction) over MLP(z_t, 32, Tanh, 64, Tanh); d_x = MLP(h_t, 256, Tanh) and the linear output layer.

Architecture options (the authors' config.ini names, defaults of 13.1.6): ``dense_z_h`` (32,64),
``dim_rnn_h`` / ``num_rnn_h`` (128, 1), ``dense_h_x`` (256); for the guide ``dense_x_gx`` (256),
``dim_rnn_g_x`` / ``num_rnn_g_x`` (128, 1), ``dense_z_gz`` (32,64), ``dim_rnn_g_z`` /
``num_rnn_g_z`` (128, 1), ``dense_g_z`` (64,32); ``activation``.  ``bidir_h`` and ``bidir_g_x``
are the model's kind (False: causal, True: non-causal) and must agree with it.

x never feeds back (not predictive), so generation samples z_{1:T} from the prior at once and decodes
(:meth:`RVAE.generate`); this is what the non-causal model needs.  Guides are in guides/rvae.py.
"""

from __future__ import annotations

import torch

from ..nn import RNN, ArchitectureError, BiRNN
from .base import DVAE


def _architecture(bidirectional: bool) -> dict:
    return {"dense_x_gx": (256,), "dim_rnn_g_x": 128, "num_rnn_g_x": 1, "bidir_g_x": bidirectional,
            "dense_z_gz": (32, 64), "dim_rnn_g_z": 128, "num_rnn_g_z": 1, "dense_g_z": (64, 32),
            "dense_z_h": (32, 64), "dim_rnn_h": 128, "num_rnn_h": 1, "bidir_h": bidirectional,
            "dense_h_x": (256,), "activation": "tanh"}


class RVAE(DVAE):
    """RVAE with x_t | h_t(z_{1:t}) (``bidirectional=False``) or x_t | h_t(z_{1:T}) (``True``)."""

    bidirectional = False
    architecture = _architecture(False)

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0, **architecture):
        if u_dim:
            raise ValueError(f"{self.name}: the RVAE has no external input u (u_dim must be 0)")
        super().__init__(x_dim, z_dim, likelihood, u_dim, **architecture)
        for key in ("bidir_g_x", "bidir_h"):
            if self.arch[key] != self.bidirectional:
                other = "rvae-noncausal" if self.arch[key] else "rvae-causal"
                raise ArchitectureError(f"{key}={self.arch[key]} cannot be expressed by "
                                        f"{self.name} (that is {other})")
        self.hidden = self.arch["dim_rnn_h"]
        self.z_features = self.mlp(z_dim, "dense_z_h")
        #: d_h: forward LSTM (10.4) or bidirectional LSTM (10.9-10.11) over the z features
        rnn = BiRNN if self.bidirectional else RNN
        self.h_rnn = rnn(self.z_features.out_dim, self.hidden, num_layers=self.arch["num_rnn_h"])
        #: parameterises p(x_t | h_t) (10.5-10.6 / 10.12-10.13)
        self.decoder = self.mlp(self.hidden * (2 if self.bidirectional else 1), "dense_h_x")
        self.x_out = self.output_layer(self.decoder.out_dim)

    def context(self, x, u, mask):
        # padded frames (mask False) must not reach valid ones through the backward LSTM
        return {"mask": mask}

    def states(self, z, mask=None):
        """h_t for all t, (batch, T, hidden) or (batch, T, 2 hidden) when bidirectional."""
        feat = self.z_features(z)
        return self.h_rnn(feat, mask) if self.bidirectional else self.h_rnn(feat)

    def emission(self, z, ctx, x, u):
        return self.x_out(self.decoder(self.states(z, ctx.get("mask"))))

    @torch.no_grad()
    def generate(self, T: int, n: int = 1, u: torch.Tensor | None = None,
                 feedback: str = "sample"):
        """n sequences of T frames from the prior: z_{1:T} ~ N(0, I) (10.3), then x_t | h_t."""
        if u is not None:
            raise ValueError(f"{self.name}: the RVAE has no external input u")
        p = next(self.parameters())
        z = torch.randn(n, T, self.z_dim, dtype=p.dtype, device=p.device)
        params = self.emission(z, {}, None, None)
        return {"x": self.likelihood.sample(params), "mean": self.likelihood.mean(params), "z": z}


class RVAECausal(RVAE):
    """Causal RVAE: h_t = d_h(z_t, h_{t-1}) (10.4-10.8)."""

    name = "rvae-causal"
    bidirectional = False
    architecture = _architecture(False)


class RVAENonCausal(RVAE):
    """Non-causal RVAE: h_t from a bidirectional LSTM on z_{1:T} (10.9-10.15)."""

    name = "rvae-noncausal"
    bidirectional = True
    architecture = _architecture(True)
    causal_generation = False
