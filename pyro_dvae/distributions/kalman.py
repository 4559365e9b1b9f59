"""Exact inference in linear-Gaussian state-space models (the LG-LDS of 3.2, KVAE's 6.1-6.4).

The model, with time-varying matrices (Murphy 2012, 18.3; Bishop 2006, 13.3)::

    z_0 ~ N(m_0, P_0)
    z_t = A_t z_{t-1} + B_t u_t + w_t,   w_t ~ N(0, Q_t)        (3.16, 6.1-6.2)
    a_t = C_t z_t + v_t,                  v_t ~ N(0, R_t)        (3.17, 6.3-6.4)     t = 1..T

z_0 is marginalised (it is not a site); the first transition uses A_1, B_1, u_1, so that in KVAE's
predictive mode u_1 = a_0 = 0.  This is the convention of ``pyro.distributions.GaussianHMM``, whose
matrices are however (old, new): its ``transition_matrix`` is A_t^T, ``observation_matrix`` C_t^T.

- :class:`LinearGaussianSSM` is the distribution of a_{1:T} (event shape (T, D)): ``log_prob`` is
  the Kalman-filter log-likelihood sum_t log p(a_t | a_{1:t-1}); ``filter`` gives the filtered and
  predicted moments, ``smooth`` the Rauch-Tung-Striebel marginals p(z_t | a_{1:T}) and lag-one
  cross-covariances, ``posterior`` the joint posterior p(z_{1:T} | a_{1:T}) (6.11).
- :class:`KalmanPosterior` is p(z_{1:T} | a_{1:T}) (event shape (T, L)), factorised backwards as
  p(z_T | a_{1:T}) prod_{t<T} p(z_t | z_{t+1}, a_{1:t}) (forward filtering, backward sampling):
  reparameterised ``rsample``, the exact joint ``log_prob``, and per-step views :class:`KalmanStep`
  for Pyro sites ``z_T, z_{T-1}, ..., z_1`` (in that order) so a guide can emit the exact posterior
  of KVAE (6.12-6.13) one site per step.

Missing observations: a ``mask`` (..., T), False where a_t is missing (padded frames), skips the
update at those steps; the log-likelihood then is that of the observed a_t only, and the posterior
conditions on them only.

Numerics: no explicit inverse.  Every gain is a Cholesky solve (``cholesky_solve``) against the
innovation covariance S_t = C_t P_{t|t-1} C_t^T + R_t or the predicted covariance P_{t|t-1}; the
covariance update uses the Joseph form (I - K C) P (I - K C)^T + K R K^T and the smoothed and
backward-conditional covariances are written as sums of positive semi-definite terms; all
covariances are symmetrised.  Works in float32 and float64, batched over any leading shape, and is
differentiable with respect to every input.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

__all__ = [
    "KalmanFilterResult",
    "KalmanPosterior",
    "KalmanSmootherResult",
    "KalmanStep",
    "LinearGaussianSSM",
]


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.transpose(-1, -2))


def _mv(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (m @ v.unsqueeze(-1)).squeeze(-1)


def cholesky(m: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a symmetric positive-definite matrix (batched).

    If rounding made some matrix of the batch numerically indefinite (float32, a nearly singular
    covariance), a jitter of 10 eps x mean diagonal x I is added to those matrices only, growing
    tenfold up to seven times (at most ~2e-8 of the mean variance in float64: a learned transition
    with eigenvalues above 1 can make covariances very ill-conditioned over long unobserved
    stretches); exact-arithmetic results are never changed otherwise.
    """
    tril, info = torch.linalg.cholesky_ex(m)
    if not bool((info > 0).any()):
        return tril
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    scale = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1).abs()[..., None, None]
    level = torch.finfo(m.dtype).eps * 10
    jitter = torch.zeros_like(scale)  # per matrix; only ever raised where factoring still fails
    for _ in range(8):
        jitter = torch.where((info > 0)[..., None, None], level * scale, jitter)
        tril, info = torch.linalg.cholesky_ex(m + jitter * eye)
        if not bool((info > 0).any()):
            return tril
        level *= 10
    if not bool(torch.isfinite(m).all()):
        raise torch.linalg.LinAlgError("covariance has non-finite entries (diverged parameters?)")
    # Last resort: rounding in a product of large and small factors left negative eigenvalues
    # bigger than any jitter relative to the result's own scale; project those matrices onto the
    # positive-definite cone (eigenvalues floored at 1e-12 x the largest) and factor that.
    evals, evecs = torch.linalg.eigh(_sym(m))
    floor = evals.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(m.dtype).tiny) * 1e-12
    fixed = _sym((evecs * evals.clamp(min=floor).unsqueeze(-2)) @ evecs.mT)
    tril2, info2 = torch.linalg.cholesky_ex(torch.where((info > 0)[..., None, None], fixed,
                                                        m + jitter * eye))
    if not bool((info2 > 0).any()):
        return tril2
    raise torch.linalg.LinAlgError("covariance is not positive definite (even with jitter)")


