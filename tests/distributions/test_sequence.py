"""The per-step views give exactly the per-step densities.

The vectorised pass (first log_prob on a recorded value) must equal evaluating each step on its own:
``log_prob`` on a copy of the value takes the per-step path, and a model traced without a guide
samples its latents step by step from the prefix evaluation.
"""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import kl_divergence

import pyro_dvae
from pyro_dvae.distributions import NormalStep


@pytest.mark.parametrize("name", ["dkf", "srnn"])
def test_vectorised_equals_per_step(name):
    torch.set_default_dtype(torch.float64)
    try:
        model, guide = pyro_dvae.build(name, x_dim=6, z_dim=3)
        model.double(), guide.double()
        x = torch.rand(2, 5, 6) + 0.1
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
        gtr = poutine.trace(guide).get_trace(x, None, mask)
        mtr = poutine.trace(poutine.replay(model.model, trace=gtr)).get_trace(x, None, mask)
        for tr in (gtr, mtr):
            for site in tr.nodes.values():
                if site["type"] != "sample":
                    continue
                fast = site["fn"].log_prob(site["value"])
                slow = site["fn"].log_prob(site["value"].clone())
                assert torch.allclose(fast, slow, atol=1e-12), site["name"]
        for t in range(1, 6):
            q, p = gtr.nodes[f"z_{t}"]["fn"], mtr.nodes[f"z_{t}"]["fn"]
            assert isinstance(q, NormalStep) and isinstance(p, NormalStep)
            fast = kl_divergence(q, p)
            ref = kl_divergence(pyro.distributions.Normal(q.loc, q.scale).to_event(1),
                                pyro.distributions.Normal(p.loc, p.scale).to_event(1))
            assert torch.allclose(fast, ref * mask[:, t - 1], atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_model_without_guide_samples_the_prior_step_by_step():
    """Prefix evaluation: tracing the model alone draws z_t ~ p(z_t | z_{t-1}, h_t)."""
    model, _ = pyro_dvae.build("srnn", x_dim=4, z_dim=2)
    x = torch.rand(3, 4, 4) + 0.1
    tr = poutine.trace(model.model).get_trace(x)
    z = torch.stack([tr.nodes[f"z_{t}"]["value"] for t in range(1, 5)], 1)
    ctx = model.context(x, None, None)
    loc, scale = model.prior(z, ctx, x, None)
    for t in range(1, 5):
        fn = tr.nodes[f"z_{t}"]["fn"]
        assert torch.allclose(fn.loc, loc[:, t - 1], atol=1e-6)
        assert torch.allclose(fn.scale, scale[:, t - 1], atol=1e-6)
    tr.compute_log_prob()  # all sites have finite log-densities
    assert all(torch.isfinite(s["log_prob"]).all() for s in tr.nodes.values()
               if s["type"] == "sample")


def test_expand_is_identity_only_for_the_same_shape():
    model, guide = pyro_dvae.build("dkf", x_dim=4, z_dim=2)
    x = torch.rand(3, 4, 4) + 0.1
    fn = poutine.trace(guide).get_trace(x).nodes["z_1"]["fn"]
    assert fn.expand(torch.Size([3])) is fn
    with pytest.raises(NotImplementedError, match="cannot be expanded"):
        fn.expand(torch.Size([2, 3]))


def test_model_only_runs_do_not_reuse_a_freed_context():
    """Tracing the model alone twice (as a dependency reader does) recomputes its context."""
    model, guide = pyro_dvae.build("srnn", x_dim=4, z_dim=2)
    x = torch.rand(2, 4, 4) + 0.1
    data = {f"z_{t}": torch.zeros(2, 2) for t in range(1, 5)}
    for _ in range(2):
        tr = poutine.trace(poutine.condition(model.model, data=data)).get_trace(x)
        tr.log_prob_sum().backward()


def test_deepcopy_after_a_guide_run():
    import copy

    model, guide = pyro_dvae.build("srnn", x_dim=4, z_dim=2)
    poutine.trace(guide).get_trace(torch.rand(2, 4, 4) + 0.1)
    model2, guide2 = copy.deepcopy((model, guide))
    assert model2._context_cache is None
