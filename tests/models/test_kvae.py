"""KVAE (chapter 6, 13.1.2): the model's density against the ancestral factors of 6.7, the exact
z posterior of the guide, the two-phase schedule, training and the CLI."""

from __future__ import annotations

import json

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from click.testing import CliRunner
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_dvae
from pyro_dvae.models.kvae import KVAE, LDS_PARAMETERS
from pyro_dvae.nn import shift_right

B, T, F = 3, 7, 6


def small(**kw):
    opts = {"x_dim": F, "z_dim": 3, "a_dim": 2, "K": 3, "vae_epochs": 2}
    opts.update(kw)
    model, guide = pyro_dvae.build("kvae", **opts)
    return model.double(), guide.double()


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, T, F, generator=g, dtype=dtype) + 0.05
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 3:] = False
    return x, mask


def traces(model, guide, x, mask):
    gt = poutine.trace(guide).get_trace(x, None, mask)
    mt = poutine.trace(poutine.replay(model.model, trace=gt)).get_trace(x, None, mask)
    for tr in (gt, mt):
        tr.compute_log_prob()
    return gt, mt


def values(tr, name):
    return torch.stack([tr.nodes[f"{name}_{t + 1}"]["value"] for t in range(T)], 1)


def ancestral_log_joint(model, a, z, mask):
    """log p(a_obs, z) from the factors of 6.7, written out independently of the model code:
    z_1 ~ N(B_1 a_0, A_1 P_0 A_1^T + Q), z_t ~ N(A_t z_{t-1} + B_t a_{t-1}, Q),
    a_t ~ N(C_t z_t, R)."""
    a_prev = shift_right(a)
    h, _ = model.alpha_rnn.rnn(a_prev)
    alpha = torch.softmax(model.alpha_out(h), -1)
    A = torch.einsum("btk,kij->btij", alpha, model.A_bank)
    Bm = torch.einsum("btk,kij->btij", alpha, model.B_bank)
    C = torch.einsum("btk,kij->btij", alpha, model.C_bank)
    Q, R = torch.diag(model.q_logvar.exp()), torch.diag(model.r_logvar.exp())
    total = torch.zeros(a.shape[0], dtype=a.dtype)
    for t in range(T):
        loc = Bm[:, t] @ a_prev[:, t].unsqueeze(-1)
        if t == 0:
            cov = A[:, 0] @ model.init_cov @ A[:, 0].mT + Q
        else:
            loc = loc + A[:, t] @ z[:, t - 1].unsqueeze(-1)
            cov = Q.expand(a.shape[0], -1, -1)
        total = total + dist.MultivariateNormal(loc.squeeze(-1), cov).log_prob(z[:, t])
        lp_a = dist.MultivariateNormal((C[:, t] @ z[:, t].unsqueeze(-1)).squeeze(-1),
                                       R).log_prob(a[:, t])
        total = total + lp_a * mask[:, t]
    return total


@pytest.mark.parametrize("method", ["scan", "sequential"])
def test_model_density_is_the_ancestral_joint(method):
    """Sites a_1..a_T, z_T..z_1 of the model (p(a) p(z | a)) give log p(a, z) of 6.7 exactly."""
    model, guide = small(kalman_method=method)
    x, mask = data()
    with torch.no_grad():   # a non-trivial mixture and LDS
        for p in (model.A_bank, model.B_bank, model.C_bank):
            p.add_(0.3 * torch.randn_like(p))
    gt, mt = traces(model, guide, x, mask)
    def latents(tr):
        return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
                and n != "sequences"]

    latent = latents(mt)
    assert latent == [f"a_{t}" for t in range(1, T + 1)] + [f"z_{t}" for t in range(T, 0, -1)]
    assert latent == latents(gt)
    site_sum = sum(mt.nodes[n]["log_prob"] for n in latent)
    expected = ancestral_log_joint(model, values(mt, "a"), values(mt, "z"), mask.double())
    assert torch.allclose(site_sum, expected, atol=1e-9, rtol=0)


def test_model_without_guide_per_step_path():
    """Run alone, the model samples a_t from p(a_t | a_{1:t-1}) on the recorded prefix; those
    per-step densities equal the vectorised ones of the completed sequence."""
    model, _ = small()
    x, mask = data()
    tr = poutine.trace(model.model).get_trace(x, None, mask)
    tr.compute_log_prob()
    for t in range(T):
        for name in (f"a_{t + 1}", f"z_{t + 1}"):
            site = tr.nodes[name]
            per_step = site["fn"].log_prob(site["value"].clone())   # not the recorded tensor
            assert torch.allclose(per_step, site["log_prob"], atol=1e-10), name
    assert (tr.nodes["a_7"]["log_prob"][0] == 0) and (tr.nodes["a_7"]["log_prob"][1] != 0)