def _psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """A square root S (S S^T = cov): the Cholesky factor, or from eigh if cov is singular."""
    tril, info = torch.linalg.cholesky_ex(_sym(cov))
    if bool((info == 0).all()):
        return tril
    evals, evecs = torch.linalg.eigh(_sym(cov))
    return evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)


def _mvn_log_prob_tril(value: torch.Tensor, loc: torch.Tensor,
                       scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(value; loc, L L^T) with L lower triangular, over the last dimension."""
    diff = (value - loc).unsqueeze(-1)
    w = torch.linalg.solve_triangular(scale_tril, diff, upper=False).squeeze(-1)
    half_log_det = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (w ** 2).sum(-1) - half_log_det - 0.5 * value.shape[-1] * math.log(2 * math.pi)


class KalmanFilterResult(NamedTuple):
    """Kalman filter output; t = 1..T along dimension -2 (loc) or -3 (cov)."""

    #: E[z_t | a_{1:t-1}], (..., T, L)
    pred_loc: torch.Tensor
    #: Cov[z_t | a_{1:t-1}], (..., T, L, L)
    pred_cov: torch.Tensor
    #: E[z_t | a_{1:t}], (..., T, L)
    loc: torch.Tensor
    #: Cov[z_t | a_{1:t}], (..., T, L, L)
    cov: torch.Tensor
    #: log p(a_t | a_{1:t-1}), (..., T); 0 where a_t is missing
    log_lik: torch.Tensor


class KalmanSmootherResult(NamedTuple):
    """Rauch-Tung-Striebel smoother output."""

    #: E[z_t | a_{1:T}], (..., T, L)
    loc: torch.Tensor
    #: Cov[z_t | a_{1:T}], (..., T, L, L)
    cov: torch.Tensor
    #: Cov[z_{t+1}, z_t | a_{1:T}] for t = 1..T-1, (..., T-1, L, L)
    cross_cov: torch.Tensor
    #: smoother gains J_t = P_{t|t} A_{t+1}^T P_{t+1|t}^{-1}, (..., T-1, L, L)
    gain: torch.Tensor


class LinearGaussianSSM(TorchDistribution):
    """Distribution of a_{1:T} under the LG-LDS of this module (event shape (T, D)).

    Arguments (``...`` = batch shape, broadcast between arguments):

    - ``init_loc`` (..., L), ``init_cov`` (..., L, L): m_0, P_0 of z_0 (P_0 may be 0).
    - ``A`` (..., T, L, L), ``C`` (..., T, D, L): transition and emission matrices A_t, C_t.
    - ``Q`` (..., T, L, L) or (L, L), ``R`` (..., T, D, D) or (D, D): noise covariances, positive
      definite (a 2-dim matrix is time-invariant).
    - ``B`` (..., T, L, U) with ``u`` (..., T, U): input matrices and inputs; or ``offset``
      (..., T, L) = B_t u_t directly.  Both are optional (no input).
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, init_loc, init_cov, A, C, Q, R, B=None, u=None, offset=None,
                 validate_args=None):
        L, D = A.shape[-1], C.shape[-2]
        if A.shape[-2:] != (L, L) or C.shape[-1] != L:
            raise ValueError(f"A must be (..., T, L, L) and C (..., T, D, L); got A "
                             f"{tuple(A.shape)}, C {tuple(C.shape)}")
        T = A.shape[-3]
        if C.shape[-3] not in (1, T):
            raise ValueError(f"A has {T} steps but C has {C.shape[-3]}")
        Q = Q.unsqueeze(-3) if Q.dim() == 2 else Q
        R = R.unsqueeze(-3) if R.dim() == 2 else R
        if Q.shape[-2:] != (L, L) or R.shape[-2:] != (D, D):
            raise ValueError(f"Q must be (L, L) = ({L}, {L}) and R (D, D) = ({D}, {D}); got Q "
                             f"{tuple(Q.shape)}, R {tuple(R.shape)}")
        if B is not None:
            if u is None:
                raise ValueError("B was given without inputs u")
            bu = _mv(B, u)
            offset = bu if offset is None else offset + bu
        if offset is None:
            offset = A.new_zeros(A.shape[:-1])
        batch_shape = torch.broadcast_shapes(
            init_loc.shape[:-1], init_cov.shape[:-2], A.shape[:-3], C.shape[:-3], Q.shape[:-3],
            R.shape[:-3], offset.shape[:-2])
        bt = batch_shape + (T,)
        self.init_loc = init_loc.expand(batch_shape + (L,))
        self.init_cov = init_cov.expand(batch_shape + (L, L))
        self.A = A.expand(bt + (L, L))
        self.C = C.expand(bt + (D, L))
        self.Q = Q.expand(bt + (L, L))
        self.R = R.expand(bt + (D, D))
        # unexpanded (time dim 1 or T): constant noise then gets one gradient, not T x batch
        self._Q, self._R = Q, R
        self.offset = offset.expand(bt + (L,))
        self.T, self.state_dim, self.obs_dim = T, L, D
        super().__init__(batch_shape, torch.Size([T, D]), validate_args=validate_args)

    # ---- Kalman filter -------------------------------------------------------------------------
    def filter(self, a: torch.Tensor, mask: torch.Tensor | None = None) -> KalmanFilterResult:
        """Forward pass: predicted and filtered moments and per-step log-likelihoods.

        ``a`` (..., T, D); ``mask`` (..., T) bool or 0/1, False/0 where a_t is missing.
        """
        T = self.T
        eye = torch.eye(self.state_dim, dtype=a.dtype, device=a.device)
        shape = torch.broadcast_shapes(self.batch_shape, a.shape[:-2])
        m = self.init_loc.expand(shape + self.init_loc.shape[-1:])
        P = self.init_cov.expand(shape + self.init_cov.shape[-2:])
        const = 0.5 * self.obs_dim * math.log(2 * math.pi)
        out = {k: [] for k in KalmanFilterResult._fields}
        # unbind the time dimension once: indexing inside the loop would make every step's
        # backward pass write a full-size zero gradient
        As, Cs = self.A.unbind(-3), self.C.unbind(-3)
        Qs, Rs = (x.unbind(-3) if x.shape[-3] > 1 else [x[..., 0, :, :]] * T
                  for x in (self._Q, self._R))
        bs, ys = self.offset.unbind(-2), a.unbind(-2)
        obs_t = None if mask is None else mask.bool().unbind(-1)
        for t in range(T):
            A_t, C_t, R_t = As[t], Cs[t], Rs[t]
            # predict (3.16): z_t | a_{1:t-1}
            m_pred = _mv(A_t, m) + bs[t]
            P_pred = _sym(A_t @ P @ A_t.mT + Qs[t])
            # update (3.17): innovation y_t, S_t = C P C^T + R, gain K = P C^T S^{-1}
            y = ys[t] - _mv(C_t, m_pred)
            PCt = P_pred @ C_t.mT
            S = _sym(C_t @ PCt + R_t)
            L_S = cholesky(S)
            K = torch.cholesky_solve(PCt.mT, L_S).mT
            m_new = m_pred + _mv(K, y)
            IKC = eye - K @ C_t
            P_new = _sym(IKC @ P_pred @ IKC.mT + K @ R_t @ K.mT)  # Joseph form
            w = torch.linalg.solve_triangular(L_S, y.unsqueeze(-1), upper=False).squeeze(-1)
            ll = (-0.5 * (w ** 2).sum(-1)
                  - torch.diagonal(L_S, dim1=-2, dim2=-1).log().sum(-1) - const)
            if obs_t is not None:
                obs = obs_t[t]
                m = torch.where(obs.unsqueeze(-1), m_new, m_pred)
                P = torch.where(obs[..., None, None], P_new, P_pred)
                ll = torch.where(obs, ll, torch.zeros_like(ll))
            else:
                m, P = m_new, P_new
            for k, v in zip(KalmanFilterResult._fields, (m_pred, P_pred, m, P, ll)):
                out[k].append(v)
        return KalmanFilterResult(
            torch.stack(out["pred_loc"], -2), torch.stack(out["pred_cov"], -3),
            torch.stack(out["loc"], -2), torch.stack(out["cov"], -3),
            torch.stack(out["log_lik"], -1))

    def log_prob(self, a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(a_{1:T}) = sum_t log p(a_t | a_{1:t-1}) (observed steps only when masked)."""
        return self.filter(a, mask).log_lik.sum(-1)

    # ---- backward quantities ---------------------------------------------------------------------
    def _backward(self, filt: KalmanFilterResult):
        """Gains J_t and conditional covariances of p(z_t | z_{t+1}, a_{1:t}) for t = 1..T-1.

        J_t = P_{t|t} A_{t+1}^T P_{t+1|t}^{-1} (a Cholesky solve), and
        Cov = (I - J_t A_{t+1}) P_{t|t} (I - J_t A_{t+1})^T + J_t Q_{t+1} J_t^T (PSD by
        construction).
        """
        A_next = self.A[..., 1:, :, :]
        P = filt.cov[..., :-1, :, :]
        L_pred = cholesky(filt.pred_cov[..., 1:, :, :])
        J = torch.cholesky_solve(A_next @ P, L_pred).mT
        eye = torch.eye(self.state_dim, dtype=P.dtype, device=P.device)
        IJA = eye - J @ A_next
        Q_next = self._Q[..., 1:, :, :] if self._Q.shape[-3] > 1 else self._Q
        cond_cov = _sym(IJA @ P @ IJA.mT + J @ Q_next @ J.mT)
        return J, cond_cov

    def smooth(self, a: torch.Tensor, mask: torch.Tensor | None = None,
               filt: KalmanFilterResult | None = None) -> KalmanSmootherResult:
        """Rauch-Tung-Striebel smoother: p(z_t | a_{1:T}) and Cov[z_{t+1}, z_t | a_{1:T}]."""
        filt = self.filter(a, mask) if filt is None else filt
        J, cond_cov = self._backward(filt)
        locs, covs, cross = [filt.loc[..., -1, :]], [filt.cov[..., -1, :, :]], []
        Js, conds = J.unbind(-3), cond_cov.unbind(-3)
        f_locs, p_locs = filt.loc.unbind(-2), filt.pred_loc.unbind(-2)
        for t in range(self.T - 2, -1, -1):
            J_t = Js[t]
            m_next, P_next = locs[-1], covs[-1]
            locs.append(f_locs[t] + _mv(J_t, m_next - p_locs[t + 1]))
            # Cov[z_t] = E Cov[z_t | z_{t+1}] + Cov E[z_t | z_{t+1}]
            covs.append(_sym(conds[t] + J_t @ P_next @ J_t.mT))
            cross.append(P_next @ J_t.mT)
        loc = torch.stack(locs[::-1], -2)
        cov = torch.stack(covs[::-1], -3)
        if cross:
            cross_cov = torch.stack(cross[::-1], -3)
        else:
            cross_cov = cov.new_zeros(cov.shape[:-3] + (0,) + cov.shape[-2:])
        return KalmanSmootherResult(loc, cov, cross_cov, J)

    def posterior(self, a: torch.Tensor, mask: torch.Tensor | None = None) -> KalmanPosterior:
        """The exact posterior p(z_{1:T} | a_{1:T}) (6.11) as a :class:`KalmanPosterior`."""
        return KalmanPosterior(self, a, mask)

    # ---- sampling ---------------------------------------------------------------------------
    def rsample_joint(self, sample_shape=torch.Size()):
        """Ancestral sample (z_{1:T}, a_{1:T}), each (sample_shape + batch_shape, T, .)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        L, D = self.state_dim, self.obs_dim
        dtype, device = self.A.dtype, self.A.device

        def noise(cov, dim):
            eps = torch.randn(shape + (dim,), dtype=dtype, device=device)
            return _mv(torch.linalg.cholesky(cov), eps)

        z = self.init_loc.expand(shape + (L,)) + _mv(_psd_sqrt(self.init_cov), torch.randn(
            shape + (L,), dtype=dtype, device=device))
        zs, as_ = [], []
        for t in range(self.T):
            z = (_mv(self.A[..., t, :, :], z) + self.offset[..., t, :]
                 + noise(self.Q[..., t, :, :], L))
            zs.append(z)
            as_.append(_mv(self.C[..., t, :, :], z) + noise(self.R[..., t, :, :], D))
        return torch.stack(zs, -2), torch.stack(as_, -2)

    def rsample(self, sample_shape=torch.Size()):
        return self.rsample_joint(sample_shape)[1]

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) == tuple(self.batch_shape):
            return self
        batch_shape = torch.Size(batch_shape)
        return LinearGaussianSSM(
            self.init_loc.expand(batch_shape + self.init_loc.shape[-1:]),
            self.init_cov.expand(batch_shape + self.init_cov.shape[-2:]),
            self.A.expand(batch_shape + self.A.shape[-3:]),
            self.C.expand(batch_shape + self.C.shape[-3:]),
            self.Q.expand(batch_shape + self.Q.shape[-3:]),
            self.R.expand(batch_shape + self.R.shape[-3:]),
            offset=self.offset.expand(batch_shape + self.offset.shape[-2:]))


