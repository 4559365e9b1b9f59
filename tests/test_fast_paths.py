"""The training fast paths compute the loss they replace (issue 14).

- Fused sites (:func:`pyro_dvae.models.base.fused_sites`): one site per family and sequence gives
  the per-step ELBO, for every registered model and guide, Trace and TraceMeanField, with masks,
  data-set scaling and a KL weight, same weights, seed and batch; and the same gradients.
- The written-out recursions of :mod:`pyro_dvae.nn` (``stepwise``, ``lstm_step``,
  ``gaussian_head_step``) equal the modules they stand for (an MLP on the concatenation, one-frame
  ``nn.LSTM`` steps, :class:`~pyro_dvae.nn.GaussianHead`), in float64.
- The CPU kernels (:mod:`pyro_dvae.kernels`: padded output layer, fused Itakura-Saito likelihood)
  give the loss and gradients of the stock ops, for every registered model and guide.
- bfloat16 autocast (:mod:`pyro_dvae.precision`): the loss matches float32 within the documented
  2 %, the parameters and gradients stay float32, the densities are summed in float32.
"""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_dvae
from pyro_dvae.models.base import fused_sites
from pyro_dvae.nn import MLP, RNN, GaussianHead, gaussian_head_step, lstm_step, stepwise
from pyro_dvae.precision import autocast
from pyro_dvae.registry import REGISTRY

PAIRS = [(name, g) for name, entry in REGISTRY.items() for g in entry.guides]


