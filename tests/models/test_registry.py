"""Every registered model/guide pair, driven by the registry (STYLE habit 7).

A new model is covered by registering it: one SVI step with Trace_ELBO and with
TraceMeanField_ELBO under validation and warnings-as-errors, finite loss and gradients for every
parameter, prior sampling and reconstruction shapes, padded sequences, and the same with each
likelihood (Itakura-Saito, Gaussian, Bernoulli) on data from its support.
"""

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

import pyro_dvae
from pyro_dvae.distributions import LIKELIHOODS
from pyro_dvae.registry import REGISTRY

PAIRS = [(name, g) for name, entry in REGISTRY.items() for g in entry.guides]
B, T, F, Z = 3, 6, 10, 2


def _data(likelihood="is"):
    x = torch.rand(B, T, F) + 0.05
    if likelihood == "bernoulli":
        x = (x < 0.5).float()
    elif likelihood == "gaussian":
        x = torch.randn(B, T, F)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    return x, mask


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_svi_step(name, guide_name, elbo_cls):
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z)
    x, mask = _data()
    params = list(model.parameters()) + list(guide.parameters())
    before = [p.detach().clone() for p in params]
    svi = SVI(model.model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo_cls())
    loss = svi.step(x, None, mask, 100)
    assert torch.isfinite(torch.tensor(loss))
    # gradients: finite for every parameter, and every parameter moved (all are used)
    model.zero_grad(), guide.zero_grad()
    elbo_cls().differentiable_loss(model.model, guide, x, None, mask, 100).backward()
    for (pname, p) in list(model.named_parameters()) + list(guide.named_parameters()):
        assert p.grad is not None, f"{name}/{guide_name}: {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}/{guide_name}: {pname} has a non-finite grad"
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    assert any(moved)


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
@pytest.mark.parametrize("likelihood", sorted(set(LIKELIHOODS) - {"is"}))
def test_each_likelihood(name, guide_name, likelihood):
    """Every pair trains, samples and reconstructs with every likelihood (Itakura-Saito: above)."""
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z,
                                   likelihood=likelihood)
    assert model.likelihood.name == likelihood
    x, mask = _data(likelihood)
    loss = Trace_ELBO().differentiable_loss(model.model, guide, x, None, mask, 100)
    assert torch.isfinite(loss)
    loss.backward()
    for (pname, p) in list(model.named_parameters()) + list(guide.named_parameters()):
        assert p.grad is not None, f"{name}/{guide_name}: {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}/{guide_name}: {pname} has a non-finite grad"
    out = model.generate(4, n=2)
    assert out["x"].shape == (2, 4, F) and torch.isfinite(out["x"]).all()
    rec = model.reconstruct(guide, x, mask=mask)
    assert rec.shape == x.shape and torch.isfinite(rec).all()
    if likelihood == "bernoulli":  # samples are binary, the mean is a probability
        assert set(out["x"].unique().tolist()) <= {0.0, 1.0}
        assert ((rec >= 0) & (rec <= 1)).all() and ((out["mean"] >= 0) & (out["mean"] <= 1)).all()


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
def test_generate_and_reconstruct_shapes(name, guide_name):
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z)
    out = model.generate(5, n=2)
    assert out["x"].shape == (2, 5, F) and torch.isfinite(out["x"]).all()
    assert out["mean"].shape == (2, 5, F) and torch.isfinite(out["mean"]).all()
    x, mask = _data()
    rec = model.reconstruct(guide, x, mask=mask)
    assert rec.shape == x.shape and torch.isfinite(rec).all()
    rec_sampled = model.reconstruct(guide, x, mask=mask, sample=True)
    assert rec_sampled.shape == x.shape


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
def test_padding_is_ignored(name, guide_name):
    """The ELBO of a padded sequence and its gradients do not depend on what the padded frames of
    x (and u) contain, NaN and inf included (masks select, they do not multiply: issue 12 item
    12)."""
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z)
    params = list(model.parameters()) + list(guide.parameters())
    x, mask = _data()
    results = []
    for fill in (0.0, 123.0, float("nan"), float("inf"), -float("inf")):
        data = x.clone()
        data[0, 4:] = fill
        data[0, 5, 1] = 0.5 if fill == 0 else fill  # not constant over the padding
        pyro.set_rng_seed(1)
        for p in params:
            p.grad = None
        loss = TraceMeanField_ELBO().differentiable_loss(model.model, guide, data, None, mask)
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        assert torch.isfinite(loss), f"padding {fill}: loss {loss}"
        assert all(torch.isfinite(g).all() for g in grads), f"padding {fill}: non-finite grad"
        results.append((fill, loss.detach(), grads))
    _, loss0, grads0 = results[0]
    for fill, loss, grads in results[1:]:
        assert loss.item() == pytest.approx(loss0.item(), rel=1e-6), f"padding {fill}"
        for g, g0 in zip(grads, grads0):
            assert torch.allclose(g, g0, rtol=1e-5, atol=1e-7), f"padding {fill}"


def test_build_errors():
    with pytest.raises(KeyError, match="unknown model"):
        pyro_dvae.build("nope")
    with pytest.raises(KeyError, match="unknown guide"):
        pyro_dvae.build("srnn", guide="nope")


def test_two_models_train_independently():
    """A second model of the same kind gets its own parameters in Pyro's param store."""
    m1, g1 = pyro_dvae.build("vae", x_dim=F, z_dim=Z)
    m2, g2 = pyro_dvae.build("vae", x_dim=F, z_dim=Z)
    x, _ = _data()
    before = m2.x_out.weight.detach().clone()
    svi = SVI(m2.model, g2, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    SVI(m1.model, g1, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(x)
    svi.step(x)
    assert not torch.equal(before, m2.x_out.weight.detach())
