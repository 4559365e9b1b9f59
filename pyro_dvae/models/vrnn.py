"""VRNN: variational recurrent neural network (chapter 8, Chung et al. 2015), predictive mode.

Generative model (8.1-8.5, compact form 8.8):
  h_t = d_h(phi_x(x_{t-1}), phi_z(z_{t-1}), h_{t-1})        (8.1)  [driven: u_t is a further input]
  p(z_t | h_t) = N(d_z(h_t))                                (8.4-8.5)
  p(x_t | z_t, h_t) with decoder d_x(phi_z(z_t), h_t)        (8.2-8.3)
so p(x, z) = prod_t p(x_t | x_{1:t-1}, z_{1:t}) p(z_t | x_{1:t-1}, z_{1:t-1})   (8.8).

Architecture (13.1.4): phi_x = MLP(x_t, 256, Tanh), phi_z = MLP(z_t, 32, Tanh, 64, Tanh); d_h is an
LSTM (128) with input [phi_x(x_{t-1}), phi_z(z_{t-1})]; d_z = MLP(h_t, 64, Tanh, 32, Tanh) and
d_x = MLP([phi_z(z_t), h_t], 256, Tanh), each followed by its linear output layer.

Conventions the paper leaves open, fixed to the authors' implementation (DVAE-speech), so that
their trained weights map onto these layers by name:

- first step: h_1 = 0 (the LSTM's zero initial state): the prior, the decoder and the guide at t = 1
  see h = 0, so p(z_1) is the prior network applied to h = 0 (a learned Gaussian, not N(0, I)).
  There is no x_0 or z_0: the first LSTM step consumes [phi_x(x_1), phi_z(z_1)] and gives h_2.
- concatenation orders: [phi_x(x_{t-1}), phi_z(z_{t-1})] into d_h, [phi_z(z_t), h_t] into d_x and
  [phi_x(x_t), h_t] into the guide's e_z.
- driven mode: u_t is appended to the input of the LSTM step that gives h_t,
  [phi_x(x_{t-1}), phi_z(z_{t-1}), u_t]; since h_1 = 0 is no LSTM output, u_1 does not enter the
  model (u_t acts from h_t on, t >= 2).

Architecture options (the authors' config.ini names, defaults of 13.1.4): ``dense_x`` (phi_x, 256),
``dense_z`` (phi_z, 32,64), ``dim_rnn`` / ``num_rnn`` (128, 1), ``dense_h_z`` (d_z, 64,32),
``dense_hz_x`` (d_x, 256), ``dense_hx_z`` (the guide's e_z, 128,64; the authors' released VRNN has
64,32) and ``activation``.

The state h_t is shared by the model and its guide (8.13): the guide steps ``h_rnn`` frame by frame
(it needs z_{t-1} before it can build h_t) and hands h_{1:T} to the model, which uses it for the
prior and the decoder of all steps at once when its recorded z_t are the very tensors the guide
sampled (as in an ELBO: the model replays the guide's trace).  Otherwise (other z values, the model
run alone, generation) the model computes h_{1:T} in one LSTM call from its own z.
"""

from __future__ import annotations

from typing import Optional

import pyro
import torch

from ..nn import RNN, GaussianHead
from .base import DVAE, kl_weight


