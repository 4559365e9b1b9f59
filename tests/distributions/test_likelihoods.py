import math

import pytest
import torch
from torch.distributions import Gamma, Normal

from pyro_dvae.distributions import Gaussian, ItakuraSaito


def test_is_likelihood_is_gamma_shape_one():
    x = torch.rand(4, 7, 5) * 3 + 1e-3
    logvar = torch.randn(4, 7, 5)
    lp = ItakuraSaito().log_prob(x, logvar)
    ref = Gamma(torch.ones_like(x), torch.exp(-logvar)).log_prob(x).sum(-1)
    assert torch.allclose(lp, ref, atol=1e-5)
    ref2 = ItakuraSaito().distribution(logvar).log_prob(x)
    assert torch.allclose(lp, ref2, atol=1e-5)


def test_is_likelihood_is_minus_is_divergence_up_to_a_constant():
    x = torch.rand(3, 6) * 2 + 1e-2
    power = torch.rand(3, 6) * 2 + 1e-2
    lp = ItakuraSaito().log_prob(x, torch.log(power))
    d_is = ItakuraSaito.divergence(x, power)
    const = -(torch.log(x) + 1).sum(-1)  # depends on x only, not on the model's power
    assert torch.allclose(lp, -d_is + const, atol=1e-5)
    # the divergence vanishes at power == x, where the likelihood is maximal in power
    assert torch.allclose(ItakuraSaito.divergence(x, x), torch.zeros(3), atol=1e-6)


def test_gaussian_likelihood():
    x = torch.randn(4, 5)
    params = torch.randn(4, 10)
    loc, logvar = params.chunk(2, -1)
    ref = Normal(loc, torch.exp(0.5 * logvar)).log_prob(x).sum(-1)
    assert torch.allclose(Gaussian().log_prob(x, params), ref, atol=1e-5)
    assert Gaussian().num_params(5) == 10 and ItakuraSaito().num_params(5) == 5
    assert not math.isnan(Gaussian().mean(params).sum().item())


def test_unknown_likelihood():
    from pyro_dvae.distributions import get_likelihood

    with pytest.raises(ValueError, match="unknown likelihood"):
        get_likelihood("poisson")
