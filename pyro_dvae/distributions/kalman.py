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

Two ways over time, same results (equal to 1e-8 in float64, tested against each other and against
dense conditioning of the joint Gaussian):

- ``method="scan"``: the filter, the smoother and backward sampling are each an associative scan
  (Sarkka and Garcia-Fernandez 2021, "Temporal parallelization of Bayesian smoothers", IEEE TAC
  66(1), Lemmas 7-10).  Every step becomes an element -- for the filter the affine-Gaussian map
  p(z_t | z_{t-1}, a_t) with the information pair of p(a_t | z_{t-1}), for the smoother and the
  sampler the backward factor p(z_t | z_{t+1}, a_{1:t}) -- combined by an odd-even scan: 2 log2 T
  sequential levels of batched operations over all steps, about twice the matrix work of the
  recursion.  The scan's filtered moments then give the predicted moments, log-likelihoods and
  updates of every step in one vectorised pass with the recursion's formulas, so the PD safeguards
  of :func:`cholesky` apply to every covariance that is factored.
- ``method="sequential"``: the step-by-step recursion.  On CPU the cost of batched 16 x 16 float64
  linear algebra grows with the number of matrices, not of calls (measured: one product over 4800
  matrices costs what 150 products over 32 do), so the recursion's smaller work wins there; the
  scan's shorter chain pays off where the levels run in parallel (an accelerator).
- ``method="auto"`` (default): the scan for tensors on an accelerator, the recursion on CPU.

Numerics: no explicit inverse of a covariance (a constant full R is whitened by the triangular
inverse of its Cholesky factor, a diagonal one by scaling).  The update (3.17) is in square-root
form in the state dimension: the observations are whitened once by R_t = L_R L_R^T, and with
P_{t|t-1} = U U^T, G = I + U^T C'^T C' U (eigenvalues >= 1) and V = U chol(G)^{-T},
P_{t|t} = V V^T (PSD by construction); the gain and the log-likelihood follow from Woodbury and the
determinant lemma.
Backward gains are Cholesky solves against P_{t|t-1}, the backward-conditional and smoothed
covariances are sums of positive semi-definite terms, all covariances are symmetrised, and every
factorisation goes through :func:`cholesky` (jitter, then projection onto the PD cone, for
matrices that rounding made indefinite).  Works in float32 and float64, batched over any leading
shape, and is differentiable with respect to every input.  Autocast is off inside (bf16 mixed
precision leaves this algebra in the dtype of its inputs: :func:`pyro_dvae.precision.exact`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Tuple

import pyro
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints, register_kl

from ..precision import exact

#: how the filter, smoother and backward sampler run over time (module docstring)
METHODS = ("auto", "scan", "sequential")

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
    # positive-definite cone (eigenvalues floored at 1e-12 x the largest) and factor that.  The
    # projection is added as a constant correction (differentiated as the identity, like a
    # jitter): the gradient of eigh is NaN where eigenvalues repeat (issue 12, item 7).
    with torch.no_grad():
        evals, evecs = torch.linalg.eigh(_sym(m))
        floor = evals.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(m.dtype).tiny) * 1e-12
        lift = _sym((evecs * (evals.clamp(min=floor) - evals).unsqueeze(-2)) @ evecs.mT)
    fixed = _sym(m) + lift
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