class VRNN(DVAE):
    """VRNN: h_t(x_{1:t-1}, z_{1:t-1}), z_t | h_t, x_t | z_t, h_t."""

    name = "vrnn"
    predictive = True

    architecture = {"dense_x": (256,), "dense_z": (32, 64), "dense_hx_z": (128, 64),
                    "dense_hz_x": (256,), "dense_h_z": (64, 32), "dim_rnn": 128, "num_rnn": 1,
                    "activation": "tanh"}

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0, **architecture):
        super().__init__(x_dim, z_dim, likelihood, u_dim, **architecture)
        self.hidden = hidden = self.arch["dim_rnn"]
        #: feature extractors phi_x, phi_z (13.1.4), shared with the guide
        self.x_features = self.mlp(x_dim, "dense_x")
        self.z_features = self.mlp(z_dim, "dense_z")
        #: d_h (8.1): LSTM over [phi_x(x_{t-1}), phi_z(z_{t-1}), (u_t)], giving h_t for t >= 2
        self.h_rnn = RNN(self.x_features.out_dim + self.z_features.out_dim + u_dim, hidden,
                         num_layers=self.arch["num_rnn"])
        #: parameterises p(z_t | h_t) (8.4-8.5)
        self.prior_net = self.mlp(hidden, "dense_h_z")
        self.prior_head = GaussianHead(self.prior_net.out_dim, z_dim)
        #: parameterises p(x_t | z_t, h_t) (8.2-8.3)
        self.decoder = self.mlp(self.z_features.out_dim + hidden, "dense_hz_x")
        self.x_out = self.output_layer(self.decoder.out_dim)
        self._state_cache = None
        self._guide_states = None

    def __getstate__(self):
        state = super().__getstate__()  # the run caches hold non-leaf tensors: drop them
        state.update(_state_cache=None, _guide_states=None)
        return state

    def context(self, x, u, mask):
        return {"fx": self.x_features(x), "u": u}

    def rnn_input(self, fx: torch.Tensor, fz: torch.Tensor, u_next=None) -> torch.Tensor:
        """Input of the d_h step that gives h_{t+1}: [phi_x(x_t), phi_z(z_t), (u_{t+1})]; works on
        one step (batch, .) and on stacked steps (batch, T, .) alike."""
        return torch.cat(self.rnn_input_parts(fx, fz, u_next), -1)

    @staticmethod
    def rnn_input_parts(fx, fz, u_next=None) -> list:
        """The pieces of :meth:`rnn_input` in their order (a guide passes ``fz=None`` to
        :func:`pyro_dvae.nn.lstm_step`)."""
        return [fx, fz] + ([] if u_next is None else [u_next])

    def initial_state(self, like: torch.Tensor) -> torch.Tensor:
        """h_1 = 0, (batch, hidden) (the authors' convention, module docstring)."""
        return like.new_zeros(like.shape[0], self.hidden)

    def model(self, x, u=None, mask=None, num_sequences=None, beta=1.0):
        """p(x, z | u) of (8.8); :meth:`DVAE.model` with the z sites visible to :meth:`states`."""
        x, u = self.prepare_inputs(x, u, mask)
        pyro.module(self.pyro_name, self)
        with self.plate(x, num_sequences):
            ctx = self.shared_context(x, u, mask, store=False)
            local = dict(ctx, shared=ctx)  # + "seq": the z sites, so states() can match the guide's
            with kl_weight(beta):
                z = self.sample_latents("z", x, mask, compute=lambda z_: self.prior(z_, local, x, u))
            local["seq"] = z
            self.observe("x", x, mask, lambda: self.emission(z.stacked(), local, x, u))

    def share_states(self, ctx: dict, values: list, h: torch.Tensor,
                     stacked: Optional[torch.Tensor] = None) -> None:
        """Called by a guide: h_{1:T} (batch, T, hidden) computed from ``ctx`` and the z values
        ``values`` (the guide's sample tensors z_1..z_T; ``stacked``: the same as one tensor, the
        value of a fused site)."""
        self._guide_states = (ctx, list(values), h, stacked)

    def _states_from_guide(self, z, ctx):
        shared, self._guide_states = self._guide_states, None
        seq = ctx.get("seq")
        if shared is None or seq is None or shared[0] is not ctx.get("shared"):
            return None
        if not seq.complete() or z is not seq.stacked() or len(shared[1]) != len(seq.values):
            return None
        if shared[3] is not None and z is shared[3]:  # fused sites: the guide's z itself
            return shared[2]
        if all(a is b for a, b in zip(seq.values, shared[1])):
            return shared[2]
        return None

    def states(self, z, ctx):
        """(h_{1:T}, phi_z(z_{1:T})) from the whole z; h_t uses z_{1:t-1} only (8.1)."""
        cache = self._state_cache
        if cache is not None and cache[0] is z and cache[1] is ctx:
            return cache[2]
        fz = self.z_features(z)
        h = self._states_from_guide(z, ctx)
        if h is None:
            h1 = self.initial_state(z).unsqueeze(1)
            if z.shape[1] == 1:
                h = h1
            else:  # h_{t+1} = d_h([phi_x(x_t), phi_z(z_t), u_{t+1}], h_t) for t = 1..T-1
                u = ctx.get("u")
                inp = self.rnn_input(ctx["fx"][:, :-1], fz[:, :-1],
                                     None if u is None else u[:, 1:])
                h = torch.cat([h1, self.h_rnn(inp)], 1)
        self._state_cache = (z, ctx, (h, fz))
        return h, fz

    def prior(self, z, ctx, x, u):
        h, _ = self.states(z, ctx)
        return self.prior_head(self.prior_net(h))                 # (8.4)

    def emission(self, z, ctx, x, u):
        h, fz = self.states(z, ctx)
        return self.x_out(self.decoder(torch.cat([fz, h], -1)))   # (8.2)
