"""Driven mode (4.1.1): the models the paper writes with an input u_t (DKF, SRNN, STORN, VRNN) take an
optional external sequence u (batch, T, U) in model and guide, and use it.

Where u enters at each step is checked in test_time_dependencies.py; here: the ELBO and the guide's
parameters change when u changes (same seed, same x), training steps run, generation accepts u, and
the models without an input reject one.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

import pyro_dvae
from pyro_dvae.registry import REGISTRY

B, T, F, Z, U = 3, 7, 6, 2, 3
DRIVEN = ["dkf", "srnn", "storn", "vrnn"]
PAIRS = [(n, g) for n in DRIVEN for g in REGISTRY[n].guides]


def _data():
    torch.manual_seed(0)
    x = torch.rand(B, T, F) + 0.1
    u = torch.randn(B, T, U)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    return x, u, mask


def _guide_locs(guide, x, u, mask):
    pyro.set_rng_seed(5)
    tr = poutine.trace(guide).get_trace(x, u, mask)
    return torch.stack([tr.nodes[f"z_{t + 1}"]["fn"].loc for t in range(T)], 1).detach()


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
def test_loss_and_guide_use_u(name, guide_name):
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z, u_dim=U)
    x, u, mask = _data()
    u2 = u.clone()
    u2[:, -1] += 1.0  # change the last input only
    losses = []
    for uu in (u, u2):
        pyro.set_rng_seed(1)
        losses.append(TraceMeanField_ELBO().loss(model.model, guide, x, uu, mask))
    assert losses[0] != pytest.approx(losses[1], rel=1e-6, abs=0.0)
    # the guide's parameters move with u, and only where the guide can see u_T
    loc, loc2 = _guide_locs(guide, x, u, mask), _guide_locs(guide, x, u2, mask)
    assert not torch.equal(loc[1:, -1], loc2[1:, -1])
    # the guide is not anticipating: causal guides keep q(z_1) fixed when only u_T changes
    sees_future = guide_name in ("dks", "st-lr", "mf-lr", "smoothing", "consistent")
    assert torch.equal(loc[:, 0], loc2[:, 0]) == (not sees_future)


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
def test_driven_training_step_and_generation(name, guide_name):
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z, u_dim=U)
    x, u, mask = _data()
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        svi = SVI(model.model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        assert torch.isfinite(torch.tensor(svi.step(x, u, mask, 10)))
    torch.manual_seed(2)
    out = model.generate(T, n=2, u=u[:2])
    torch.manual_seed(2)
    out2 = model.generate(T, n=2, u=u[:2] + 1.0)
    assert out["mean"].shape == (2, T, F)
    assert not torch.allclose(out["mean"], out2["mean"])
    assert model.reconstruct(guide, x, u, mask).shape == x.shape


@pytest.mark.parametrize("name", DRIVEN)
def test_undriven_model_rejects_u(name):
    model, _ = pyro_dvae.build(name, x_dim=F, z_dim=Z)
    x, u, mask = _data()
    with pytest.raises(AssertionError, match="undriven"):
        model.model(x, u, mask)


@pytest.mark.parametrize("name", ["rvae-causal", "rvae-noncausal", "dsae"])
def test_models_without_input_refuse_u_dim(name):
    with pytest.raises(ValueError, match="no external input"):
        pyro_dvae.build(name, x_dim=F, z_dim=Z, u_dim=U)