def _loss(model, guide, elbo_cls, x, mask, fused, seed=3):
    pyro.set_rng_seed(seed)
    with fused_sites(fused):
        return elbo_cls().differentiable_loss(model.model, guide, x, None, mask, 40, 0.3)


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_fused_sites_give_the_per_step_loss(name, guide_name, elbo_cls):
    model, guide = pyro_dvae.build(name, guide_name, x_dim=6, z_dim=3)
    x = torch.rand(3, 5, 6) + 0.1
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    per_step = _loss(model, guide, elbo_cls, x, mask, False)
    fused = _loss(model, guide, elbo_cls, x, mask, True)
    assert torch.allclose(per_step, fused, rtol=1e-5), (float(per_step), float(fused))
    params = list(model.parameters()) + list(guide.parameters())
    g1 = torch.autograd.grad(per_step, params, allow_unused=True)
    g2 = torch.autograd.grad(_loss(model, guide, elbo_cls, x, mask, True), params,
                             allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,guide_name", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
def test_kernels_give_the_loss_and_gradients_of_the_stock_ops(name, guide_name, monkeypatch):
    from pyro_dvae import kernels

    monkeypatch.setattr(kernels, "MIN_PADDED_ROWS", 1)   # the padded layer at test sizes too
    monkeypatch.setattr(kernels, "MIN_PADDED_OUT", 1)
    calls = []
    pad = kernels.F.pad
    monkeypatch.setattr(kernels.F, "pad", lambda *a, **k: calls.append(1) or pad(*a, **k))
    model, guide = pyro_dvae.build(name, guide_name, x_dim=17, z_dim=3)   # 17 outputs: padded
    model, guide = model.double(), guide.double()
    x = torch.rand(3, 5, 17, dtype=torch.double) + 0.1
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    params = list(model.parameters()) + list(guide.parameters())
    fast = _loss(model, guide, TraceMeanField_ELBO, x, mask, True)
    g_fast = torch.autograd.grad(fast, params, allow_unused=True)
    assert calls, "the padded output layer was not used"
    with kernels.stock():
        stock = _loss(model, guide, TraceMeanField_ELBO, x, mask, True)
        g_stock = torch.autograd.grad(stock, params, allow_unused=True)
    torch.testing.assert_close(fast, stock, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_fast, g_stock):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fused_sites_are_one_per_family_and_only_inside_the_context():
    model, guide = pyro_dvae.build("srnn", x_dim=6, z_dim=3)
    x = torch.rand(2, 4, 6) + 0.1
    with fused_sites():
        gtr = pyro.poutine.trace(guide).get_trace(x)
        mtr = pyro.poutine.trace(pyro.poutine.replay(model.model, trace=gtr)).get_trace(x)
    assert [n for n, s in mtr.nodes.items() if s["type"] == "sample"] == ["sequences", "z", "x"]
    assert mtr.nodes["z"]["value"] is gtr.nodes["z"]["value"]
    assert gtr.nodes["z"]["fn"].event_shape == (4, 3)
    tr = pyro.poutine.trace(guide).get_trace(x)  # outside: per-step sites
    assert "z_4" in tr.nodes and "z" not in tr.nodes


def test_kvae_fuses_a_and_x_and_leaves_out_the_cancelling_z_sites():
    """KVAE's fused trace: ``a`` (q(a_t | x_t) in the guide, the Kalman filter's p(a_{1:T}) in the
    model) and ``x``; its z sites, whose densities are one object in model and guide and cancel,
    only outside the context (the loss and gradient equality is the registry test above)."""
    model, guide = pyro_dvae.build("kvae", x_dim=6, z_dim=3)
    x = torch.rand(2, 4, 6) + 0.1
    with fused_sites():
        gtr = pyro.poutine.trace(guide).get_trace(x)
        mtr = pyro.poutine.trace(pyro.poutine.replay(model.model, trace=gtr)).get_trace(x)
    assert [n for n, s in mtr.nodes.items() if s["type"] == "sample"] == [
        "sequences", "a", "x"]
    assert mtr.nodes["a"]["value"] is gtr.nodes["a"]["value"]
    assert mtr.nodes["a"]["fn"].event_shape == (4, model.a_dim)
    tr = pyro.poutine.trace(guide).get_trace(x)
    assert "a_1" in tr.nodes and "z_4" in tr.nodes and "a" not in tr.nodes


def test_kvae_fused_model_alone_samples_a_step_by_step():
    model, _ = pyro_dvae.build("kvae", x_dim=6, z_dim=3)
    x = torch.rand(2, 4, 6) + 0.1
    pyro.set_rng_seed(0)
    with fused_sites():
        tr = pyro.poutine.trace(model.model).get_trace(x)
    tr.compute_log_prob()
    a = tr.nodes["a"]["value"]
    assert a.shape == (2, 4, model.a_dim) and "z" not in tr.nodes
    assert torch.isfinite(tr.nodes["a"]["log_prob"]).all()
    # the fused site's density is the per-step sites' sum for the same a_{1:T}
    per_step = pyro.poutine.trace(pyro.poutine.condition(
        model.model, data={f"a_{t + 1}": a[:, t] for t in range(4)})).get_trace(x)
    per_step.compute_log_prob()
    total = sum(per_step.nodes[f"a_{t + 1}"]["log_prob"] for t in range(4))
    assert torch.allclose(tr.nodes["a"]["log_prob"], total.to(tr.nodes["a"]["log_prob"].dtype))


def test_fused_model_alone_samples_its_prior_step_by_step():
    model, _ = pyro_dvae.build("dkf", x_dim=4, z_dim=2)
    x = torch.rand(3, 5, 4) + 0.1
    with fused_sites():
        tr = pyro.poutine.trace(model.model).get_trace(x)
    z = tr.nodes["z"]["value"]
    loc, scale = model.prior(z, {}, x, None)
    eps = (z - loc) / scale  # each step's draw is a standard normal given the previous steps
    assert torch.isfinite(eps).all() and eps.abs().max() < 6
    tr.compute_log_prob()
    assert torch.allclose(tr.nodes["z"]["log_prob"],
                          torch.distributions.Normal(loc, scale).log_prob(z).sum((-1, -2)))


def _float64(fn):
    torch.set_default_dtype(torch.float64)
    try:
        fn()
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("order", ["step_first", "step_last", "step_middle"])
def test_stepwise_equals_the_mlp_on_the_concatenation(order):
    def check():
        a, b, y = torch.randn(2, 6, 5), torch.randn(2, 6, 2), torch.randn(2, 6, 3)
        parts = {"step_first": [None, a], "step_last": [a, None],
                 "step_middle": [a, None, b]}[order]
        mlp = MLP(3 + sum(p.shape[-1] for p in parts if p is not None), 7, "tanh", 4, "relu")
        at = stepwise(mlp, parts)
        for t in range(6):
            inp = torch.cat([y[:, t] if p is None else p[:, t] for p in parts], -1)
            assert torch.allclose(at(t, y[:, t]), mlp(inp), atol=1e-12)
    _float64(check)


def test_stepwise_refuses_parts_without_exactly_one_step_input():
    mlp = MLP(8, 4, "tanh")
    with pytest.raises(ValueError, match="exactly one None"):
        stepwise(mlp, [torch.randn(1, 2, 5)])
    with pytest.raises(ValueError, match="exactly one None"):
        stepwise(mlp, [None, None])


@pytest.mark.parametrize("with_parts", [False, True])
def test_lstm_step_equals_one_frame_lstm_steps(with_parts):
    def check():
        rnn = RNN(4 + (7 if with_parts else 0), 6)
        a, b, y = torch.randn(3, 7, 5), torch.randn(3, 7, 2), torch.randn(3, 7, 4)
        step = lstm_step(rnn, [a, None, b] if with_parts else None)
        state, ref_state = None, None
        for t in range(7):
            h, state = step(t, y[:, t], state)
            inp = torch.cat([a[:, t], y[:, t], b[:, t]], -1) if with_parts else y[:, t]
            ref, ref_state = rnn.step(inp, ref_state)
            assert torch.allclose(h, ref, atol=1e-12)
        full = rnn(torch.cat([a, y, b], -1) if with_parts else y)  # the whole-sequence LSTM
        assert torch.allclose(h, full[:, -1], atol=1e-12)
    _float64(check)


def test_lstm_step_refuses_a_backward_rnn_and_steps_other_cells_as_modules():
    with pytest.raises(ValueError, match="forward RNN"):
        lstm_step(RNN(3, 4, reverse=True))
    for rnn in (RNN(5, 4, cell="gru"), RNN(5, 4, num_layers=2)):
        a, y = torch.randn(2, 3, 2), torch.randn(2, 3, 3)
        h, _ = lstm_step(rnn, [a, None])(1, y[:, 1])
        assert torch.allclose(h, rnn.step(torch.cat([a[:, 1], y[:, 1]], -1))[0])


def test_stepwise_on_an_identity_mlp():
    a, y = torch.randn(2, 3, 2), torch.randn(2, 3, 3)
    assert torch.equal(stepwise(MLP(5), [a, None])(2, y[:, 2]), torch.cat([a[:, 2], y[:, 2]], -1))


def test_gaussian_head_step_equals_the_head():
    def check():
        head, h = GaussianHead(5, 3), torch.randn(4, 5)
        for a, b in zip(gaussian_head_step(head)(h), head(h)):
            assert torch.allclose(a, b, atol=1e-12)
    _float64(check)


BF16_TOLERANCE = 0.02  # relative, documented in pyro_dvae/precision.py


@pytest.mark.parametrize("name", ["srnn", "vrnn", "dkf", "vae"])
def test_bf16_loss_matches_fp32(name):
    model, guide = pyro_dvae.build(name, x_dim=257, z_dim=16)
    x = torch.rand(4, 20, 257) + 1e-3
    losses = {}
    for precision in ("fp32", "bf16"):
        pyro.set_rng_seed(5)
        with fused_sites(), autocast(precision):
            losses[precision] = TraceMeanField_ELBO().differentiable_loss(
                model.model, guide, x, None, None, None)
    assert losses["bf16"].dtype == torch.float32
    lo32, lo16 = losses["fp32"].detach().item(), losses["bf16"].detach().item()
    rel = abs(lo16 - lo32) / abs(lo32)
    assert rel < BF16_TOLERANCE, rel
    losses["bf16"].backward()
    for p in list(model.parameters()) + list(guide.parameters()):
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)


def test_bf16_autocast_is_really_on():
    """The products run in bfloat16 inside the region (so the test above compares two things)."""
    lin = torch.nn.Linear(3, 2)
    with autocast("bf16"):
        assert lin(torch.randn(4, 3)).dtype == torch.bfloat16
    with autocast("fp32"):
        assert lin(torch.randn(4, 3)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        autocast("fp16")