class _Observations(NamedTuple):
    """a_t = C_t z_t + v_t, v_t ~ N(0, R_t), whitened by R_t = L_R L_R^T once for all steps:
    C'_t = L_R^{-1} C_t, a'_t = L_R^{-1} a_t.  The updates then work in the state dimension only
    (L <= D in KVAE): Lambda_t = C'^T C' is the information that a_t carries about z_t."""

    #: C'_t^T, (..., T, L, D)
    Ct: torch.Tensor
    #: a'_t, (..., T, D)
    a: torch.Tensor
    #: Lambda_t = C'_t^T C'_t, (..., T, L, L)
    info: torch.Tensor
    #: zeta_t = C'_t^T a'_t, (..., T, L)
    zeta: torch.Tensor
    #: -log|L_R| - D/2 log 2 pi, (..., 1 or T)
    log_norm: torch.Tensor

    @staticmethod
    def whiten(C: torch.Tensor, R: torch.Tensor, a: torch.Tensor) -> "_Observations":
        """From C (..., T, D, L), R (..., 1 or T, D, D) and a (..., T, D)."""
        D = C.shape[-2]
        R = _sym(R)
        if R.dim() == 3 and R.shape[0] == 1 and not bool(torch.count_nonzero(
                R[0] - torch.diag_embed(torch.diagonal(R[0])))):
            # constant diagonal noise (KVAE's): scale rows
            L_R = torch.diag_embed(torch.diagonal(R[0]).sqrt())
            w = torch.diagonal(R[0]).rsqrt()
            Ct, aw = C.mT * w, a * w
        elif R.dim() == 3 and R.shape[0] == 1:
            # constant noise: one triangular inverse and GEMMs over all steps
            L_R = cholesky(R[0])
            W = torch.linalg.solve_triangular(
                L_R, torch.eye(D, dtype=R.dtype, device=R.device), upper=False).mT
            Ct, aw = C.mT @ W, a @ W                     # W = L_R^{-T}
        else:
            L_R = cholesky(R)
            Ct = torch.linalg.solve_triangular(L_R, C, upper=False).mT
            aw = torch.linalg.solve_triangular(L_R, a.unsqueeze(-1), upper=False).squeeze(-1)
        log_norm = (-torch.diagonal(L_R, dim1=-2, dim2=-1).log().sum(-1)
                    - 0.5 * D * math.log(2 * math.pi))
        return _Observations(Ct, aw, Ct @ Ct.mT, _mv(Ct, aw),
                             log_norm.expand(aw.shape[:-2] + (1,)) if log_norm.dim() == 0
                             else log_norm)


class _Update(NamedTuple):
    """Output of :func:`_update`."""

    loc: torch.Tensor
    cov: torch.Tensor
    #: log p(a | past), or None when not asked for
    log_lik: torch.Tensor | None
    #: Cholesky factor U of the predicted covariance
    pred_tril: torch.Tensor
    #: chol(G), G = I + U^T Lambda U
    tril_G: torch.Tensor
    #: V^T = L_G^{-1} U^T (V V^T = the updated covariance, before masking)
    Vt: torch.Tensor
    #: C'^T y' = zeta - Lambda m_pred (whitened innovation y' = a' - C' m_pred)
    r: torch.Tensor
    #: V^T r
    s: torch.Tensor


def _update(m_pred: torch.Tensor, P_pred: torch.Tensor, obs: _Observations,
            mask: torch.Tensor | None = None, log_lik: bool = True, cov: bool = True) -> _Update:
    """Measurement update (3.17) of N(m_pred, P_pred) by a = C z + v, in square-root form.

    With U U^T = P_pred and G = I + U^T Lambda U = L_G L_G^T (eigenvalues >= 1), V = U L_G^{-T}:
    the gain K y = V V^T C'^T y', the updated covariance P - K C P = V V^T (PSD by construction),
    and the log-likelihood is :func:`_log_lik`.  Works for one step (..., L) or all steps at once
    (..., T, L).  Where ``mask`` is False the prediction is kept (and the log-likelihood is 0).
    Without ``cov`` (or ``log_lik``) that output is None.
    """
    eye = torch.eye(P_pred.shape[-1], dtype=P_pred.dtype, device=P_pred.device)
    U = cholesky(P_pred)
    L_G = cholesky(eye + U.mT @ obs.info @ U)
    Vt = torch.linalg.solve_triangular(L_G, U.mT, upper=False)
    r = obs.zeta - _mv(obs.info, m_pred)
    s = _mv(Vt, r)
    m = m_pred + _mv(Vt.mT, s)
    P = _sym(Vt.mT @ Vt) if cov else None
    if mask is not None:
        m = torch.where(mask.unsqueeze(-1), m, m_pred)
        P = None if P is None else torch.where(mask[..., None, None], P, P_pred)
    ll = _log_lik(obs, m_pred, L_G, s, mask) if log_lik else None
    return _Update(m, P, ll, U, L_G, Vt, r, s)


