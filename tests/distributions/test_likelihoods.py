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


def test_bernoulli_likelihood_against_torch():
    from torch.distributions import Bernoulli as TorchBernoulli

    from pyro_dvae.distributions import Bernoulli

    x = (torch.rand(4, 7, 5) < 0.3).float()
    logits = 4 * torch.randn(4, 7, 5)
    logits[0, 0, 0] = 80.0  # far in the tails: still finite and exact
    logits[0, 0, 1] = -80.0
    lp = Bernoulli().log_prob(x, logits)
    ref = TorchBernoulli(logits=logits.double()).log_prob(x.double()).sum(-1)
    assert torch.allclose(lp.double(), ref, atol=1e-4)
    assert torch.allclose(Bernoulli().distribution(logits).log_prob(x), lp, atol=1e-4)
    assert torch.allclose(Bernoulli().mean(logits), torch.sigmoid(logits))
    assert Bernoulli().num_params(5) == 5
    s = Bernoulli().sample(logits)
    assert s.shape == x.shape and set(s.unique().tolist()) <= {0.0, 1.0}


def test_likelihood_registry_names():
    from pyro_dvae.distributions import LIKELIHOODS, get_likelihood

    from pyro_dvae.cli import LIKELIHOOD_NAMES  # the CLI names them without importing torch

    assert sorted(LIKELIHOODS) == ["bernoulli", "gaussian", "is"] == sorted(LIKELIHOOD_NAMES)
    for name in LIKELIHOODS:
        assert get_likelihood(name).name == name


@pytest.mark.parametrize("name,x,message", [
    ("bernoulli", torch.tensor([[0.0, 1.0, 0.5]]), r"train is not binary \(1 values other "
                                                   r"than 0 and 1, for example 0\.5\)"),
    ("is", torch.tensor([[0.0, -2.0]]), r"train holds negative values \(min -2\)"),
    ("gaussian", torch.tensor([[0.0, float("nan")]]), r"train holds 1 NaN or infinite values"),
    ("bernoulli", torch.tensor([[1.0, float("inf")]]), r"train holds 1 NaN or infinite values"),
])
def test_data_outside_the_support_is_refused(name, x, message):
    from pyro_dvae.distributions import get_likelihood

    with pytest.raises(ValueError, match=message) as err:
        get_likelihood(name).check_data(x, "train")
    assert "\n" not in str(err.value)


def test_data_inside_the_support_is_accepted():
    from pyro_dvae.distributions import get_likelihood

    get_likelihood("bernoulli").check_data(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    get_likelihood("is").check_data(torch.rand(3, 4))
    get_likelihood("gaussian").check_data(torch.randn(3, 4))
    get_likelihood("bernoulli").check_data(torch.zeros(0, 4))  # an empty set has no bad value
