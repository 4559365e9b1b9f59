"""The ELBO machinery is exact where it can be checked in closed form.

A linear-Gaussian state-space model written with the DVAE base class (T = 2, z and x of dimension
2; diagonal matrices so the exact posterior conditionals are diagonal Gaussians) and a guide that
is its exact posterior, computed here by dense linear algebra on the joint Gaussian of (z, x):

- every Trace_ELBO sample equals log p(x) (zero variance), since log p(x, z) - log q(z) = log p(x);
- TraceMeanField_ELBO (analytic per-step KL) has mean log p(x), checked within 5 standard errors.

The importance-weighted bound of :func:`pyro_dvae.evaluate_nll` (Burda et al. 2016) against the
same oracle: with the exact posterior as guide it is log p(x) for every K; with an inexact guide
(the exact posterior of a shifted x, a Gaussian whose ELBO is known in closed form) its K = 1 mean
is the ELBO, its mean does not decrease with K and approaches log p(x), and its reported standard
error matches the spread of independent estimates.
"""

import math

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import MultivariateNormal

from pyro_dvae import evaluate_nll
from pyro_dvae.models.base import DVAE, Guide
from pyro_dvae.nn import shift_right

torch.set_default_dtype(torch.float64)
A = torch.tensor([0.8, -0.5])
C = torch.tensor([1.5, 0.7])
Q = torch.tensor([0.6, 1.2])   # transition noise std
R = torch.tensor([0.4, 0.9])   # emission noise std
S1 = torch.tensor([1.0, 0.8])  # std of z_1
torch.set_default_dtype(torch.float32)


class LinearGaussian(DVAE):
    """z_1 ~ N(0, S1^2), z_t = A z_{t-1} + Q eps, x_t = C z_t + R eps (diagonal)."""

    name = "lg-test"

    def __init__(self):
        super().__init__(x_dim=2, z_dim=2, likelihood="gaussian")

    def prior(self, z, ctx, x, u):
        loc = shift_right(z) * A
        scale = torch.ones_like(z) * Q
        scale = torch.cat([torch.ones_like(z[:, :1]) * S1, scale[:, 1:]], 1)
        return loc, scale

    def emission(self, z, ctx, x, u):
        return torch.cat([z * C, torch.log(R ** 2).expand_as(z)], -1)


def joint(T):
    """Dense covariance of (z_{1:T}, x_{1:T}) per dimension d: a (2T, 2T) matrix each."""
    covs = []
    for d in range(2):
        L = torch.zeros(2 * T, 2 * T)  # (z, x) = L @ eps with eps ~ N(0, I)
        for t in range(T):
            row = (A[d] * L[t - 1]) if t else torch.zeros(2 * T)
            L[t] = row
            L[t, t] += S1[d] if t == 0 else Q[d]
            L[T + t] = C[d] * L[t]
            L[T + t, T + t] += R[d]
        covs.append(L @ L.T)
    return covs


class ExactGuide(Guide):
    """q(z_t | z_{t-1}, x) = p(z_t | z_{t-1}, x_{1:T}), from dense Gaussian conditioning."""

    name = "exact"

    def __init__(self, model):
        super().__init__(model)

    def guide(self, x, u=None, mask=None):
        T = x.shape[1]
        covs = joint(T)

        def step(t, z_prev):
            locs, scales = [], []
            for d in range(2):
                S = covs[d]
                # condition z_t on (z_{1:t-1}, x_{1:T}); Markov: only z_{t-1} matters, but
                # conditioning on all earlier z is exact too and needs no assumption
                zs = list(range(t))
                obs_idx = zs + list(range(T, 2 * T))
                obs_val = torch.cat([self._z[:, :t, d], x[:, :, d]], 1)
                S_oo = S[obs_idx][:, obs_idx]
                S_to = S[t, obs_idx]
                w = torch.linalg.solve(S_oo, S_to)
                locs.append(obs_val @ w)
                scales.append(torch.sqrt(S[t, t] - S_to @ w).expand(x.shape[0]))
            return torch.stack(locs, -1), torch.stack(scales, -1)

        self._z = x.new_zeros(x.shape[0], T, 2)

        def recording_step(t, z_prev):
            if t:
                self._z[:, t - 1] = z_prev
            return step(t, z_prev)

        self.sample_chain("z", x, mask, recording_step)


def exact_log_marginal(x):
    T = x.shape[1]
    total = 0.0
    for d, S in enumerate(joint(T)):
        Sx = S[T:, T:]
        total = total + MultivariateNormal(torch.zeros(T), Sx).log_prob(x[:, :, d])
    return total


@pytest.fixture
def setup():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_trace_elbo_is_exact_for_the_exact_posterior(setup):
    model = LinearGaussian().double()
    guide = ExactGuide(model)
    x = torch.tensor([[[0.3, -1.2], [1.1, 0.4]]])
    log_px = exact_log_marginal(x).item()
    samples = [-Trace_ELBO().loss(model.model, guide, x) for _ in range(20)]
    for s in samples:
        assert s == pytest.approx(log_px, abs=1e-10)


def test_meanfield_elbo_mean_matches(setup):
    model = LinearGaussian().double()
    guide = ExactGuide(model)
    x = torch.tensor([[[0.3, -1.2], [1.1, 0.4]]])
    log_px = exact_log_marginal(x).item()
    n = 2000
    samples = torch.tensor([-TraceMeanField_ELBO().loss(model.model, guide, x) for _ in range(n)])
    se = samples.std().item() / math.sqrt(n)
    assert samples.std().item() > 0  # the estimator is stochastic: the check is not vacuous
    assert abs(samples.mean().item() - log_px) < 5 * se