class KalmanPosterior(TorchDistribution):
    """p(z_{1:T} | a_{1:T}) of a :class:`LinearGaussianSSM`, event shape (T, L).

    Factorised backwards (forward filtering, backward sampling)::

        p(z_{1:T} | a_{1:T}) = N(z_T; m_{T|T}, P_{T|T}) prod_{t<T} N(z_t; c_t + J_t z_{t+1}, S_t)

    with c_t = m_{t|t} - J_t m_{t+1|t} and S_t the conditional covariance of
    :meth:`LinearGaussianSSM._backward`: the factor of z_t depends on z_{t+1} and a_{1:t} only.
    ``rsample`` is reparameterised, ``log_prob`` is the exact joint log-density, ``mean`` the RTS
    smoothed means, ``smoothed`` the full smoother output.

    Per-step Pyro sites: ``posterior.sample_sites("z")`` emits ``z_T, z_{T-1}, ..., z_1`` (this
    order; each site conditioned on the previous one), or do it by hand with :meth:`step` and
    :meth:`record`.  Per-step log-densities are computed in one vectorised pass once all steps are
    recorded.  (No mask on these sites: a missing a_t only changes the posterior itself.)
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, ssm: LinearGaussianSSM, a: torch.Tensor,
                 mask: torch.Tensor | None = None, validate_args=None):
        self.ssm, self.a, self.mask = ssm, a, mask
        self.filtered = ssm.filter(a, mask)
        J, cond_cov = ssm._backward(self.filtered)
        f = self.filtered
        # all T factors: J_T = 0, c_T = m_{T|T}, S_T = P_{T|T}
        self.gain = torch.cat([J, torch.zeros_like(f.cov[..., -1:, :, :])], -3)
        c = f.loc[..., :-1, :] - _mv(J, f.pred_loc[..., 1:, :])
        self.offset = torch.cat([c, f.loc[..., -1:, :]], -2)
        self.cond_cov = torch.cat([cond_cov, f.cov[..., -1:, :, :]], -3)
        self.scale_tril = cholesky(self.cond_cov)
        self._smoothed = None
        self.T, self.dim = ssm.T, ssm.state_dim
        self.values = [None] * self.T
        self._count = 0
        self._step_log_prob = None
        super().__init__(self.offset.shape[:-2], torch.Size([self.T, self.dim]),
                         validate_args=validate_args)

    @property
    def smoothed(self) -> KalmanSmootherResult:
        if self._smoothed is None:
            self._smoothed = self.ssm.smooth(self.a, self.mask, filt=self.filtered)
        return self._smoothed

    @property
    def mean(self):
        return self.smoothed.loc

    def log_likelihood(self) -> torch.Tensor:
        """log p(a_{1:T}) (observed steps), (...)."""
        return self.filtered.log_lik.sum(-1)

    def conditional(self, t: int, z_next: torch.Tensor | None):
        """(loc, scale_tril) of p(z_t | z_{t+1}, a_{1:t}); t is 0-based, z_next None at t = T-1."""
        loc = self.offset[..., t, :]
        if z_next is not None:
            loc = loc + _mv(self.gain[..., t, :, :], z_next)
        return loc, self.scale_tril[..., t, :, :]

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        eps = torch.randn(shape, dtype=self.offset.dtype, device=self.offset.device)
        z, zs = None, []
        offsets, gains = self.offset.unbind(-2), self.gain.unbind(-3)
        trils, eps = self.scale_tril.unbind(-3), eps.unbind(-2)
        for t in range(self.T - 1, -1, -1):
            z = offsets[t] + _mv(trils[t], eps[t]) + (0 if z is None else _mv(gains[t], z))
            zs.append(z)
        return torch.stack(zs[::-1], -2)

    def _factor_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z_t | z_{t+1}, a_{1:t}) for every t, (..., T)."""
        z_next = torch.cat([z[..., 1:, :], torch.zeros_like(z[..., :1, :])], -2)
        loc = self.offset + _mv(self.gain, z_next)
        return _mvn_log_prob_tril(z, loc, self.scale_tril)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self._factor_log_prob(z).sum(-1)

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) == tuple(self.batch_shape):
            return self
        raise NotImplementedError("KalmanPosterior cannot be expanded to a new batch shape")

    # ---- per-step sites -------------------------------------------------------------------
    def step(self, t: int) -> KalmanStep:
        """The factor p(z_t | z_{t+1}, a_{1:t}) of step t (0-based) as a distribution."""
        return KalmanStep(self, t)

    def record(self, t: int, value: torch.Tensor) -> torch.Tensor:
        self._count += self.values[t] is None
        self.values[t] = value
        self._step_log_prob = None
        return value

    def complete(self) -> bool:
        return self._count == self.T

    def stacked(self) -> torch.Tensor:
        if not self.complete():
            missing = [t + 1 for t, v in enumerate(self.values) if v is None]
            raise RuntimeError(f"values of steps {missing[:5]} were never recorded")
        return torch.stack(self.values, -2)

    def step_log_probs(self) -> torch.Tensor:
        """log p(z_t | z_{t+1}, a_{1:t}) of the recorded values, (..., T), computed once."""
        if self._step_log_prob is None:
            # one unbind: per-step values as a single autograd node
            self._step_log_prob = self._factor_log_prob(self.stacked()).unbind(-1)
        return self._step_log_prob

    def sample_sites(self, name: str = "z") -> torch.Tensor:
        """Emit Pyro sites ``name_T, ..., name_1`` (backward sampling); returns z (..., T, L)."""
        for t in pyro.markov(range(self.T - 1, -1, -1)):
            self.record(t, pyro.sample(f"{name}_{t + 1}", self.step(t)))
        return self.stacked()