@pytest.mark.parametrize("method", ["scan", "sequential"])
def test_z_sites_are_the_exact_posterior(method):
    """Given a, every z draw of the guide gives the same log weight log p(x, a, z) - log q(a, z)
    (q(z | a) is the exact posterior): the z sites add no Monte Carlo noise."""
    model, guide = small(kalman_method=method)
    x, mask = data()
    gt, _ = traces(model, guide, x, mask)
    a_sites = {f"a_{t + 1}": gt.nodes[f"a_{t + 1}"]["value"] for t in range(T)}
    weights, zs = [], []
    for seed in range(4):
        pyro.set_rng_seed(seed)
        g2 = poutine.trace(poutine.condition(guide, data=a_sites)).get_trace(x, None, mask)
        for name in a_sites:   # the fixed a_t are still latent sites for the model
            g2.nodes[name]["is_observed"] = False
        m2 = poutine.trace(poutine.replay(model.model, trace=g2)).get_trace(x, None, mask)
        weights.append(m2.log_prob_sum() - g2.log_prob_sum())
        zs.append(values(g2, "z"))
    assert not torch.allclose(zs[0], zs[1])
    for w in weights[1:]:
        assert abs(w.item() - weights[0].item()) < 1e-9 * abs(weights[0].item())


def test_padding_frames_are_missing_observations():
    """p(a_t | a_{1:t-1}) of a padded step is 0 and the observed steps' terms do not see a_t."""
    model, guide = small()
    x, mask = data()
    gt, mt = traces(model, guide, x, mask)
    assert (mt.nodes["a_6"]["log_prob"][0] == 0) and (gt.nodes["a_6"]["log_prob"][0] == 0)
    ssm = model.ssm(values(mt, "a"))
    obs = values(mt, "a")[0:1, :5]
    sub = model.ssm(obs)
    assert torch.allclose(ssm.log_prob(values(mt, "a"), mask)[0], sub.log_prob(obs)[0])


@pytest.mark.parametrize("fused", [False, True])
def test_meanfield_equals_trace_elbo(fused):
    """Same site order in model and guide: TraceMeanField_ELBO is valid, no warning under
    validation.  Its z terms are the registered KL(q || p) = 0 of the shared exact posterior,
    where Trace_ELBO takes log q - log p (0 too, through the sampler): the same loss and the same
    gradients, per-step and fused sites."""
    from pyro_dvae.models.base import fused_sites

    model, guide = small()
    x, mask = data()
    params = list(model.parameters()) + list(guide.parameters())
    losses, grads = [], []
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(3)
        with fused_sites(fused):
            loss = elbo.differentiable_loss(model.model, guide, x, None, mask)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    assert float(losses[0].detach()) == pytest.approx(float(losses[1].detach()), rel=1e-12)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_kalman_kl_is_zero_only_for_the_same_posterior():
    from torch.distributions import kl_divergence

    model, guide = small()
    x, mask = data()
    posts = []
    for _ in range(2):
        gt = poutine.trace(guide).get_trace(x, None, mask)
        posts.append(gt.nodes["z_1"]["fn"].posterior)
    q, p = posts
    assert q is not p
    kl = kl_divergence(q.step(2), q.step(2))
    assert kl.shape == (B,) and bool((kl == 0).all()) and not kl.requires_grad
    for a, b in ((q.step(2), p.step(2)), (q.step(2), q.step(3))):
        with pytest.raises(NotImplementedError):
            kl_divergence(a, b)


def test_generate_and_reconstruction_modes():
    model, guide = small()
    out = model.generate(9, n=4)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "x": (4, 9, F), "mean": (4, 9, F), "z": (4, 9, 3), "a": (4, 9, 2)}
    x, mask = data()
    recs = {m: model.reconstruct(guide, x, mask=mask, mode=m) for m in ("filter", "smooth", "vae")}
    for r in recs.values():
        assert r.shape == x.shape and torch.isfinite(r).all()
    assert not torch.allclose(recs["filter"], recs["vae"])
    with pytest.raises(ValueError, match="reconstruction mode"):
        model.reconstruct(guide, x, mode="nope")


def test_frozen_parameters_phases():
    model, guide = small(vae_epochs=2)
    lds = model.frozen_parameters(0)
    names = {n for n, _ in model.named_parameters()}
    assert lds == model.frozen_parameters(1) and model.frozen_parameters(2) == set()
    assert lds == {n for n in names if n.startswith(LDS_PARAMETERS)}
    assert {"A_bank", "B_bank", "C_bank", "q_logvar", "r_logvar"} <= lds
    assert any(n.startswith("alpha_rnn.") for n in lds)
    assert not any(n.startswith(("decoder.", "x_out.")) for n in lds)
    assert not hasattr(guide, "frozen_parameters") or not guide.frozen_parameters(0)
    with pytest.raises(ValueError, match="vae_epochs"):
        KVAE(x_dim=F, vae_epochs=-1)
    with pytest.raises(ValueError, match="kalman_method"):
        KVAE(x_dim=F, kalman_method="fast")


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


