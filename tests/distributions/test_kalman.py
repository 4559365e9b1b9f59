"""The Kalman filter / RTS smoother / FFBS posterior against independent references.

References: the dense joint Gaussian of (z_{1:T}, a_{1:T}) built by hand and conditioned with plain
linear algebra (float64); ``pyro.distributions.GaussianHMM`` for the log-likelihood; Monte Carlo
moments with tolerances from their standard errors; finite differences (``gradcheck``); and
Trace_ELBO of a linear-Gaussian DKF whose guide is the exact posterior.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_dvae.distributions.kalman import LinearGaussianSSM
from pyro_dvae.models.base import DVAE, Guide
from pyro_dvae.nn import shift_right


def _spd(*shape, scale=1.0, jitter=0.1, gen=None):
    n = shape[-1]
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return scale * (x @ x.mT) / n + jitter * torch.eye(n, dtype=torch.float64)


def random_ssm(batch=(2,), T=5, L=3, D=2, U=2, seed=0, time_invariant_noise=False,
               method="auto"):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    A = 0.5 * torch.randn(*batch, T, L, L, **kw) / math.sqrt(L) + 0.7 * torch.eye(
        L, dtype=torch.float64)
    C = torch.randn(*batch, T, D, L, **kw)
    B = torch.randn(*batch, T, L, U, **kw)
    u = torch.randn(*batch, T, U, **kw)
    if time_invariant_noise:
        Q, R = _spd(L, L, gen=g), _spd(D, D, gen=g)
    else:
        Q, R = _spd(*batch, T, L, L, gen=g), _spd(*batch, T, D, D, gen=g)
    m0 = torch.randn(*batch, L, **kw)
    P0 = _spd(*batch, L, L, scale=2.0, gen=g)
    ssm = LinearGaussianSSM(m0, P0, A, C, Q, R, B=B, u=u, method=method)
    _, a = ssm.rsample_joint()
    return ssm, a


def dense_joint(ssm, b):
    """Mean and covariance of (z_{1:T}, a_{1:T}) for batch element b, as linear maps of noise."""
    T, L, D = ssm.T, ssm.state_dim, ssm.obs_dim
    n = L + T * L + T * D   # s = (z_0 - m_0, w_1..w_T, v_1..v_T), zero mean
    cov_s = torch.zeros(n, n, dtype=torch.float64)
    cov_s[:L, :L] = ssm.init_cov[b]
    for t in range(T):
        i = L + t * L
        cov_s[i:i + L, i:i + L] = ssm.Q[b, t]
        j = L + T * L + t * D
        cov_s[j:j + D, j:j + D] = ssm.R[b, t]
    Mz, cz = torch.zeros(L, n, dtype=torch.float64), ssm.init_loc[b].clone()
    Mz[:, :L] = torch.eye(L)
    rows_z, rows_a, mz, ma = [], [], [], []
    for t in range(T):
        Mz = ssm.A[b, t] @ Mz
        Mz[:, L + t * L:L + (t + 1) * L] += torch.eye(L, dtype=torch.float64)
        cz = ssm.A[b, t] @ cz + ssm.offset[b, t]
        Ma = ssm.C[b, t] @ Mz
        Ma[:, L + T * L + t * D:L + T * L + (t + 1) * D] += torch.eye(D, dtype=torch.float64)
        rows_z.append(Mz.clone())
        rows_a.append(Ma)
        mz.append(cz.clone())
        ma.append(ssm.C[b, t] @ cz)
    M = torch.cat(rows_z + rows_a, 0)
    return torch.cat(mz + ma), M @ cov_s @ M.T


def dense_posterior(ssm, a, b, mask=None):
    """Mean (T, L) and covariance (T*L, T*L) of z_{1:T} | observed a_t, and log p(observed a)."""
    T, L, D = ssm.T, ssm.state_dim, ssm.obs_dim
    mean, cov = dense_joint(ssm, b)
    nz = T * L
    obs = torch.ones(T, dtype=torch.bool) if mask is None else mask[b].bool()
    idx = torch.tensor([nz + t * D + d for t in range(T) if obs[t] for d in range(D)],
                       dtype=torch.long)
    a_obs = a[b].reshape(-1)[idx - nz]
    S_zz, S_za, S_aa = cov[:nz, :nz], cov[:nz][:, idx], cov[idx][:, idx]
    if not len(idx):   # nothing observed: the prior
        return mean[:nz].reshape(T, L), S_zz, torch.zeros((), dtype=torch.float64)
    gain = torch.linalg.solve(S_aa, S_za.T).T
    post_mean = mean[:nz] + gain @ (a_obs - mean[idx])
    post_cov = S_zz - gain @ S_za.T
    loglik = dist.MultivariateNormal(mean[idx], S_aa).log_prob(a_obs)
    return post_mean.reshape(T, L), post_cov, loglik


METHODS = ["scan", "sequential"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("time_invariant_noise", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_smoother_matches_dense_conditioning(masked, time_invariant_noise, method):
    ssm, a = random_ssm(time_invariant_noise=time_invariant_noise, method=method)
    mask = None
    if masked:
        mask = torch.tensor([[True, False, True, True, False], [True, True, True, False, False]])
    sm = ssm.smooth(a, mask)
    post = ssm.posterior(a, mask)
    loglik = ssm.log_prob(a, mask)
    T, L = ssm.T, ssm.state_dim
    for b in range(2):
        mean, cov, ll = dense_posterior(ssm, a, b, mask)
        assert torch.allclose(sm.loc[b], mean, atol=1e-8, rtol=0)
        for t in range(T):
            blk = cov[t * L:(t + 1) * L, t * L:(t + 1) * L]
            assert torch.allclose(sm.cov[b, t], blk, atol=1e-8, rtol=0)
        for t in range(T - 1):
            cross = cov[(t + 1) * L:(t + 2) * L, t * L:(t + 1) * L]   # Cov(z_{t+1}, z_t)
            assert torch.allclose(sm.cross_cov[b, t], cross, atol=1e-8, rtol=0)
        assert abs(loglik[b].item() - ll.item()) < 1e-8
        # the FFBS joint density is the dense posterior density
        z = post.rsample()
        dense_lp = dist.MultivariateNormal(mean.reshape(-1), cov).log_prob(z[b].reshape(-1))
        assert abs(post.log_prob(z)[b].item() - dense_lp.item()) < 1e-8
    assert torch.allclose(post.mean, sm.loc)


@pytest.mark.parametrize("method", METHODS)
def test_filter_matches_dense_filtering_marginals(method):
    ssm, a = random_ssm(method=method)
    filt = ssm.filter(a)
    for t in range(ssm.T):
        # p(z_t | a_{1:t}): condition the truncated model
        sub = LinearGaussianSSM(ssm.init_loc, ssm.init_cov, ssm.A[:, :t + 1], ssm.C[:, :t + 1],
                                ssm.Q[:, :t + 1], ssm.R[:, :t + 1],
                                offset=ssm.offset[:, :t + 1], method=method)
        for b in range(2):
            mean, cov, _ = dense_posterior(sub, a[:, :t + 1], b)
            L = ssm.state_dim
            assert torch.allclose(filt.loc[b, t], mean[t], atol=1e-8, rtol=0)
            assert torch.allclose(filt.cov[b, t], cov[t * L:, t * L:], atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_loglik_matches_gaussian_hmm(method):
    ssm, a = random_ssm(batch=(3,), T=7, L=3, D=2, method=method)
    hmm = dist.GaussianHMM(
        dist.MultivariateNormal(ssm.init_loc, ssm.init_cov),
        ssm.A.mT,                                          # (old, new) convention
        dist.MultivariateNormal(ssm.offset, ssm.Q),
        ssm.C.mT,
        dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), ssm.R))
    assert torch.allclose(ssm.log_prob(a), hmm.log_prob(a), atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_posterior_sample_moments(method):
    """FFBS sample mean and covariance (all pairs of (t, i), (s, j)) against the exact ones."""
    ssm, a = random_ssm(batch=(1,), T=5, L=2, D=2, method=method)
    post = ssm.posterior(a)
    mean, cov, _ = dense_posterior(ssm, a, 0)
    N = 40000
    pyro.set_rng_seed(1)
    z = post.rsample((N,))[:, 0].reshape(N, -1)           # (N, T*L)
    m_hat = z.mean(0)
    var = torch.diagonal(cov)
    # 5 standard errors: a false alarm has probability < 1e-6 per entry
    assert ((m_hat - mean.reshape(-1)).abs() <= 5 * (var / N).sqrt()).all()
    zc = z - mean.reshape(-1)                              # centred at the exact mean
    c_hat = zc.T @ zc / N
    se = ((var[:, None] * var[None, :] + cov ** 2) / N).sqrt()   # sd of a Gaussian product mean
    assert ((c_hat - cov).abs() <= 5 * se).all()


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_finite_differences(method):
    ssm, a = random_ssm(batch=(1,), T=5, L=2, D=2, method=method)
    A0, C0, Q0, R0 = (ssm.A.clone(), ssm.C.clone(), ssm.Q[:, 0].clone(), ssm.R[:, 0].clone())

    def f(A, C, Q, R):
        s = LinearGaussianSSM(ssm.init_loc, ssm.init_cov, A, C, Q, R, offset=ssm.offset,
                              method=method)
        post = s.posterior(a)
        torch.manual_seed(3)
        z = post.rsample()
        return s.log_prob(a), post.mean, post.smoothed.cov, post.log_prob(z), z

    inputs = [t.requires_grad_() for t in (A0, C0, Q0, R0)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_float32_long_sequence_is_stable(method):
    """KVAE-sized problem (T 150, L 16, D 32) in float32 agrees with float64."""
    g = torch.Generator().manual_seed(0)
    T, L, D = 150, 16, 32
    A = torch.eye(L, dtype=torch.float64) + 0.05 * torch.randn(4, T, L, L, generator=g,
                                                               dtype=torch.float64)
    C = 0.05 * torch.randn(4, T, D, L, generator=g, dtype=torch.float64)
    Q, R = 0.08 * torch.eye(L, dtype=torch.float64), 0.03 * torch.eye(D, dtype=torch.float64)
    m0, P0 = torch.zeros(L, dtype=torch.float64), 20 * torch.eye(L, dtype=torch.float64)
    a = torch.randn(4, T, D, generator=g, dtype=torch.float64)
    s64 = LinearGaussianSSM(m0, P0, A, C, Q, R, method=method)
    s32 = LinearGaussianSSM(*(t.float() for t in (m0, P0, A, C, Q, R)), method=method)
    p64, p32 = s64.posterior(a), s32.posterior(a.float())
    assert torch.isfinite(p32.smoothed.cov).all()
    ll64, ll32 = s64.log_prob(a), s32.log_prob(a.float())
    assert torch.allclose(ll32.double(), ll64, rtol=1e-4)
    assert torch.allclose(p32.mean.double(), p64.mean, atol=1e-2, rtol=1e-3)
    z = p32.rsample()
    lp = p32.log_prob(z)
    assert torch.isfinite(lp).all()
    assert torch.allclose(lp.double(), p64.log_prob(z.double()), rtol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_step_views_match_joint_density(method):
    ssm, a = random_ssm(method=method)
    post = ssm.posterior(a)
    z = post.rsample()
    total = 0
    for t in range(ssm.T - 1, -1, -1):
        step = post.step(t)
        post.record(t, z[:, t])
        total = total + step.log_prob(z[:, t].clone())     # per-step path
    assert torch.allclose(total, post.log_prob(z), atol=1e-10)
    vec = sum(post.step(t).log_prob(post.values[t]) for t in range(ssm.T))  # vectorised path
    assert torch.allclose(vec, post.log_prob(z), atol=1e-10)
    with pytest.raises(RuntimeError, match="must be sampled before"):
        post2 = ssm.posterior(a)
        post2.step(0).rsample()


# ---- the smoother as an exact guide of a linear-Gaussian DKF ---------------------------------

class LinearDKF(DVAE):
    """z_t = A z_{t-1} + w_t (z_0 = 0), x_t = C z_t + v_t, diagonal noise: a linear DKF."""

    name = "linear-dkf"

    def __init__(self, A, C, q, r):
        super().__init__(x_dim=C.shape[0], z_dim=A.shape[0], likelihood="gaussian")
        self.A, self.C = nn.Parameter(A), nn.Parameter(C)
        self.log_q, self.log_r = nn.Parameter(q.log()), nn.Parameter(r.log())

    def prior(self, z, ctx, x, u):
        return shift_right(z) @ self.A.T, self.log_q.mul(0.5).exp().expand_as(z)

    def emission(self, z, ctx, x, u):
        return torch.cat([z @ self.C.T, self.log_r.expand(z.shape[:-1] + (self.x_dim,))], -1)

    def ssm(self, T, q_factor=1.0):
        L = self.z_dim
        zeros = self.A.new_zeros(L)
        return LinearGaussianSSM(zeros, torch.diag(zeros), self.A.expand(T, L, L),
                                 self.C.expand(T, self.x_dim, L),
                                 torch.diag(q_factor * self.log_q.exp()),
                                 torch.diag(self.log_r.exp()))


class KalmanGuide(Guide):
    """The exact posterior p(z_{1:T} | x_{1:T}) of LinearDKF, sites z_T, ..., z_1."""

    name = "kalman"
    q_factor = 1.0

    def guide(self, x, u=None, mask=None):
        self.model.ssm(x.shape[1], self.q_factor).posterior(x).sample_sites("z")


def test_smoother_is_an_exact_guide_of_a_linear_dkf():
    g = torch.Generator().manual_seed(0)
    L, D, T = 3, 4, 20
    A = 0.9 * torch.eye(L, dtype=torch.float64) + 0.1 * torch.randn(L, L, generator=g,
                                                                     dtype=torch.float64)
    C = torch.randn(D, L, generator=g, dtype=torch.float64)
    q = torch.rand(L, generator=g, dtype=torch.float64) + 0.1
    r = torch.rand(D, generator=g, dtype=torch.float64) + 0.1
    model = LinearDKF(A, C, q, r).double()
    guide = KalmanGuide(model)
    x = model.ssm(T).expand((5,)).rsample().detach()
    # z_0 = 0: GaussianHMM's first transition matrix is zero, so z_1 ~ N(0, Q)
    trans = torch.cat([torch.zeros(1, L, L, dtype=torch.float64), A.T.expand(T - 1, L, L)])
    hmm = dist.GaussianHMM(
        dist.Normal(torch.zeros(L, dtype=torch.float64), 1.0).to_event(1), trans,
        dist.Normal(torch.zeros(L, dtype=torch.float64), q.sqrt()).to_event(1), C.T,
        dist.Normal(torch.zeros(D, dtype=torch.float64), r.sqrt()).to_event(1))
    exact = hmm.log_prob(x).sum().item()
    assert abs(model.ssm(T).log_prob(x).sum().item() - exact) < 1e-8
    elbo = Trace_ELBO()
    samples = [-elbo.loss(model.model, guide, x) for _ in range(10)]
    assert all(abs(s - exact) < 1e-10 * abs(exact) for s in samples), (samples, exact)
    # a genuine check: the smoother of a wrong model (Q doubled) is a strictly worse, noisy guide
    guide.q_factor = 2.0
    wrong = [-elbo.loss(model.model, guide, x) for _ in range(10)]
    assert max(wrong) < exact - 1e-3
    assert max(wrong) - min(wrong) > 1e-3


def test_cholesky_jitter_only_where_needed():
    from pyro_dvae.distributions.kalman import cholesky

    good = _spd(3, 3)
    v = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float32)
    singular = torch.outer(v, v) - 1e-9 * torch.eye(3)        # indefinite by rounding
    L = cholesky(torch.stack([good.float(), singular]))
    assert torch.equal(L[0], torch.linalg.cholesky(good.float()))
    assert torch.isfinite(L[1]).all()
    assert torch.allclose(L[1] @ L[1].T, singular, atol=1e-4)


def test_cholesky_projects_rounding_indefinite_matrices_and_refuses_nan():
    """A covariance whose rounding error exceeds any relative jitter (seen when a learned KVAE
    transition had eigenvalues above 1) is projected onto the PD cone, not refused; NaN is."""
    from pyro_dvae.distributions.kalman import cholesky

    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    m = q @ torch.diag(torch.tensor([1.0, 1.0, -1e-6], dtype=torch.float64)) @ q.T
    good = torch.eye(3, dtype=torch.float64) * 2
    L = cholesky(torch.stack([good, m]))
    assert torch.isfinite(L).all()
    assert torch.equal(L[0], torch.linalg.cholesky(good))       # untouched where it factors
    assert torch.allclose(L[1] @ L[1].T, m, atol=2e-6)           # within the rounding it fixes
    with pytest.raises(torch.linalg.LinAlgError, match="non-finite"):
        cholesky(torch.full((3, 3), float("nan"), dtype=torch.float64))


def test_cholesky_jitter_is_per_matrix_and_monotone():
    """Matrices needing different jitter levels in one batch all get factored (a matrix fixed at
    a small jitter keeps it while another one needs more: no oscillation)."""
    from pyro_dvae.distributions.kalman import cholesky

    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    mats = [q @ torch.diag(torch.tensor([1e16, 1e15, 1.0, neg], dtype=torch.float64)) @ q.T
            for neg in (-1e-2, -3e2, -1e5)]
    m = torch.stack(mats)
    assert (torch.linalg.cholesky_ex(m).info > 0).all()
    L = cholesky(m)
    scale = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1)
    err = (L @ L.mT - m).abs().amax((-1, -2)) / scale
    assert torch.isfinite(L).all() and (err < 1e-7).all()


# ---- the parallel scan against the sequential recursion ---------------------------------------

def _both(ssm):
    """The same model with each method."""
    return [LinearGaussianSSM(ssm.init_loc, ssm.init_cov, ssm.A, ssm.C, ssm._Q, ssm._R,
                              offset=ssm.offset, method=m) for m in METHODS]


def _outputs(ssm, a, mask, seed=5):
    post = ssm.posterior(a, mask)
    torch.manual_seed(seed)
    z = post.rsample((2,))
    sm = post.smoothed
    return [*post.filtered[:5], sm.loc, sm.cov, sm.cross_cov, post.gain, post.offset,
            post.scale_tril, z, post.log_prob(z)]


@pytest.mark.parametrize("T", [1, 2, 3, 8, 33])
@pytest.mark.parametrize("masking", ["none", "random", "first", "all"])
def test_scan_equals_sequential(T, masking):
    """Every output (filter, smoother, backward factors, a draw with the same noise, its density)
    of the scan equals the recursion's to 1e-8 in float64, for any T and mask pattern; and both
    equal dense conditioning."""
    ssm, a = random_ssm(batch=(3,), T=T, L=3, D=4, seed=T)
    g = torch.Generator().manual_seed(T)
    mask = {"none": None, "random": torch.rand(3, T, generator=g) > 0.4,
            "first": torch.arange(T).expand(3, T) > 0,
            "all": torch.zeros(3, T, dtype=torch.bool)}[masking]
    scan, seq = _both(ssm)
    for x, y in zip(_outputs(scan, a, mask), _outputs(seq, a, mask)):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=1e-8, rtol=0), (x - y).abs().max()
    sm = scan.smooth(a, mask)
    for b in range(3):
        mean, cov, ll = dense_posterior(ssm, a, b, mask)
        assert torch.allclose(sm.loc[b], mean, atol=1e-8, rtol=0)
        blocks = torch.stack([cov[t * 3:(t + 1) * 3, t * 3:(t + 1) * 3] for t in range(T)])
        assert torch.allclose(sm.cov[b], blocks, atol=1e-8, rtol=0)
        assert abs(scan.log_prob(a, mask)[b].item() - ll.item()) < 1e-8


def test_scan_gradients_equal_sequential():
    ssm, a = random_ssm(batch=(2,), T=11, L=3, D=2, seed=3)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 4:7] = False
    grads = []
    for method in METHODS:
        A, C, off = (x.clone().requires_grad_() for x in (ssm.A, ssm.C, ssm.offset))
        s = LinearGaussianSSM(ssm.init_loc, ssm.init_cov, A, C, ssm._Q, ssm._R, offset=off,
                              method=method)
        post = s.posterior(a, mask)
        torch.manual_seed(0)
        z = post.rsample()
        (post.log_likelihood().sum() + post.log_prob(z).sum() + z.sum()
         + post.smoothed.cov.sum()).backward()
        grads.append([A.grad, C.grad, off.grad])
    for g_scan, g_seq in zip(*grads):
        assert torch.allclose(g_scan, g_seq, atol=1e-8, rtol=0)


def test_scan_with_unstable_dynamics_and_long_padding():
    """The case that crashed KVAE on speech16k (a learned A with eigenvalues above 1 over long
    stretches of padding: predicted covariances ~1e7 next to R ~ 0.03) gives the recursion's
    results in float64, finite in float32, with finite gradients."""
    g = torch.Generator().manual_seed(0)
    T, L, D = 150, 4, 5
    A = 1.07 * torch.eye(L, dtype=torch.float64) + 0.01 * torch.randn(2, T, L, L, generator=g,
                                                                       dtype=torch.float64)
    C = 0.05 * torch.randn(2, T, D, L, generator=g, dtype=torch.float64)
    Q, R = 0.08 * torch.eye(L, dtype=torch.float64), 0.03 * torch.eye(D, dtype=torch.float64)
    a = torch.randn(2, T, D, generator=g, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 10:] = False
    m0, P0 = torch.zeros(L, dtype=torch.float64), 20 * torch.eye(L, dtype=torch.float64)
    outs = {}
    for method in METHODS:
        s = LinearGaussianSSM(m0, P0, A, C, Q, R, method=method)
        outs[method] = _outputs(s, a, mask)
        assert s.filter(a, mask).pred_cov.abs().max() > 1e7
    for x, y in zip(outs["scan"], outs["sequential"]):
        assert torch.allclose(x, y, rtol=1e-8, atol=1e-8 * y.abs().max().item())
    A32 = A.float().requires_grad_()
    s32 = LinearGaussianSSM(m0.float(), P0.float(), A32, C.float(), Q.float(), R.float(),
                            method="scan")
    post = s32.posterior(a.float(), mask)
    z = post.rsample()
    loss = post.log_likelihood().sum() + post.log_prob(z).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(A32.grad).all()


def test_associative_scan_orders():
    """The scan helper against a running product of non-commuting matrices, both directions."""
    from pyro_dvae.distributions.kalman import associative_scan

    g = torch.Generator().manual_seed(0)
    for n in range(1, 12):
        M = torch.randn(n, 2, 2, generator=g, dtype=torch.float64)
        fwd = associative_scan(lambda x, y: (x[0] @ y[0],), (M,))[0]
        rev = associative_scan(lambda x, y: (x[0] @ y[0],), (M,), reverse=True)[0]
        for t in range(n):
            prefix = torch.linalg.multi_dot([*M[:t + 1], torch.eye(2, dtype=torch.float64)])
            suffix = torch.linalg.multi_dot([*M[t:], torch.eye(2, dtype=torch.float64)])
            assert torch.allclose(fwd[t], prefix) and torch.allclose(rev[t], suffix)


@pytest.mark.parametrize("method", METHODS)
def test_sites_draw_at_once_but_condition_exactly(method):
    """The per-step sites hand out one joint draw (site values are its entries) and a site
    conditioned to another value makes the earlier steps draw from p(z_t | z_{t+1}) afresh."""
    ssm, a = random_ssm(T=6, method=method)

    def guide():
        ssm.posterior(a).sample_sites("z")

    tr = pyro.poutine.trace(guide).get_trace()
    zs = [tr.nodes[f"z_{t}"]["value"] for t in range(1, 7)]
    assert all(z._base is zs[0]._base for z in zs)          # views of one draw
    fixed = torch.full((2, 3), 50.0, dtype=torch.float64)
    torch.manual_seed(0)
    tr2 = pyro.poutine.trace(pyro.poutine.condition(guide, data={"z_4": fixed})).get_trace()
    post = ssm.posterior(a)
    z3 = tr2.nodes["z_3"]["value"]
    loc, _ = post.conditional(2, fixed)
    # z_3 | z_4 = 50 is centred on c + J 50, far from the unconditioned draw
    assert (z3 - loc).abs().max() < 10 and (z3 - zs[2]).abs().max() > 1


def test_cholesky_projection_has_a_finite_gradient():
    """Issue 12 item 7: the PD projection (through eigh) of diag(1, 1, -1e-3) gave a finite
    factor and an all-NaN gradient (eigh's gradient at a repeated eigenvalue); now the gradient
    is that of the Cholesky factor at the projected matrix (the projection counts as a constant
    correction, as a jitter does)."""
    from pyro_dvae.distributions.kalman import cholesky

    m = torch.diag(torch.tensor([1.0, 1.0, -1e-3], dtype=torch.float64)).requires_grad_()
    L = cholesky(m)
    weights = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    (weights * L).sum().backward()
    assert torch.isfinite(L).all() and torch.isfinite(m.grad).all()
    fixed = (L @ L.mT).detach().requires_grad_()
    (weights * torch.linalg.cholesky(fixed)).sum().backward()
    assert torch.allclose(m.grad, fixed.grad, rtol=1e-10, atol=0)
    assert m.grad.abs().max() > 0
