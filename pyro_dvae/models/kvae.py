"""KVAE: Kalman variational autoencoder (chapter 6, Fraccaro et al. 2017), predictive mode.

Generative model (6.1-6.7) with the LG-LDS of 3.2 and the parameter bank of 13.1.2::

    alpha_t = softmax(W h_t),  h_t = LSTM(a_{t-1}, h_{t-1}),  a_0 = 0          (13.6-13.8)
    A_t, B_t, C_t = sum_k alpha_t^(k) (A^(k), B^(k), C^(k))
    z_0 ~ N(0, P_0)   (marginalised, not a site)
    p(z_t | z_{t-1}, a_{0:t-1}) = N(A_t z_{t-1} + B_t u_t, Q),  u_t = a_{t-1}    (6.1-6.2)
    p(a_t | z_t, a_{0:t-1})     = N(C_t z_t, R)                                  (6.3-6.4)
    p(x_t | a_t) with d_x(a_t) = MLP(a_t, 128, Tanh, 256, Tanh) + linear output  (6.5-6.6)

Q = Lambda and R = Sigma are diagonal, log-parameterised and learned; P_0 is fixed.  In driven mode
the LDS input is [a_{t-1}, u_t].  Compact form (6.7; the mixture weights make A_t, B_t, C_t
depend on a_{1:t-1}):
p(x, a, z) = prod_t p(x_t | a_t) p(a_t | z_t, a_{1:t-1}) p(z_t | z_{t-1}, a_{1:t-1}).

Sites and their order.  The guide (guides/kvae.py, 6.12-6.13) samples ``a_1 .. a_T`` from
q(a_t | x_t) and then the exact posterior p(z_{1:T} | a_{1:T}) by backward sampling,
``z_T, z_{T-1}, .., z_1`` with z_t | z_{t+1}, a_{1:t}.  The model emits its sites in the same
order: it writes the same joint density (6.7) as p(a_{1:T}) p(z_{1:T} | a_{1:T}) -- the
factorisation of 6.11 -- with p(a_t | a_{1:t-1}) the Kalman filter's predictive density (z_{1:T}
integrated out) and p(z_{1:T} | a_{1:T}) the same backward-sampling factors as the guide.
log p(a_{1:T}) + log p(z_{1:T} | a_{1:T}) = log p(a_{1:T}, z_{1:T}) for every value (tested against
the ancestral factors), so ``Trace_ELBO`` gives exactly the bound (6.18) of the model (6.7); and as
q(z | a) is the exact posterior, the z sites cancel between model and guide and add no Monte Carlo
noise.  Because the orders match, ``TraceMeanField_ELBO`` is valid too: the KL registered for
these sites is the exact 0 of a step of one posterior against itself (the Monte Carlo term of
``Trace_ELBO`` is that 0 too, through the sampler).  Inside
:func:`~pyro_dvae.models.base.fused_sites` (training and validation losses) the a_t and x_t
families are one site each and the z sites are left out, model and guide alike: their terms are 0
in value and gradient (:meth:`KVAE.model`).
:meth:`KVAE.generate` samples ancestrally (6.7): z_t, a_t, x_t step by step.

Masks (padded frames): a masked a_t is a missing observation of the LDS -- q(a_t | x_t) and
p(a_t | a_{1:t-1}) are zeroed there and both Kalman filters (model and guide) skip its update -- and
x_t is masked as usual.  The z_t sites are not masked: model and guide give them the same density.

Kalman algebra: the mixing weights depend on a_{0:t-1} only, so A_t, B_t, C_t of all steps are
known before filtering and the filter, smoother and sampler can run as a parallel scan over time
(``-o kalman_method=scan``) or step by step (``sequential``); ``auto`` (default) takes the scan on
an accelerator and the recursion on CPU (distributions/kalman.py; benchmarks/kalman_scan.py).

Training (13.1.2): two phases, the VAE part first with the LDS frozen (``vae_epochs`` epochs, see
:meth:`KVAE.frozen_parameters`), then everything.  Reconstruction follows 13.1.2: a_t from the
encoder, the Kalman filter's E[z_t | a_{1:t}], a~_t = C_t E[z_t | a_{1:t}] (3.17), decoded.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Set

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import TorchDistribution
from torch import nn
from torch.distributions import constraints

from ..distributions.kalman import METHODS, LinearGaussianSSM, _mvn_log_prob_tril, cholesky
from ..nn import MLP, RNN, shift_right
from ..precision import exact, fp32
from .base import DVAE, kl_weight, use_mean

#: names of the parameters of the LG-LDS part (frozen in the first training phase)
LDS_PARAMETERS = ("A_bank", "B_bank", "C_bank", "q_logvar", "r_logvar", "alpha_rnn.", "alpha_out.")


class KVAE(DVAE):
    """KVAE: a VAE between x_t and a_t on top of a switching LG-LDS on (z_t, a_t)."""

    name = "kvae"
    predictive = True

    def __init__(self, x_dim=257, z_dim=16, likelihood="is", u_dim=0, a_dim=32, K=10,
                 alpha_hidden=50, vae_epochs=5, init_scale=0.05, transition_var=0.08,
                 emission_var=0.03, init_var=20.0, kalman_dtype="float64", kalman_method="auto"):
        super().__init__(x_dim, z_dim, likelihood, u_dim)
        if kalman_dtype not in ("float32", "float64"):
            raise ValueError(f"kvae: kalman_dtype must be float32 or float64, got {kalman_dtype!r}")
        if kalman_method not in METHODS:
            raise ValueError(f"kvae: kalman_method must be one of {', '.join(METHODS)}, got "
                             f"{kalman_method!r}")
        #: how the Kalman filter, smoother and sampler run over time (distributions/kalman.py)
        self.kalman_method = kalman_method
        #: dtype of the Kalman filter/smoother (float64 by default: see ssm())
        self.kalman_dtype = kalman_dtype
        self.a_dim, self.K, self.vae_epochs = int(a_dim), int(K), int(vae_epochs)
        if self.K < 1 or self.a_dim < 1 or self.vae_epochs < 0:
            raise ValueError(f"kvae: need K >= 1, a_dim >= 1, vae_epochs >= 0; got K={K}, "
                             f"a_dim={a_dim}, vae_epochs={vae_epochs}")
        L, D = self.z_dim, self.a_dim
        #: parameterises p(x_t | a_t) (6.5): MLP(a_t, 128, Tanh, 256, Tanh) (13.1.2)
        self.decoder = MLP(D, 128, "tanh", 256, "tanh")
        self.x_out = self.output_layer(256)
        # the parameter bank (13.6-13.8): A^(k) = I, B^(k), C^(k) scaled Gaussian (13.1.2)
        self.A_bank = nn.Parameter(torch.eye(L).repeat(self.K, 1, 1))
        self.B_bank = nn.Parameter(init_scale * torch.randn(self.K, L, D + self.u_dim))
        self.C_bank = nn.Parameter(init_scale * torch.randn(self.K, D, L))
        #: log-variances of the diagonal Q (Lambda) and R (Sigma), isotropic at init
        self.q_logvar = nn.Parameter(torch.full((L,), math.log(transition_var)))
        self.r_logvar = nn.Parameter(torch.full((D,), math.log(emission_var)))
        self.register_buffer("init_cov", init_var * torch.eye(L))
        #: the mixture weights alpha_t(a_{0:t-1}): LSTM (50 units) on a_{t-1}, softmax (13.1.2)
        self.alpha_rnn = RNN(D, alpha_hidden)
        self.alpha_out = nn.Linear(alpha_hidden, self.K)
        self._kalman_cache = None

    def __getstate__(self):
        # the Kalman cache of the last guide run holds non-leaf tensors (an autograd graph), which
        # deepcopy and pickle refuse (issue 12, item 11)
        state = super().__getstate__()
        state["_kalman_cache"] = None
        return state

    # ---- the LG-LDS ---------------------------------------------------------------------------
    @exact
    def _mix(self, alpha: torch.Tensor):
        alpha = fp32(alpha)  # the LDS matrices in full precision under bf16 autocast too
        A = torch.einsum("...k,kij->...ij", alpha, self.A_bank)
        B = torch.einsum("...k,kij->...ij", alpha, self.B_bank)
        C = torch.einsum("...k,kij->...ij", alpha, self.C_bank)
        return A, B, C

    def lds_matrices(self, a: torch.Tensor, u: Optional[torch.Tensor] = None):
        """A_t, C_t (batch, T, ., .) and offsets B_t u_t (batch, T, L) from a (batch, T, D).

        Step t uses a_{0:t-1} only (a_0 = 0): alpha_t = softmax(W LSTM(a_{0:t-1})) (13.6-13.8).
        """
        a_prev = shift_right(a)
        alpha = torch.softmax(fp32(self.alpha_out(self.alpha_rnn(a_prev))), -1)
        A, B, C = self._mix(alpha)
        return A, C, self._offset(B, a_prev, u)

    @exact
    def _offset(self, B: torch.Tensor, a_prev: torch.Tensor, u: Optional[torch.Tensor]):
        inp = fp32(a_prev) if u is None else torch.cat([fp32(a_prev), fp32(u)], -1)
        return (B @ inp.unsqueeze(-1)).squeeze(-1)

    @property
    def Q(self) -> torch.Tensor:
        return torch.diag(self.q_logvar.exp())

    @property
    def R(self) -> torch.Tensor:
        return torch.diag(self.r_logvar.exp())

    def ssm(self, a: torch.Tensor, u: Optional[torch.Tensor] = None) -> LinearGaussianSSM:
        """The LG-LDS given a_{1:T} (which fixes A_t, B_t, C_t): a :class:`LinearGaussianSSM`.

        Its matrices are cast to ``kalman_dtype`` (float64 by default; pass a in that dtype to its
        methods): over padded frames (missing a_t) the predicted covariance grows like
        |eig A|^(2 x steps), which float32 cannot hold next to R once the learned A has
        eigenvalues above 1 (measured: 1.3e7 after a 2.4 s sequence of padding).
        """
        A, C, offset = self.lds_matrices(a, u)
        dt = getattr(torch, self.kalman_dtype) if a.dtype != torch.float64 else a.dtype
        init_loc = a.new_zeros(self.z_dim, dtype=dt)
        return LinearGaussianSSM(init_loc, self.init_cov.to(dt), A.to(dt), C.to(dt),
                                 self.Q.to(dt), self.R.to(dt), offset=offset.to(dt),
                                 method=self.kalman_method)

    def exact_posterior(self, values, u: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None):
        """p(z_{1:T} | a_{1:T}) (6.11) for a_t = ``values[t]`` (batch, a_dim), or for ``values``
        the stacked a (batch, T, a_dim) (fused sites), a KalmanPosterior.

        Computed once when the guide and then the model (replaying the guide's a_t) ask for it
        with the same tensors and unchanged parameters: the model takes the guide's object (one
        Kalman filter per ELBO evaluation, as :meth:`DVAE.shared_context` does for RNN states).
        """
        stacked = values if torch.is_tensor(values) else None
        values = (values,) if stacked is not None else tuple(values)
        key = (tuple(p._version for p in self.parameters()), torch.is_grad_enabled())
        cache, self._kalman_cache = self._kalman_cache, None
        if (cache is not None and cache[1] == key and cache[2] is u and cache[3] is mask
                and len(cache[0]) == len(values)
                and all(c is v for c, v in zip(cache[0], values))):
            return cache[4]
        a = torch.stack(values, 1) if stacked is None else stacked
        ssm = self.ssm(a, u)
        post = ssm.posterior(a.to(ssm.A.dtype), mask)
        self._kalman_cache = (values, key, u, mask, post)
        return post

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        """Decoder outputs (..., num_params) of p(x_t | a_t) (6.5)."""
        return self.x_out(self.decoder(a))

    # ---- training phases (13.1.2) ---------------------------------------------------------------
    def frozen_parameters(self, epoch: int) -> Set[str]:
        """During the first ``vae_epochs`` epochs (0-based ``epoch`` < vae_epochs) the LG-LDS
        (parameter bank, Q, R, the alpha LSTM) is frozen and only the VAE (decoder here, encoder
        in the guide) trains; afterwards nothing is frozen (13.1.2)."""
        if epoch >= self.vae_epochs:
            return set()
        return {n for n, _ in self.named_parameters() if n.startswith(LDS_PARAMETERS)}

    # ---- the Pyro model -----------------------------------------------------------------------
    def model(self, x: torch.Tensor, u: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, num_sequences: Optional[int] = None,
              beta: float = 1.0) -> None:
        """p(x, a, z | u) = p(x | a) p(a) p(z | a) (6.7 written as 6.11 does): sites a_1 .. a_T,
        z_T .. z_1, then x_1 .. x_T (module docstring).

        Inside :func:`fused_sites`: sites ``a`` and ``x`` (one per family, the same densities)
        and no z sites.  p(z | a) of the model is the guide's q(z | a), the same object, so the z
        terms of the ELBO are log p(z | a) - log q(z | a) = 0 for every draw and every parameter
        value: leaving them out keeps the loss and its gradient (they cancelled) and skips the
        backward factors, the sampler and their gradients."""
        x, u = self.prepare_inputs(x, u, mask)
        pyro.module(self.pyro_name, self)
        batch, T = x.shape[:2]
        with self.plate(x, num_sequences):
            marginal = LDSMarginal(self, batch, T, x, u, mask)
            with kl_weight(beta):
                if self.fused():
                    marginal.record_all(pyro.sample("a", LDSMarginalSite(marginal)))
                else:
                    for t in pyro.markov(range(T)):
                        marginal.record(t, pyro.sample(f"a_{t + 1}", marginal.step(t)))
                    marginal.posterior().sample_sites("z")
            self.observe("x", x, mask, lambda: self.decode(marginal.stacked()))

    # ---- generation and reconstruction --------------------------------------------------------
    @torch.no_grad()
    def generate(self, T: int, n: int = 1, u: Optional[torch.Tensor] = None,
                 feedback: str = "sample") -> Dict[str, torch.Tensor]:
        """Ancestral sampling of (z, a, x) (6.7); ``feedback`` is unused (a_{t-1}, not x_{t-1},
        feeds time t).  Returns ``x``, ``mean`` (E[x_t | a_t]), ``z`` and ``a``, each (n, T, .)."""
        p = self.A_bank
        dtype, device = p.dtype, p.device
        L, D = self.z_dim, self.a_dim
        z = torch.linalg.cholesky(self.init_cov) @ torch.randn(n, L, 1, dtype=dtype, device=device)
        z = z.squeeze(-1)
        a_prev = torch.zeros(n, D, dtype=dtype, device=device)
        q_std, r_std = (0.5 * self.q_logvar).exp(), (0.5 * self.r_logvar).exp()
        state, out = None, {k: [] for k in ("x", "mean", "z", "a")}
        for t in range(T):
            h, state = self.alpha_rnn.step(a_prev, state)
            A, B, C = self._mix(torch.softmax(self.alpha_out(h), -1))
            inp = a_prev if u is None else torch.cat([a_prev, u[:, t]], -1)
            z = ((A @ z.unsqueeze(-1) + B @ inp.unsqueeze(-1)).squeeze(-1)
                 + q_std * torch.randn_like(z))
            a = (C @ z.unsqueeze(-1)).squeeze(-1) + r_std * torch.randn_like(a_prev)
            params = self.decode(a)
            out["mean"].append(self.likelihood.mean(params))
            out["x"].append(self.likelihood.sample(params))
            out["z"].append(z)
            out["a"].append(a)
            a_prev = a
        return {k: torch.stack(v, 1) for k, v in out.items()}

    @torch.no_grad()
    def reconstruct(self, guide: Callable, x: torch.Tensor, u: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None, sample: bool = False,
                    mode: str = "filter") -> torch.Tensor:
        """E[x_t | a~_t] for every t, (batch, T, F), as in 13.1.2.

        a_t is the guide's mean (``sample=False``) or a draw; ``mode="filter"`` (the paper's)
        decodes a~_t = C_t E[z_t | a_{1:t}], ``"smooth"`` a~_t = C_t E[z_t | a_{1:T}], ``"vae"``
        decodes a_t itself (the VAE part alone).
        """
        if mode not in ("filter", "smooth", "vae"):
            raise ValueError(f"kvae: reconstruction mode must be filter, smooth or vae, "
                             f"got {mode!r}")
        tr = poutine.trace(guide if sample else use_mean(guide)).get_trace(x, u, mask)
        a = torch.stack([tr.nodes[f"a_{t + 1}"]["value"] for t in range(x.shape[1])], 1)
        if mode != "vae":
            ssm = self.ssm(a, u)
            a64 = a.to(ssm.A.dtype)
            loc = ssm.filter(a64, mask).loc if mode == "filter" else ssm.smooth(a64, mask).loc
            a = (ssm.C @ loc.unsqueeze(-1)).squeeze(-1).to(a.dtype)
        return self.likelihood.mean(self.decode(a))


class LDSMarginal:
    """p(a_t | a_{1:t-1}) = N(C_t m_{t|t-1}, C_t P_{t|t-1} C_t^T + R) for all t of one batch, the
    LG-LDS with z_{1:T} integrated out (Kalman filter, 3.2.2), and p(z_{1:T} | a_{1:T}).

    The model records a_t as Pyro hands it back; once all steps are recorded, one filter pass gives
    every step's log-density (masked steps: 0, missing observations) and the exact posterior of z.
    Before that (a model run without a guide) step t is filtered on the recorded prefix.
    """

    def __init__(self, model: KVAE, batch: int, T: int, like: torch.Tensor,
                 u: Optional[torch.Tensor], mask: Optional[torch.Tensor]):
        self.model, self.batch, self.T, self.u, self.mask = model, batch, T, u, mask
        self.dtype, self.device = like.dtype, like.device
        self.dim = model.a_dim
        self.values = [None] * T
        self.count = 0
        #: the recorded a (batch, T, a_dim) when recorded at once (a fused site)
        self._stacked = None
        self._post = None
        self._lp = None

    def record(self, t: int, value: torch.Tensor) -> torch.Tensor:
        self.count += self.values[t] is None
        self.values[t] = value
        self._stacked = self._post = self._lp = None
        return value

    def record_all(self, value: torch.Tensor) -> torch.Tensor:
        """Record a_{1:T} at once, ``value`` (batch, T, a_dim) (the fused site ``a``)."""
        if value is not self._stacked:
            self.values, self.count = list(value.unbind(1)), self.T
            self._stacked, self._post, self._lp = value, None, None
        return value

    def complete(self) -> bool:
        return self.count == self.T

    def stacked(self) -> torch.Tensor:
        if not self.complete():
            raise RuntimeError("kvae: a_t was not recorded at every step")
        return self._stacked if self._stacked is not None else torch.stack(self.values, 1)

    def step(self, t: int) -> "LDSMarginalStep":
        return LDSMarginalStep(self, t)

    def posterior(self):
        """p(z_{1:T} | a_{1:T}) (6.11) of the recorded a: a KalmanPosterior (filter shared)."""
        if self._post is None:
            if not self.complete():
                raise RuntimeError("kvae: a_t was not recorded at every step")
            self._post = self.model.exact_posterior(
                self.values if self._stacked is None else self._stacked, self.u, self.mask)
        return self._post

    def step_log_probs(self):
        if self._lp is None:
            self._lp = self.posterior().filtered.log_lik.unbind(1)
        return self._lp

    @exact
    def step_params(self, t: int):
        """(loc, scale_tril) of p(a_t | a_{1:t-1}) from the recorded prefix."""
        if any(v is None for v in self.values[:t]):
            raise RuntimeError(f"kvae: a_{t + 1} needs a_1..a_{t} recorded first")
        fill = torch.zeros(self.batch, self.dim, dtype=self.dtype, device=self.device)
        prefix = torch.stack(self.values[:t] + [fill], 1)
        u = None if self.u is None else self.u[:, :t + 1]
        ssm = self.model.ssm(prefix, u)
        obs = torch.ones(self.batch, t + 1, dtype=torch.bool, device=self.device)
        obs[:, t] = False
        if self.mask is not None:
            obs[:, :t] = self.mask[:, :t].bool()
        filt = ssm.filter(prefix.to(ssm.A.dtype), obs)
        C_t = ssm.C[:, t]
        loc = (C_t @ filt.pred_loc[:, t].unsqueeze(-1)).squeeze(-1)
        S = C_t @ filt.pred_cov[:, t] @ C_t.mT + ssm.R[:, t]
        return loc.to(self.dtype), cholesky(0.5 * (S + S.mT)).to(self.dtype)


class LDSMarginalStep(TorchDistribution):
    """Step t of :class:`LDSMarginal`: p(a_t | a_{1:t-1}), event shape (a_dim,)."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, marginal: LDSMarginal, t: int):
        self.marginal, self.t = marginal, t
        super().__init__(torch.Size([marginal.batch]), torch.Size([marginal.dim]),
                         validate_args=False)

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) == tuple(self.batch_shape):
            return self
        raise NotImplementedError(f"LDSMarginalStep cannot be expanded to {tuple(batch_shape)}")

    @property
    def mean(self):
        return self.marginal.step_params(self.t)[0]

    def rsample(self, sample_shape=torch.Size()):
        loc, tril = self.marginal.step_params(self.t)
        eps = torch.randn(torch.Size(sample_shape) + loc.shape, dtype=loc.dtype,
                          device=loc.device)
        return loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, value):
        m = self.marginal
        if m.values[self.t] is value and m.complete():
            return m.step_log_probs()[self.t]
        loc, tril = m.step_params(self.t)
        lp = _mvn_log_prob_tril(value, loc, tril)
        if m.mask is not None:
            lp = torch.where(m.mask[:, self.t].bool(), lp, lp.new_zeros(()))
        return lp


class LDSMarginalSite(TorchDistribution):
    """All steps of :class:`LDSMarginal` as one site (fused sites): p(a_{1:T}) = prod_t
    p(a_t | a_{1:t-1}), batch shape (batch,), event shape (T, a_dim); ``log_prob`` is the sum of
    the per-step log-densities (0 on masked steps).  A draw (the model run without a guide) is
    ancestral, step by step."""

    arg_constraints = {}
    support = constraints.independent(constraints.real_vector, 1)
    has_rsample = True

    def __init__(self, marginal: LDSMarginal):
        self.marginal = marginal
        super().__init__(torch.Size([marginal.batch]), torch.Size([marginal.T, marginal.dim]),
                         validate_args=False)

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) == tuple(self.batch_shape):
            return self
        raise NotImplementedError(f"LDSMarginalSite cannot be expanded to {tuple(batch_shape)}")

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise NotImplementedError("a fused site draws one sample per sequence")
        m = self.marginal
        for t in range(m.T):
            m.record(t, m.step(t).rsample())
        return m.stacked()

    def log_prob(self, value):
        m = self.marginal
        if not (m.complete() and value is m.stacked()):
            m.record_all(value)
        return m.posterior().filtered.log_lik.sum(-1)