class InMemory(torch.utils.data.Dataset):
    def __init__(self, x, mask):
        self.x, self.mask = x, mask

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.mask[i]


def test_two_phase_training_with_fit(tmp_path):
    """train.fit honours frozen_parameters: epoch 1 (VAE phase) changes exactly the decoder and
    the encoder, epoch 2 (joint phase) changes the LG-LDS too."""
    from pyro_dvae.train import fit

    model, guide = pyro_dvae.build("kvae", x_dim=F, z_dim=3, a_dim=2, K=3, vae_epochs=1)
    x, mask = data(torch.float32)
    train_set = InMemory(x, mask)
    m0, g0 = _snapshot(model), _snapshot(guide)
    cfg = {"epochs": 1, "batch_size": B, "lr": 1e-2, "patience": 0}
    fit(model, guide, train_set, None, cfg, out_dir=tmp_path / "run", progress=False)
    lds = model.frozen_parameters(0)
    assert _changed(m0, model) == {n for n in m0 if n not in lds}
    assert _changed(g0, guide) == set(g0)
    m1 = _snapshot(model)
    cfg["epochs"] = 2
    fit(model, guide, train_set, None, cfg, out_dir=tmp_path / "run", resume=True,
        progress=False)
    assert _changed(m1, model) == set(m1)


