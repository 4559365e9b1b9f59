"""The ELBO machinery is exact where it can be checked in closed form.

A linear-Gaussian state-space model written with the DVAE base class (T = 2, z and x of dimension
2; diagonal matrices so the exact posterior conditionals are diagonal Gaussians) and a guide that
is its exact posterior, computed here by dense linear algebra on the joint Gaussian of (z, x):

- every Trace_ELBO sample equals log p(x) (zero variance), since log p(x, z) - log q(z) = log p(x);
- TraceMeanField_ELBO (analytic per-step KL) has mean log p(x), checked within 5 standard errors.
"""

import math

import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import MultivariateNormal

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
