"""DSAE: disentangled sequential autoencoder (chapter 11, Li and Mandt 2018).

Generative model (11.1-11.6):
  p(x, z, v) = p(v) prod_t p(x_t | z_t, v) p(z_t | z_{1:t-1})          (11.1)
  v ~ N(0, I), one per sequence (13.1.7: "we assume it follows a standard Gaussian")
  h_t = d_h(z_{t-1}, h_{t-1}),  p(z_t | h_t) = N(d_z(h_t))               (11.2-11.4)
  p(x_t | z_t, v) with decoder d_x(z_t, v)                              (11.5-11.6)

Architecture (13.1.7): d_h a forward LSTM with 32 units over z_{t-1} (z_0 = 0); d_z one linear layer
(mean and log-variance); d_x = MLP([z_t, v], 32, Tanh, 64, Tanh, 128, Tanh, 256, Tanh) and the linear
output layer; v has the dimension of z_t.

Sites, in this order in the model and in its guides: ``v`` (one per sequence, inside the
``sequences`` plate), ``z_1 .. z_T``, then ``x_1 .. x_T``.  :meth:`DSAE.generate` samples v once per
sequence; :meth:`DSAE.swap_v` exchanges the sequence-level latents of two sequences before decoding
(the speaker / content swap of 14.3).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ..nn import MLP, RNN, GaussianHead, shift_right
from .base import DVAE, kl_weight, use_mean


class DSAE(DVAE):
    """DSAE: sequence-level v, z_t | z_{1:t-1} (LSTM), x_t | z_t, v."""

    name = "dsae"

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0, v_dim: int | None = None,
                 prior_hidden: int = 32):
        if u_dim:
            raise ValueError("dsae: the DSAE has no external input u (u_dim must be 0)")
        super().__init__(x_dim, z_dim, likelihood, u_dim)
        self.v_dim = int(v_dim or z_dim)
        #: d_h (11.2): forward LSTM over z_{t-1}, 32 units (13.1.7 and its footnote)
        self.prior_rnn = RNN(z_dim, prior_hidden)
        #: d_z (11.3): one linear layer to the mean and log-variance of p(z_t | z_{1:t-1})
        self.prior_head = GaussianHead(prior_hidden, z_dim)
        #: parameterises p(x_t | z_t, v) (11.5-11.6)
        self.decoder = MLP(z_dim + self.v_dim, 32, "tanh", 64, "tanh", 128, "tanh", 256, "tanh")
        self.x_out = self.output_layer(256)

    def prior(self, z, ctx, x, u):
        return self.prior_head(self.prior_rnn(shift_right(z)))            # (11.2-11.4)

    def emission(self, z, ctx, x, u):
        v = ctx["v"].unsqueeze(1).expand(-1, z.shape[1], -1)
        return self.x_out(self.decoder(torch.cat([z, v], -1)))            # (11.5)

    def model(self, x, u=None, mask=None, num_sequences=None, beta=1.0):
        """p(v) prod_t p(z_t | z_{1:t-1}) p(x_t | z_t, v) (11.1): site ``v``, then z_t, then x_t."""
        x, u = self.prepare_inputs(x, u, mask)
        pyro.module(self.pyro_name, self)
        batch = x.shape[0]
        with self.plate(x, num_sequences):
            with kl_weight(beta):
                v = pyro.sample("v", dist.Normal(x.new_zeros(batch, self.v_dim),
                                                 x.new_ones(batch, self.v_dim)).to_event(1))
                z = self.sample_latents(
                    "z", x, mask, compute=lambda z_: self.prior(z_, {}, x, u))
            self.observe("x", x, mask, lambda: self.emission(z.stacked(), {"v": v}, x, u))

    # ---- generation, encoding, swapping ------------------------------------------------------------
    @torch.no_grad()
    def generate(self, T: int, n: int = 1, u: torch.Tensor | None = None,
                 feedback: str = "sample", v: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """n sequences of T frames from the prior: v ~ N(0, I) once per sequence (or the given
        ``v``, (n, v_dim)), z_t | z_{1:t-1} step by step, then x_t | z_t, v.  Returns ``x``,
        ``mean``, ``z`` (each (n, T, .)) and ``v`` (n, v_dim)."""
        if u is not None:
            raise ValueError("dsae: the DSAE has no external input u")
        p = next(self.parameters())
        if v is None:
            v = torch.randn(n, self.v_dim, dtype=p.dtype, device=p.device)
        z = torch.zeros(n, T, self.z_dim, dtype=p.dtype, device=p.device)
        z_prev, state = torch.zeros(n, self.z_dim, dtype=p.dtype, device=p.device), None
        for t in range(T):
            h, state = self.prior_rnn.step(z_prev, state)
            loc, scale = self.prior_head(h)
            z_prev = z[:, t] = loc + scale * torch.randn_like(loc)
        params = self.emission(z, {"v": v}, None, None)
        return {"x": self.likelihood.sample(params), "mean": self.likelihood.mean(params), "z": z,
                "v": v}

    @torch.no_grad()
    def encode(self, guide: Callable, x: torch.Tensor, mask: torch.Tensor | None = None,
               sample: bool = False) -> dict[str, torch.Tensor]:
        """v (batch, v_dim) and z (batch, T, z_dim) from ``guide``: its means (fed forward through
        the guide), or a draw with ``sample=True``."""
        trace = poutine.trace(guide if sample else use_mean(guide)).get_trace(x, None, mask)
        T = x.shape[1]
        z = torch.stack([trace.nodes[f"z_{t + 1}"]["value"] for t in range(T)], 1)
        return {"v": trace.nodes["v"]["value"], "z": z}

    @torch.no_grad()
    def decode(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """E[x_t | z_t, v] for all t, (batch, T, F)."""
        return self.likelihood.mean(self.emission(z, {"v": v}, None, None))

    @torch.no_grad()
    def swap_v(self, guide: Callable, x_a: torch.Tensor, x_b: torch.Tensor,
               mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None,
               sample: bool = False) -> dict[str, torch.Tensor]:
        """Exchange the sequence-level latent v of two (batches of) sequences before decoding (14.3).

        x_a (batch, T_a, F) and x_b (batch, T_b, F) are encoded with ``guide``; returns
        ``a_with_v_b`` = E[x | z^a, v^b] (batch, T_a, F) and ``b_with_v_a`` = E[x | z^b, v^a]
        (batch, T_b, F), plus the plain reconstructions ``a`` and ``b`` and the codes.
        """
        if x_a.shape[0] != x_b.shape[0]:
            raise ValueError(f"swap_v needs the same batch size, got {x_a.shape[0]} and "
                             f"{x_b.shape[0]}")
        ca, cb = self.encode(guide, x_a, mask_a, sample), self.encode(guide, x_b, mask_b, sample)
        return {"a_with_v_b": self.decode(ca["z"], cb["v"]),
                "b_with_v_a": self.decode(cb["z"], ca["v"]),
                "a": self.decode(ca["z"], ca["v"]), "b": self.decode(cb["z"], cb["v"]),
                "v_a": ca["v"], "v_b": cb["v"], "z_a": ca["z"], "z_b": cb["z"]}