def synthetic(n, T_=24, F_=F, seed=0):
    """Power spectrograms Gamma(1, sigma^2) with a smooth, drifting log sigma^2."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T_, dtype=torch.float32).view(1, T_, 1)
    f = torch.arange(F_, dtype=torch.float32).view(1, 1, F_)
    phase = 6.3 * torch.rand(n, 1, 1, generator=g)
    log_var = torch.sin(2 * torch.pi * t / 10 + phase) * torch.cos(torch.pi * f / F_) * 2
    return torch.exp(log_var) * torch.empty(n, T_, F_).exponential_(generator=g)


def val_loss(model, guide, x, mask=None, seeds=(11, 12, 13)):
    frames = x.shape[0] * x.shape[1] if mask is None else int(mask.sum())
    with torch.no_grad():
        total = 0.0
        for s in seeds:
            pyro.set_rng_seed(s)
            total += Trace_ELBO().loss(model.model, guide, x, None, mask)
    return total / len(seeds) / frames


def train_steps(model, guide, x, mask=None, steps=40, batch=8, lr=3e-3, vae_steps=0):
    """Adam on the non-frozen parameters, frozen set from frozen_parameters (phase 1 first)."""
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=lr)
    g = torch.Generator().manual_seed(0)
    elbo = Trace_ELBO()
    for step in range(steps):
        frozen = model.frozen_parameters(0 if step < vae_steps else model.vae_epochs)
        idx = torch.randperm(x.shape[0], generator=g)[:batch]
        opt.zero_grad()
        loss = elbo.differentiable_loss(model.model, guide, x[idx], None,
                                        None if mask is None else mask[idx])
        assert torch.isfinite(loss)
        (loss / x[idx].numel()).backward()
        for n in frozen:
            params[n].grad = None
        opt.step()


def test_training_lowers_validation_loss():
    x_tr, x_val = synthetic(48, seed=0), synthetic(12, seed=1)
    model, guide = pyro_dvae.build("kvae", x_dim=F, z_dim=4, a_dim=3, K=3, vae_epochs=1)
    before = val_loss(model, guide, x_val)
    train_steps(model, guide, x_tr, steps=60, vae_steps=20)
    after = val_loss(model, guide, x_val)
    assert after < before - 0.1 * abs(before), (before, after)


@pytest.mark.slow
def test_training_on_builtin_corpus():
    from pyro_dvae.data.datasets import load_splits

    splits = load_splits(None, seq_len=50)
    (x_tr, m_tr), (x_val, m_val) = ((splits[s].x, splits[s].mask) for s in ("train", "val"))
    model, guide = pyro_dvae.build("kvae", x_dim=x_tr.shape[-1])
    curve = [val_loss(model, guide, x_val[:16], m_val[:16], seeds=(11, 12))]
    for _ in range(3):
        train_steps(model, guide, x_tr, m_tr, steps=15, batch=16, lr=1e-3, vae_steps=15)
        curve.append(val_loss(model, guide, x_val[:16], m_val[:16], seeds=(11, 12)))
    assert all(torch.isfinite(torch.tensor(curve)))
    assert curve[-1] < curve[0], curve


def test_cli_fit_kvae(tmp_path):
    from pyro_dvae.cli import cli

    out = tmp_path / "run"
    args = ["fit", "--model", "kvae", "--epochs", "2", "--seq-len", "20", "--batch-size", "64",
            "-q", "--out", str(out), "-o", "vae_epochs=1", "-o", "a_dim=4", "-o", "K=2",
            "-o", "z_dim=4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "kvae" and cfg["guide"] == "kalman"
    assert cfg["model_options"]["vae_epochs"] == 1
    hist = json.loads((out / "history.json").read_text())
    assert hist["epoch"] == [1, 2] and hist["status"] == "finished"
    assert all(torch.isfinite(torch.tensor(hist["val_loss"])))


@pytest.mark.parametrize("method", ["scan", "sequential"])
def test_float32_long_padding_with_unstable_dynamics(method):
    """Regression: a learned A with eigenvalues above 1 and 140 padded frames made the predicted
    covariance grow to ~1e7 and float32 Cholesky fail (now: float64 Kalman part, jitter)."""
    model, guide = pyro_dvae.build("kvae", x_dim=F, z_dim=4, a_dim=5, K=2, kalman_method=method)
    with torch.no_grad():
        model.A_bank.copy_(1.07 * torch.eye(4).expand(2, 4, 4))
    x = torch.rand(2, 150, F) + 0.05
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, 10:] = False
    loss = Trace_ELBO().differentiable_loss(model.model, guide, x, None, mask)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in list(model.named_parameters()) + list(guide.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert torch.isfinite(model.reconstruct(guide, x, mask=mask)).all()


def test_driven_mode_input_enters_the_lds():
    """Driven mode: the LDS input is [a_{t-1}, u_t]; u_t changes p(a_t | a_{1:t-1}) and later."""
    model, guide = small(u_dim=2)
    x, mask = data()
    u = torch.randn(B, T, 2, dtype=torch.float64)
    gt = poutine.trace(guide).get_trace(x, u, mask)
    a = values(gt, "a")

    def log_p_a(u_):
        return model.ssm(a, u_).filter(a).log_lik

    u2 = u.clone()
    u2[:, 3] += 1.0
    diff = (log_p_a(u) - log_p_a(u2)).abs()
    assert (diff[:, :3] == 0).all() and (diff[:, 3:] > 0).all()
    loss = Trace_ELBO().loss(model.model, guide, x, u, mask)
    assert torch.isfinite(torch.tensor(loss))


def test_deepcopy_and_check_posterior_after_a_guide_only_run():
    """Issue 12 item 11: a guide run leaves the Kalman cache (an autograd graph) on the model;
    deepcopy (and so check_posterior, which copies model and guide) refused it."""
    import copy
    import pickle

    from pyro_dvae import check_posterior

    model, guide = small()
    x, mask = data()
    poutine.trace(guide).get_trace(x, None, mask)
    assert model._kalman_cache is not None          # the state that used to fail
    model2, guide2 = copy.deepcopy((model, guide))
    assert model2._kalman_cache is None and guide2.model is model2
    pickle.dumps(model)
    report = check_posterior(model.model, guide, x[:2, :6])
    assert report is not None
    # the original keeps its cache: the next model call still shares the guide's filter
    assert model._kalman_cache is not None


@pytest.mark.parametrize("kalman_dtype", ["float32", "float64"])
def test_kalman_algebra_stays_in_its_dtype_under_bf16_autocast(kalman_dtype):
    """bf16 mixed precision (``--precision bf16``) leaves the Kalman algebra in ``kalman_dtype``
    (the same filter, smoother, posterior draw and densities as outside autocast for the same
    LDS), and the mixed matrices are convex combinations in full precision (the softmax weights
    sum to 1 although the alpha network runs in bf16)."""
    from pyro_dvae.precision import autocast

    torch.manual_seed(0)
    model, _ = pyro_dvae.build("kvae", x_dim=F, z_dim=3, a_dim=4, K=3, kalman_dtype=kalman_dtype)
    a = torch.randn(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    ssm = model.ssm(a)
    a_k = a.to(ssm.A.dtype)

    def run():
        post = ssm.posterior(a_k, mask)
        torch.manual_seed(1)
        z = post.rsample()
        return (post.filtered.log_lik, post.smoothed.cov, z, post.log_prob(z),
                post.conditional(2, z[:, 3])[0], ssm.filter(a_k).loc)

    ref = run()
    with autocast("bf16"):
        out = run()
        with torch.no_grad():
            model.A_bank.copy_(torch.eye(3).expand(3, 3, 3))
        A = model.ssm(a).A
    for r, o in zip(ref, out):
        assert o.dtype == getattr(torch, kalman_dtype)
        assert torch.allclose(r, o, rtol=1e-6, atol=1e-6)
    assert A.dtype == getattr(torch, kalman_dtype)
    assert torch.allclose(A, torch.eye(3, dtype=A.dtype).expand_as(A), atol=1e-6)