class KalmanStep(TorchDistribution):
    """Step t of a :class:`KalmanPosterior`: N(z_t; c_t + J_t z_{t+1}, S_t), event shape (L,).

    Needs z_{t+1} recorded first (steps are emitted from T down to 1).
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, posterior: KalmanPosterior, t: int):
        self.posterior, self.t = posterior, t
        super().__init__(posterior.batch_shape, torch.Size([posterior.dim]), validate_args=False)

    def _params(self):
        post, t = self.posterior, self.t
        z_next = None
        if t < post.T - 1:
            z_next = post.values[t + 1]
            if z_next is None:
                raise RuntimeError(f"z_{t + 2} must be sampled before z_{t + 1} "
                                   "(KalmanPosterior steps go from T down to 1)")
        return post.conditional(t, z_next)

    @property
    def mean(self):
        return self._params()[0]

    @property
    def scale_tril(self):
        return self._params()[1]

    @property
    def covariance_matrix(self):
        return self.posterior.cond_cov[..., self.t, :, :]

    def rsample(self, sample_shape=torch.Size()):
        loc, tril = self._params()
        eps = torch.randn(torch.Size(sample_shape) + loc.shape, dtype=loc.dtype,
                          device=loc.device)
        return loc + _mv(tril, eps)

    def log_prob(self, value):
        post = self.posterior
        if post.values[self.t] is value and post.complete():
            return post.step_log_probs()[self.t]
        loc, tril = self._params()
        return _mvn_log_prob_tril(value, loc, tril)

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) == tuple(self.batch_shape):
            return self  # keeps Pyro's plate from wrapping the view
        raise NotImplementedError(
            f"KalmanStep cannot be expanded from {tuple(self.batch_shape)} to {tuple(batch_shape)}")