def _log_lik(obs: _Observations, m_pred: torch.Tensor, L_G: torch.Tensor, s: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
    """log N(a; C m_pred, C P C^T + R) = -1/2 (|y'|^2 - |V^T C'^T y'|^2) - log|L_G| - log|L_R|
    - D/2 log 2 pi (determinant lemma and Woodbury), 0 where ``mask`` is False."""
    y = obs.a - _mv(obs.Ct.mT, m_pred)
    ll = (-0.5 * ((y ** 2).sum(-1) - (s ** 2).sum(-1))
          - torch.diagonal(L_G, dim1=-2, dim2=-1).log().sum(-1) + obs.log_norm)
    return ll if mask is None else torch.where(mask, ll, torch.zeros_like(ll))


# ---- associative scans over time (Sarkka and Garcia-Fernandez 2021) ---------------------------

Elements = Tuple[torch.Tensor, ...]


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """[even_0, odd_0, even_1, odd_1, ...] along dim 0 (len(even) - len(odd) is 0 or 1)."""
    n = odd.shape[0]
    out = torch.stack([even[:n], odd], 1).flatten(0, 1)
    return torch.cat([out, even[n:]], 0) if even.shape[0] > n else out


def associative_scan(combine: Callable[[Elements, Elements], Elements], elems: Elements,
                     reverse: bool = False) -> Elements:
    """Inclusive scan of ``elems`` (tensors with time on dim 0) under an associative ``combine``.

    ``combine(earlier, later)`` combines two equally long batches of elements, entry by entry.
    Forward: result_t = e_0 * e_1 * ... * e_t; ``reverse``: result_t = e_t * ... * e_{T-1}.
    Odd-even (Ladner-Fischer / Blelloch) recursion: ~2T combinations in 2 log2 T batched calls.
    """
    if reverse:
        flipped = associative_scan(lambda a, b: combine(b, a),
                                   tuple(e.flip(0) for e in elems))
        return tuple(e.flip(0) for e in flipped)
    n = elems[0].shape[0]
    if n < 2:
        return elems
    pairs = combine(tuple(e[0:n - 1:2] for e in elems), tuple(e[1::2] for e in elems))
    odd = associative_scan(combine, pairs)                # prefixes ending at 1, 3, 5, ...
    rest = tuple(e[2::2] for e in elems)                  # elements 2, 4, ...
    if rest[0].shape[0]:
        even = combine(tuple(o[:rest[0].shape[0]] for o in odd), rest)  # prefixes ending at 2, 4..
    else:
        even = rest
    return tuple(_interleave(torch.cat([e[:1], ev], 0), o) for e, ev, o in zip(elems, even, odd))


def _filter_combine(earlier: Elements, later: Elements) -> Elements:
    """Combination of two filtering elements (A, b, C, eta, J) (Sarkka and Garcia-Fernandez 2021,
    Lemma 8): with M = (I + C_i J_j)^{-1},

        A = A_j M A_i,  b = A_j M (b_i + C_i eta_j) + b_j,  C = A_j M C_i A_j^T + C_j,
        eta = A_i^T M^T (eta_j - J_j b_i) + eta_i,  J = A_i^T J_j M A_i + J_i

    (M^T = (I + J_j C_i)^{-1}; J_j M = M^T J_j).  I + C_i J_j has eigenvalues >= 1 (C, J PSD), so
    the LU solves are always defined.
    """
    A_i, b_i, C_i, eta_i, J_i = earlier
    A_j, b_j, C_j, eta_j, J_j = later
    L = A_i.shape[-1]
    eye = torch.eye(L, dtype=A_i.dtype, device=A_i.device)
    LU, piv = torch.linalg.lu_factor(eye + C_i @ J_j)
    rhs = torch.cat([A_i, C_i, (b_i + _mv(C_i, eta_j)).unsqueeze(-1)], -1)
    X = torch.linalg.lu_solve(LU, piv, rhs)
    MA, MC, Mb = X[..., :L], X[..., L:2 * L], X[..., 2 * L]
    y = torch.linalg.lu_solve(LU, piv, (eta_j - _mv(J_j, b_i)).unsqueeze(-1), adjoint=True)
    return (A_j @ MA, _mv(A_j, Mb) + b_j, _sym(A_j @ _sym(MC) @ A_j.mT + C_j),
            _mv(A_i.mT, y.squeeze(-1)) + eta_i, _sym(A_i.mT @ J_j @ MA + J_i))


def _backward_combine(earlier: Elements, later: Elements) -> Elements:
    """Combination of backward factors z_i | z_{i+1} ~ N(E_i z_{i+1} + g_i, L_i) with z_{i+1} |
    z_{k} ~ N(E_j z_k + g_j, L_j) into z_i | z_k (Lemma 10); without L, affine maps only."""
    E_i, g_i = earlier[:2]
    E_j, g_j = later[:2]
    out = (E_i @ E_j, _mv(E_i, g_j) + g_i)
    if len(earlier) == 2:
        return out
    return out + (_sym(E_i @ later[2] @ E_i.mT + earlier[2]),)


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
    #: Cholesky factor of pred_cov, (..., T, L, L) (None: not computed)
    pred_tril: torch.Tensor | None = None


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
    - ``method``: ``"scan"`` (parallel scan over time), ``"sequential"`` (the step-by-step
      recursion) or ``"auto"`` (the default: the scan on an accelerator, the recursion on CPU,
      where it was measured faster: module docstring); all give the same results.
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    @exact
    def __init__(self, init_loc, init_cov, A, C, Q, R, B=None, u=None, offset=None,
                 method: str = "auto", validate_args=None):
        if method not in METHODS:
            raise ValueError(f"Kalman method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "auto":
            method = "scan" if A.device.type != "cpu" else "sequential"
        #: "scan" or "sequential" (what "auto" resolved to)
        self.method = method
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
    @exact
    def filter(self, a: torch.Tensor, mask: torch.Tensor | None = None) -> KalmanFilterResult:
        """Forward pass: predicted and filtered moments and per-step log-likelihoods.

        ``a`` (..., T, D); ``mask`` (..., T) bool or 0/1, False/0 where a_t is missing.
        """
        if self.method == "sequential":
            return self._filter_sequential(a, mask)
        return self._filter_scan(a, mask)

    def _filter_sequential(self, a: torch.Tensor, mask: torch.Tensor | None) -> KalmanFilterResult:
        """The textbook recursion, one predict / update per step (the oracle of the scan)."""
        T = self.T
        shape = torch.broadcast_shapes(self.batch_shape, a.shape[:-2])
        m = self.init_loc.expand(shape + self.init_loc.shape[-1:])
        P = self.init_cov.expand(shape + self.init_cov.shape[-2:])
        obs = _Observations.whiten(self.C, self._R, a.expand(shape + a.shape[-2:]))
        out = {k: [] for k in ("pred_loc", "pred_cov", "loc", "root", "pred_tril", "L_G", "s")}
        # unbind the time dimension once: indexing inside the loop would make every step's
        # backward pass write a full-size zero gradient
        As = self.A.unbind(-3)
        Qs = self._Q.unbind(-3) if self._Q.shape[-3] > 1 else [self._Q[..., 0, :, :]] * T
        bs = self.offset.unbind(-2)
        info, zeta = obs.info.unbind(-3), obs.zeta.unbind(-2)
        mask = None if mask is None else mask.bool()
        mask_t = [None] * T if mask is None else mask.unbind(-1)
        root = None   # a square root of P_{t-1|t-1}: V of the update, or U where a_t is missing
        for t in range(T):
            # predict (3.16): z_t | a_{1:t-1}
            m_pred = _mv(As[t], m) + bs[t]
            if root is None:
                P_pred = _sym(As[t] @ P @ As[t].mT + Qs[t])
            else:
                X = As[t] @ root
                P_pred = _sym(X @ X.mT + Qs[t])
            upd = _update(m_pred, P_pred, _Observations(None, None, info[t], zeta[t], None),
                          mask_t[t], log_lik=False, cov=False)
            m, root = upd.loc, upd.Vt.mT
            if mask_t[t] is not None:
                root = torch.where(mask_t[t][..., None, None], root, upd.pred_tril)
            for k, v in zip(out, (m_pred, P_pred, m, root, upd.pred_tril, upd.tril_G, upd.s)):
                out[k].append(v)
        pred_loc = torch.stack(out["pred_loc"], -2)
        # what does not feed the recursion, for all steps at once: P_{t|t} = root root^T and the
        # log-likelihoods
        ll = _log_lik(obs, pred_loc, torch.stack(out["L_G"], -3), torch.stack(out["s"], -2),
                      mask)
        root = torch.stack(out["root"], -3)
        return KalmanFilterResult(
            pred_loc, torch.stack(out["pred_cov"], -3), torch.stack(out["loc"], -2),
            _sym(root @ root.mT), ll, torch.stack(out["pred_tril"], -3))

    def _filter_scan(self, a: torch.Tensor, mask: torch.Tensor | None) -> KalmanFilterResult:
        """The filter as a parallel scan (Sarkka and Garcia-Fernandez 2021, Lemmas 7-8).

        Element t is p(z_t | z_{t-1}, a_t) = N(A~_t z_{t-1} + b~_t, C~_t) with the information
        pair (eta_t, J_t) of p(a_t | z_{t-1}); element 1 conditions the prior (A~_1 = 0), a missing
        a_t gives the plain transition (A_t, B_t u_t, Q_t) and eta_t = 0, J_t = 0.  The prefix
        combination up to t has b~ = E[z_t | a_{1:t}] and C~ = Cov[z_t | a_{1:t}]; from those, one
        vectorised predict / update over all steps gives the result (same formulas as the
        sequential filter).
        """
        T, L = self.T, self.state_dim
        shape = torch.broadcast_shapes(self.batch_shape, a.shape[:-2])
        A = self.A.expand(shape + (T, L, L))
        b = self.offset.expand(shape + (T, L))
        Q = _sym(self._Q).expand(shape + (T, L, L))
        obs = _Observations.whiten(self.C.expand(shape + self.C.shape[-3:]), self._R,
                                   a.expand(shape + a.shape[-2:]))
        mask = None if mask is None else mask.bool().expand(shape + (T,))
        m0 = self.init_loc.expand(shape + (L,))
        P0 = self.init_cov.expand(shape + (L, L))
        # the elements: step 1 sees the prior through A~_1 = 0, b~ = m_{1|0}, C~ = P_{1|0}
        m1 = _mv(A[..., 0, :, :], m0) + b[..., 0, :]
        P1 = _sym(A[..., 0, :, :] @ P0 @ A[..., 0, :, :].mT + Q[..., 0, :, :])
        A_e = torch.cat([torch.zeros_like(A[..., :1, :, :]), A[..., 1:, :, :]], -3)
        b_e = torch.cat([m1.unsqueeze(-2), b[..., 1:, :]], -2)
        Q_e = torch.cat([P1.unsqueeze(-3), Q[..., 1:, :, :]], -3)
        el = _update(b_e, Q_e, obs, mask)
        # K C A~ = V V^T Lambda A~; J = A~^T C^T S^{-1} C A~ = A~^T Lambda A~ - X^T X with
        # X = V^T Lambda A~; eta = A~^T C^T S^{-1} y = A~^T r - X^T s
        LA = obs.info @ A_e
        X = el.Vt @ LA
        A_el = A_e - el.Vt.mT @ X
        eta = _mv(A_e.mT, el.r) - _mv(X.mT, el.s)
        J = _sym(A_e.mT @ LA - X.mT @ X)
        if mask is not None:
            A_el = torch.where(mask[..., None, None], A_el, A_e)
            eta = torch.where(mask.unsqueeze(-1), eta, torch.zeros_like(eta))
            J = torch.where(mask[..., None, None], J, torch.zeros_like(J))
        elems = (A_el.movedim(-3, 0), el.loc.movedim(-2, 0), el.cov.movedim(-3, 0),
                 eta.movedim(-2, 0), J.movedim(-3, 0))
        _, m_f, P_f, _, _ = associative_scan(_filter_combine, elems)
        m_prev = torch.cat([m0.unsqueeze(-2), m_f[:-1].movedim(0, -2)], -2)
        P_prev = torch.cat([P0.unsqueeze(-3), P_f[:-1].movedim(0, -3)], -3)
        pred_loc = _mv(A, m_prev) + b
        pred_cov = _sym(A @ P_prev @ A.mT + Q)
        upd = _update(pred_loc, pred_cov, obs, mask)
        return KalmanFilterResult(pred_loc, pred_cov, upd.loc, upd.cov, upd.log_lik,
                                  upd.pred_tril)

    def log_prob(self, a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(a_{1:T}) = sum_t log p(a_t | a_{1:t-1}) (observed steps only when masked)."""
        return self.filter(a, mask).log_lik.sum(-1)

    # ---- backward quantities ---------------------------------------------------------------------
    @exact
    def _backward(self, filt: KalmanFilterResult):
        """The factors N(z_t; c_t + J_t z_{t+1}, S_t) of p(z_t | z_{t+1}, a_{1:t}), t = 1..T.

        J_t = P_{t|t} A_{t+1}^T P_{t+1|t}^{-1} (a Cholesky solve), c_t = m_{t|t} - J_t m_{t+1|t},
        S_t = (I - J_t A_{t+1}) P_{t|t} (I - J_t A_{t+1})^T + J_t Q_{t+1} J_t^T (PSD by
        construction); for t = T, J_T = 0, c_T = m_{T|T}, S_T = P_{T|T}.  Returns (J, c, S),
        (..., T, L, L), (..., T, L), (..., T, L, L).
        """
        A_next = self.A[..., 1:, :, :]
        P = filt.cov[..., :-1, :, :]
        L_pred = (cholesky(filt.pred_cov[..., 1:, :, :]) if filt.pred_tril is None
                  else filt.pred_tril[..., 1:, :, :])
        J = torch.cholesky_solve(A_next @ P, L_pred).mT
        eye = torch.eye(self.state_dim, dtype=P.dtype, device=P.device)
        IJA = eye - J @ A_next
        if self._Q.dim() == 3 and self._Q.shape[0] == 1:
            JQ = J @ _sym(self._Q[0])          # constant Q: one GEMM over all steps
        else:
            JQ = J @ _sym(self._Q[..., 1:, :, :] if self._Q.shape[-3] > 1 else self._Q)
        cond_cov = _sym(IJA @ P @ IJA.mT + JQ @ J.mT)
        c = filt.loc[..., :-1, :] - _mv(J, filt.pred_loc[..., 1:, :])
        return (torch.cat([J, torch.zeros_like(filt.cov[..., -1:, :, :])], -3),
                torch.cat([c, filt.loc[..., -1:, :]], -2),
                torch.cat([cond_cov, filt.cov[..., -1:, :, :]], -3))

    @exact
    def smooth(self, a: torch.Tensor, mask: torch.Tensor | None = None,
               filt: KalmanFilterResult | None = None, factors=None) -> KalmanSmootherResult:
        """Rauch-Tung-Striebel smoother: p(z_t | a_{1:T}) and Cov[z_{t+1}, z_t | a_{1:T}].

        The marginals compose the backward factors of :meth:`_backward` from T down: by a reverse
        associative scan (Lemma 10 of Sarkka and Garcia-Fernandez 2021) or step by step.
        """
        filt = self.filter(a, mask) if filt is None else filt
        J, c, S = self._backward(filt) if factors is None else factors
        if self.method == "scan":
            _, loc, cov = (x.movedim(0, -1 - k) for x, k in zip(associative_scan(
                _backward_combine, (J.movedim(-3, 0), c.movedim(-2, 0), S.movedim(-3, 0)),
                reverse=True), (2, 1, 2)))
        else:
            locs, covs = [c[..., -1, :]], [S[..., -1, :, :]]
            Js, cs, Ss = J.unbind(-3), c.unbind(-2), S.unbind(-3)
            for t in range(self.T - 2, -1, -1):
                # E[z_t] = c_t + J_t E[z_{t+1}];  Cov[z_t] = E Cov[z_t | z_{t+1}] + Cov E[..]
                locs.append(cs[t] + _mv(Js[t], locs[-1]))
                covs.append(_sym(Ss[t] + Js[t] @ covs[-1] @ Js[t].mT))
            loc, cov = torch.stack(locs[::-1], -2), torch.stack(covs[::-1], -3)
        J = J[..., :-1, :, :]
        return KalmanSmootherResult(loc, cov, cov[..., 1:, :, :] @ J.mT, J)

    def posterior(self, a: torch.Tensor, mask: torch.Tensor | None = None) -> KalmanPosterior:
        """The exact posterior p(z_{1:T} | a_{1:T}) (6.11) as a :class:`KalmanPosterior`."""
        return KalmanPosterior(self, a, mask)

    # ---- sampling ---------------------------------------------------------------------------
    @exact
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
            offset=self.offset.expand(batch_shape + self.offset.shape[-2:]), method=self.method)


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
        self._factors = None
        self._smoothed = None
        self.T, self.dim = ssm.T, ssm.state_dim
        self.values = [None] * self.T
        self._count = 0
        self._step_log_prob = None
        self._draw = None
        super().__init__(self.filtered.loc.shape[:-2], torch.Size([self.T, self.dim]),
                         validate_args=validate_args)

    @exact
    def _backward_factors(self):
        """(J, c, S, chol S) of all T factors (J_T = 0, c_T = m_{T|T}, S_T = P_{T|T}), computed
        when first needed: the log-likelihood alone needs the filter only."""
        if self._factors is None:
            gain, offset, cond_cov = self.ssm._backward(self.filtered)
            self._factors = (gain, offset, cond_cov, cholesky(cond_cov))
        return self._factors

    @property
    def gain(self) -> torch.Tensor:
        """J_t of the factors p(z_t | z_{t+1}, a_{1:t}), (..., T, L, L)."""
        return self._backward_factors()[0]

    @property
    def offset(self) -> torch.Tensor:
        """c_t, (..., T, L)."""
        return self._backward_factors()[1]

    @property
    def cond_cov(self) -> torch.Tensor:
        """S_t, (..., T, L, L)."""
        return self._backward_factors()[2]

    @property
    def scale_tril(self) -> torch.Tensor:
        """chol S_t, (..., T, L, L)."""
        return self._backward_factors()[3]

    @property
    def smoothed(self) -> KalmanSmootherResult:
        if self._smoothed is None:
            self._smoothed = self.ssm.smooth(self.a, self.mask, filt=self.filtered,
                                             factors=(self.gain, self.offset, self.cond_cov))
        return self._smoothed

    @property
    def mean(self):
        return self.smoothed.loc

    def log_likelihood(self) -> torch.Tensor:
        """log p(a_{1:T}) (observed steps), (...)."""
        return self.filtered.log_lik.sum(-1)

    @exact
    def conditional(self, t: int, z_next: torch.Tensor | None):
        """(loc, scale_tril) of p(z_t | z_{t+1}, a_{1:t}); t is 0-based, z_next None at t = T-1."""
        loc = self.offset[..., t, :]
        if z_next is not None:
            loc = loc + _mv(self.gain[..., t, :, :], z_next)
        return loc, self.scale_tril[..., t, :, :]

    @exact
    def rsample(self, sample_shape=torch.Size()):
        """z_t = c_t + J_t z_{t+1} + S_t^{1/2} eps_t from t = T down (reparameterised): a reverse
        associative scan of these affine maps, or step by step."""
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        eps = torch.randn(shape, dtype=self.offset.dtype, device=self.offset.device)
        if self.ssm.method == "scan":
            c = self.offset + _mv(self.scale_tril, eps)
            J = self.gain.expand(c.shape[:-1] + self.gain.shape[-2:])
            return associative_scan(_backward_combine, (J.movedim(-3, 0), c.movedim(-2, 0)),
                                    reverse=True)[1].movedim(0, -2)
        z, zs = None, []
        cs, gains = (self.offset + _mv(self.scale_tril, eps)).unbind(-2), self.gain.unbind(-3)
        for t in range(self.T - 1, -1, -1):
            z = cs[t] if z is None else cs[t] + _mv(gains[t], z)
            zs.append(z)
        return torch.stack(zs[::-1], -2)

    @exact
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

    def draw_step(self, t: int) -> torch.Tensor:
        """A draw of z_t | z_{t+1} for the per-step sites: step T draws all of z_{1:T} at once
        (:meth:`rsample`, one scan) and every later step hands out its entry while the recorded
        z_{t+1} is that draw's (so a site conditioned to another value gets a fresh draw)."""
        if t == self.T - 1:
            self._draw = self.rsample().unbind(-2)
        elif self._draw is None or self.values[t + 1] is not self._draw[t + 1]:
            return None
        return self._draw[t]

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

    @exact
    def rsample(self, sample_shape=torch.Size()):
        if not sample_shape:
            z = self.posterior.draw_step(self.t)
            if z is not None:
                return z
        loc, tril = self._params()
        eps = torch.randn(torch.Size(sample_shape) + loc.shape, dtype=loc.dtype,
                          device=loc.device)
        return loc + _mv(tril, eps)

    @exact
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


# ---- KL divergence for TraceMeanField_ELBO --------------------------------------------------------
# A model whose prior over z_{1:T} is the guide's exact posterior (KVAE: p(z | a) in both, one
# object) has KL(q || p) = 0 at every step, identically in the parameters: registering it lets
# TraceMeanField_ELBO take that exact 0 instead of log q - log p (the same value, 0, computed from
# the backward factors, the sampler and their gradients, which cancel between model and guide).
# Any other pair is left to the Monte Carlo term (NotImplementedError).
@register_kl(KalmanStep, KalmanStep)
def _kl_kalman_step(q: KalmanStep, p: KalmanStep):
    if q.posterior is p.posterior and q.t == p.t:
        return q.posterior.filtered.loc.new_zeros(q.batch_shape)  # no backward factors needed
    raise NotImplementedError
