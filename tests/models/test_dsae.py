"""DSAE specifics (chapter 11, 14.3): the sequence-level site ``v``, generation with one v per
sequence, and swapping v between two sequences before decoding."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

import pyro_dvae
from pyro_dvae.models import use_mean

F, Z = 8, 3


@pytest.mark.parametrize("guide_name", ["full", "factorized"])
def test_v_is_one_site_per_sequence_sampled_first(guide_name):
    model, guide = pyro_dvae.build("dsae", guide=guide_name, x_dim=F, z_dim=Z)
    x = torch.rand(4, 6, F) + 0.1
    for fn in (model.model, guide):
        tr = poutine.trace(fn).get_trace(x)
        latent = [n for n, s in tr.nodes.items()
                  if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
        assert latent == ["v"] + [f"z_{t}" for t in range(1, 7)]
        assert tr.nodes["v"]["value"].shape == (4, Z)
        assert tr.nodes["v"]["fn"].batch_shape == (4,) and tr.nodes["v"]["fn"].event_shape == (Z,)


def test_generate_uses_one_v_per_sequence():
    model, _ = pyro_dvae.build("dsae", x_dim=F, z_dim=Z)
    torch.manual_seed(0)
    out = model.generate(9, n=3)
    assert out["v"].shape == (3, Z) and out["z"].shape == (3, 9, Z)
    # every frame of sequence i is decoded from the same v_i
    assert torch.allclose(out["mean"], model.decode(out["z"], out["v"]))
    # a given v is used as is: sequences generated with v_0 everywhere share it
    v = out["v"][:1].expand(3, -1)
    out2 = model.generate(9, n=3, v=v)
    assert torch.equal(out2["v"], v)
    assert torch.allclose(out2["mean"], model.decode(out2["z"], v))


@pytest.mark.parametrize("guide_name", ["full", "factorized"])
def test_swap_v(guide_name):
    model, guide = pyro_dvae.build("dsae", guide=guide_name, x_dim=F, z_dim=Z)
    torch.manual_seed(1)
    x_a = torch.rand(2, 7, F) + 0.1
    x_b = 3.0 * torch.rand(2, 5, F) + 0.1     # another length and level
    out = model.swap_v(guide, x_a, x_b)
    assert out["a_with_v_b"].shape == x_a.shape and out["b_with_v_a"].shape == x_b.shape
    # the codes are the guide's means
    tr = poutine.trace(use_mean(guide)).get_trace(x_a)
    assert torch.allclose(out["v_a"], tr.nodes["v"]["fn"].mean)
    assert torch.allclose(out["z_a"][:, 2], tr.nodes["z_3"]["fn"].mean)
    # decoding (z^a, v^b) is what was returned; swapping back gives the reconstructions
    assert torch.allclose(out["a_with_v_b"], model.decode(out["z_a"], out["v_b"]))
    assert torch.allclose(out["a"], model.reconstruct(guide, x_a))
    assert not torch.allclose(out["a_with_v_b"], out["a"])  # v matters to the decoder
    back = model.decode(out["z_a"], out["v_a"])
    assert torch.allclose(back, out["a"])
    with pytest.raises(ValueError, match="same batch size"):
        model.swap_v(guide, x_a, x_b[:1])


def test_v_kl_is_analytic_under_mean_field():
    """With TraceMeanField_ELBO the v term is the closed-form KL(q(v|x) || N(0, I)): the loss
    changes by exactly that KL's change when only q(v|x)'s head changes its bias."""
    model, guide = pyro_dvae.build("dsae", guide="factorized", x_dim=F, z_dim=Z)
    x = torch.rand(2, 5, F) + 0.1

    def loss_and_kl():
        pyro.set_rng_seed(3)
        loss = pyro.infer.TraceMeanField_ELBO().loss(model.model, use_mean(guide), x)
        tr = poutine.trace(guide).get_trace(x)
        q = tr.nodes["v"]["fn"]
        kl = torch.distributions.kl_divergence(
            q, pyro.distributions.Normal(torch.zeros(Z), 1.0).to_event(1)).sum()
        return loss, float(kl.detach())

    l1, k1 = loss_and_kl()
    with torch.no_grad():
        guide.v_head.logvar.bias += 0.5    # q(v|x) wider; z guide and decoder input (mean) unchanged
    l2, k2 = loss_and_kl()
    assert l2 - l1 == pytest.approx(k2 - k1, rel=1e-5, abs=1e-5)