def test_wrong_guide_is_a_strict_bound(setup):
    """Sanity of the oracle: a guide that is not the posterior gives ELBO < log p(x)."""
    model = LinearGaussian().double()

    class Shifted(ExactGuide):
        def guide(self, x, u=None, mask=None):
            super().guide(x + 0.5, u, mask)

    x = torch.tensor([[[0.3, -1.2], [1.1, 0.4]]])
    elbo = torch.tensor([-TraceMeanField_ELBO().loss(model.model, Shifted(model), x)
                         for _ in range(500)]).mean()
    assert elbo < exact_log_marginal(x).item() - 0.05


class ShiftedGuide(ExactGuide):
    """q(z | x) = p(z | x + shift): the exact posterior of another observation (inexact)."""

    shift = 0.5

    def guide(self, x, u=None, mask=None):
        super().guide(x + self.shift, u, mask)


def exact_elbo(x, shift):
    """ELBO of :class:`ShiftedGuide` by dense linear algebra: q = N(mu(x + shift), Sigma_post) per
    dimension, E_q log p(z, x) = log N((mu, x); 0, S) - tr(S^-1_zz Sigma_post) / 2, plus H[q]."""
    T = x.shape[1]
    total = 0.0
    for d, S in enumerate(joint(T)):
        xd = x[0, :, d]
        Szx, Sxx, Szz = S[:T, T:], S[T:, T:], S[:T, :T]
        mu = Szx @ torch.linalg.solve(Sxx, xd + shift)
        Sq = Szz - Szx @ torch.linalg.solve(Sxx, Szx.T)
        m = torch.cat([mu, xd])
        total += (MultivariateNormal(torch.zeros(2 * T), S).log_prob(m)
                  - 0.5 * torch.trace(torch.linalg.inv(S)[:T, :T] @ Sq)
                  + 0.5 * (T * math.log(2 * math.pi * math.e) + torch.logdet(Sq)))
    return float(total)


X = [[[0.3, -1.2], [1.1, 0.4]]]


def test_exact_elbo_oracle(setup):
    """The closed-form ELBO is log p(x) at shift 0 and the mean of Trace_ELBO at shift 0.5."""
    x = torch.tensor(X)
    assert exact_elbo(x, 0.0) == pytest.approx(exact_log_marginal(x).item(), abs=1e-10)
    model = LinearGaussian().double()
    batch = x.repeat(50, 1, 1)  # each sample: the mean of 50 independent ELBO draws
    samples = torch.tensor([-Trace_ELBO().loss(model.model, ShiftedGuide(model), batch) / 50
                            for _ in range(40)])
    se = samples.std().item() / math.sqrt(len(samples))
    assert abs(samples.mean().item() - exact_elbo(x, 0.5)) < 4 * se


@pytest.mark.parametrize("K", [1, 7, 100])
def test_iw_bound_of_the_exact_posterior_is_log_px(setup, K):
    model = LinearGaussian().double()
    x = torch.tensor(X).repeat(3, 1, 1)
    result = evaluate_nll(model, ExactGuide(model), x, K=K)
    log_px = exact_log_marginal(x)
    assert torch.allclose(result.log_px, log_px, atol=1e-10, rtol=0)
    assert result.per_step == pytest.approx(log_px.sum().item() / 6, abs=1e-10)
    if K > 1:  # all weights are p(x): no Monte-Carlo error, every particle counts
        assert result.std_error.abs().max() < 1e-10
        assert torch.allclose(result.ess, torch.full((3,), float(K), dtype=torch.float64))


def test_iw_bound_with_one_particle_is_the_elbo_in_expectation(setup):
    model = LinearGaussian().double()
    x = torch.tensor(X)
    n = 2000  # independent estimates: n copies of x, one particle each
    result = evaluate_nll(model, ShiftedGuide(model), x.repeat(n, 1, 1), K=1)
    se = result.log_px.std().item() / math.sqrt(n)
    assert result.log_px.std().item() > 0.5  # stochastic: the check is not vacuous
    assert abs(result.log_px.mean().item() - exact_elbo(x, 0.5)) < 4 * se
    assert torch.equal(result.elbo, result.log_px) and torch.isnan(result.std_error).all()


def test_iw_bound_increases_with_K_towards_log_px(setup):
    model = LinearGaussian().double()
    x = torch.tensor(X)
    log_px, elbo = exact_log_marginal(x).item(), exact_elbo(x, 0.5)
    n = 200
    means, ses = [], []
    for K in (1, 10, 100, 1000):
        est = evaluate_nll(model, ShiftedGuide(model), x.repeat(n, 1, 1), K=K, seed=K).log_px
        means.append(est.mean().item())
        ses.append(est.std().item() / math.sqrt(n))
    for i in range(3):  # E[L_K] does not decrease with K (Burda et al., theorem 1)
        assert means[i + 1] > means[i] - 3 * math.hypot(ses[i], ses[i + 1])
    assert means[-1] > means[0] + 0.5 * (log_px - elbo)
    assert means[-1] < log_px + 3 * ses[-1]                 # still a bound
    assert log_px - means[-1] < 0.1 * (log_px - elbo)       # the gap has mostly closed


def test_iw_standard_error_matches_the_spread(setup):
    """The delta-method standard error of one estimate ~ the sd of independent estimates."""

    class Mild(ShiftedGuide):
        shift = 0.2

    model = LinearGaussian().double()
    n = 400
    result = evaluate_nll(model, Mild(model), torch.tensor(X).repeat(n, 1, 1), K=100)
    ratio = result.std_error.mean().item() / result.log_px.std().item()
    assert 0.8 < ratio < 1.2
    assert float(np.median(result.ess.numpy())) < 100  # the weights do vary
