"""Each model's and each guide's time dependencies are what the paper's equations say.

Dependencies are read with autograd (HELPER_BRIEF: exact zeros where there is no path): the model
and the guide run with every latent site conditioned on a leaf tensor, and for each step t we ask
which x_s, z_s (s = 1..T), v and u_s change

- the prior parameters (loc, scale) of p(z_t | ...), and the decoder outputs of p(x_t | ...);
- the guide parameters (loc, scale) of q(z_t | ...) (and of q(v | ...) for the DSAE).

Derivatives with respect to x are partial (z held at its conditioned value), which is what the
paper's compact notation q(z_t | z_{1:t-1}, x_{1:t}) means.  Expected sets are written in the paper's
notation ("1:t-1", "t:T", ...) and compared with the measured sets for every step t, so a vectorised
computation that peeks one step ahead (or a recursion that forgets a path) fails.
"""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

import pyro_dvae
from pyro_dvae.distributions import NormalStep
from pyro_dvae.registry import REGISTRY

T, F, Z, U = 6, 5, 2, 3


# ---- reading dependencies ------------------------------------------------------------------------
def _span(spec: str, t: int) -> set[int]:
    """'1:t-1', 't:T', 't-1:t+1', 't', '' -> the set of 1-based indices, clipped to 1..T."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition(":")
        hi = hi or lo
        a, b = (int(eval(e, {}, {"t": t, "T": T})) for e in (lo, hi))
        out |= {s for s in range(a, b + 1) if 1 <= s <= T}
    return out


def _support(out: torch.Tensor, wrt: torch.Tensor) -> set[int]:
    """1-based time indices s at which d(out . w)/d wrt[:, s] is non-zero (random w)."""
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * w).sum(), wrt, retain_graph=True, allow_unused=True)
    if g is None:
        return set()
    return {s + 1 for s in range(wrt.shape[1]) if g[:, s].abs().max() > 0}


def _depends_on(out: torch.Tensor, wrt: torch.Tensor) -> bool:
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * w).sum(), wrt, retain_graph=True, allow_unused=True)
    return g is not None and bool(g.abs().max() > 0)


def _inputs(model, driven=False):
    torch.manual_seed(3)
    x = (torch.rand(1, T, F, dtype=torch.float64) + 0.1).requires_grad_()
    z = torch.randn(1, T, Z, dtype=torch.float64, requires_grad=True)
    data = {f"z_{t + 1}": z[:, t] for t in range(T)}
    v = None
    if hasattr(model, "v_dim"):
        v = torch.randn(1, model.v_dim, dtype=torch.float64, requires_grad=True)
        data["v"] = v
    u = torch.randn(1, T, U, dtype=torch.float64, requires_grad=True) if driven else None
    return x, z, v, u, data


def _deps(out, x, z, v, u):
    d = {"x": _support(out, x), "z": _support(out, z)}
    if v is not None:
        d["v"] = _depends_on(out, v)
    if u is not None:
        d["u"] = _support(out, u)
    return d


def model_dependencies(model, driven=False):
    """{("prior" | "emission", t): {"x": set, "z": set, ["v": bool], ["u": set]}} for t = 1..T."""
    model.double()
    x, z, v, u, data = _inputs(model, driven)
    trace = poutine.trace(poutine.condition(model.model, data=data)).get_trace(x, u)
    out = {}
    for t in range(1, T + 1):
        prior = trace.nodes[f"z_{t}"]["fn"]
        params = torch.cat([prior.loc, prior.scale], -1)
        out["prior", t] = _deps(params, x, z, v, u) if params.requires_grad else _deps_none(v, u)
        emission = trace.nodes[f"x_{t}"]["fn"].seq.params()[:, t - 1]
        out["emission", t] = _deps(emission, x, z, v, u)
    return out


def _deps_none(v, u):
    d = {"x": set(), "z": set()}
    if v is not None:
        d["v"] = False
    if u is not None:
        d["u"] = set()
    return d


def guide_dependencies(model, guide, driven=False):
    """{(site, t): deps} of the guide's parameters; site "z" for t = 1..T, and ("v", 0)."""
    model.double(), guide.double()
    x, z, v, u, data = _inputs(model, driven)
    trace = poutine.trace(poutine.condition(guide, data=data)).get_trace(x, u)
    out = {}
    for t in range(1, T + 1):
        fn = trace.nodes[f"z_{t}"]["fn"]
        assert isinstance(fn, NormalStep)
        out["z", t] = _deps(torch.cat([fn.loc, fn.scale], -1), x, z, v, u)
    if v is not None:
        fn = trace.nodes["v"]["fn"].base_dist
        out["v", 0] = _deps(torch.cat([fn.loc, fn.scale], -1), x, z, v, u)
    return out


# ---- what the paper says -------------------------------------------------------------------------
# model name -> {"prior": {...}, "emission": {...}} in the paper's notation; "v": True when the
# density depends on the sequence-level latent.
MODEL_DEPS = {
    "vae": {"prior": {}, "emission": {"z": "t"}},                                  # (2.2-2.3)
    "dkf": {"prior": {"z": "t-1"}, "emission": {"z": "t"}},                        # (5.1)
    "srnn": {"prior": {"x": "1:t-1", "z": "t-1"},                                  # (9.7)
             "emission": {"x": "1:t-1", "z": "t"}},
    "storn": {"prior": {}, "emission": {"x": "1:t-1", "z": "1:t"}},                # (7.10)
    "vrnn": {"prior": {"x": "1:t-1", "z": "1:t-1"},                                # (8.8)
             "emission": {"x": "1:t-1", "z": "1:t"}},
    "rvae-causal": {"prior": {}, "emission": {"z": "1:t"}},                        # (10.8)
    "rvae-noncausal": {"prior": {}, "emission": {"z": "1:T"}},                     # (10.15)
    "dsae": {"prior": {"z": "1:t-1", "v": False},                                  # (11.1)
             "emission": {"z": "t", "v": True}},
}

# (model, guide) -> {"z": deps of q(z_t | ...), ["v": deps of q(v | ...)]}
GUIDE_DEPS = {
    ("vae", "frame"): {"z": {"x": "t"}},                                           # (2.6)
    ("dkf", "dks"): {"z": {"z": "t-1", "x": "t:T"}},                               # (5.4-5.7)
    ("dkf", "st-l"): {"z": {"z": "t-1", "x": "1:t"}},                              # 5.2
    ("dkf", "st-lr"): {"z": {"z": "t-1", "x": "1:T"}},
    ("dkf", "mf-t"): {"z": {"x": "t"}},
    ("dkf", "mf-local"): {"z": {"x": "t-1:t+1"}},
    ("dkf", "mf-l"): {"z": {"x": "1:t"}},
    ("dkf", "mf-lr"): {"z": {"x": "1:T"}},
    ("srnn", "smoothing"): {"z": {"z": "t-1", "x": "1:T"}},                        # (9.9-9.13)
    ("srnn", "filtering"): {"z": {"z": "t-1", "x": "1:t"}},                        # end of 9.2
    ("storn", "filtering"): {"z": {"x": "1:t"}},                                   # (7.19)
    ("storn", "consistent"): {"z": {"z": "1:t-1", "x": "1:T"}},                    # (7.12)
    ("vrnn", "filtering"): {"z": {"z": "1:t-1", "x": "1:t"}},                      # (8.14)
    ("vrnn", "backward"): {"z": {"z": "1:t-1", "x": "1:T"}},                       # 8.4
    ("rvae-causal", "backward"): {"z": {"z": "1:t-1", "x": "t:T"}},                # (10.23)
    ("rvae-noncausal", "bidirectional"): {"z": {"z": "1:t-1", "x": "1:T"}},        # (10.30)
    ("dsae", "full"): {"v": {"x": "1:T"}, "z": {"x": "1:T", "v": True}},           # (11.11-11.22)
    ("dsae", "factorized"): {"v": {"x": "1:T"}, "z": {"x": "t"}},                  # (11.10)
}


def _expected(spec: dict, t: int, has_v: bool, u_spec=None) -> dict:
    d = {"x": _span(spec.get("x", ""), t), "z": _span(spec.get("z", ""), t)}
    if has_v:
        d["v"] = spec.get("v", False)
    if u_spec is not None:
        d["u"] = _span(u_spec, t)
    return d


def test_every_pair_of_these_models_has_a_row():
    for name in MODEL_DEPS:
        for g in REGISTRY[name].guides:
            assert (name, g) in GUIDE_DEPS, f"no expected dependencies for guide {name}/{g}"


@pytest.mark.parametrize("name", list(MODEL_DEPS))
def test_model_dependencies(name):
    model, _ = pyro_dvae.build(name, x_dim=F, z_dim=Z)
    deps = model_dependencies(model)
    has_v = hasattr(model, "v_dim")
    for (kind, t), got in deps.items():
        want = _expected(MODEL_DEPS[name][kind], t, has_v)
        assert got == want, f"{name} {kind} at t={t}: got {got}, paper says {want}"


@pytest.mark.parametrize("name,guide_name", list(GUIDE_DEPS), ids=[f"{n}-{g}" for n, g in GUIDE_DEPS])
def test_guide_dependencies(name, guide_name):
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z)
    deps = guide_dependencies(model, guide)
    has_v = hasattr(model, "v_dim")
    for (site, t), got in deps.items():
        want = _expected(GUIDE_DEPS[name, guide_name][site], t, has_v)
        assert got == want, f"{name}/{guide_name} q({site}_{t} | ...): got {got}, expected {want}"


def test_vrnn_decoder_ignores_future_x():
    """The issue's example, spelled out: VRNN's decoder output at t is unchanged when x_{t+1:T}
    changes (z fixed), and changes when x_{t-1} does."""
    model, _ = pyro_dvae.build("vrnn", x_dim=F, z_dim=Z)
    x = torch.rand(1, T, F) + 0.1
    z = torch.randn(1, T, Z)
    data = {f"z_{t + 1}": z[:, t] for t in range(T)}

    def decoder_out(x_):
        tr = poutine.trace(poutine.condition(model.model, data=data)).get_trace(x_)
        return tr.nodes["x_1"]["fn"].seq.params().detach()

    t = 3  # 0-based: the 4th frame
    x_future, x_past = x.clone(), x.clone()
    x_future[:, t + 1:] += 1.0
    x_past[:, t - 1] += 1.0
    base = decoder_out(x)
    assert torch.equal(decoder_out(x_future)[:, :t + 1], base[:, :t + 1])
    assert not torch.allclose(decoder_out(x_past)[:, t], base[:, t])


def test_rvae_future_latent():
    """Non-causal RVAE: x_t's decoder output changes with z_{t+1}; causal RVAE: it does not."""
    for name, changes in (("rvae-noncausal", True), ("rvae-causal", False)):
        model, _ = pyro_dvae.build(name, x_dim=F, z_dim=Z)
        z = torch.randn(1, T, Z)
        z2 = z.clone()
        z2[:, 3] += 1.0
        out, out2 = (model.emission(zz, {}, None, None).detach() for zz in (z, z2))
        assert not torch.equal(out[:, 3], out2[:, 3])
        assert (not torch.equal(out[:, 2], out2[:, 2])) == changes, name


# ---- driven mode: u_t enters where the paper's general DVAE (4.1.1) puts it ---------------------------
DRIVEN_MODEL_U = {  # model -> (u deps of the prior, of the decoder)
    "dkf": ("t", ""),              # p(z_t | z_{t-1}, u_t)  (5.1)
    "srnn": ("1:t", "1:t"),        # h_t = d_h(x_{t-1}, u_t, h_{t-1})  (9.1)
    "storn": ("", "1:t"),          # h_t = d_h(x_{t-1}, u_t, z_t, h_{t-1})
    # h_t = d_h(phi_x(x_{t-1}), phi_z(z_{t-1}), u_t, h_{t-1}) for t >= 2; h_1 = 0 is the authors'
    # first-step convention (models/vrnn.py), so no LSTM step consumes u_1
    "vrnn": ("2:t", "2:t"),
}
DRIVEN_GUIDE_U = {
    ("dkf", "dks"): "t:T", ("dkf", "st-l"): "1:t", ("dkf", "st-lr"): "1:T",
    ("dkf", "mf-t"): "t", ("dkf", "mf-local"): "t-1:t+1", ("dkf", "mf-l"): "1:t",
    ("dkf", "mf-lr"): "1:T",
    ("srnn", "smoothing"): "1:T", ("srnn", "filtering"): "1:t",
    ("storn", "filtering"): "1:t", ("storn", "consistent"): "1:T",
    ("vrnn", "filtering"): "2:t", ("vrnn", "backward"): "2:t",   # through h_t, h_1 = 0
}


@pytest.mark.parametrize("name", list(DRIVEN_MODEL_U))
def test_driven_model_u_dependencies(name):
    model, _ = pyro_dvae.build(name, x_dim=F, z_dim=Z, u_dim=U)
    deps = model_dependencies(model, driven=True)
    u_prior, u_emission = DRIVEN_MODEL_U[name]
    for (kind, t), got in deps.items():
        u_spec = u_prior if kind == "prior" else u_emission
        want = _expected(MODEL_DEPS[name][kind], t, False, u_spec)
        assert got == want, f"driven {name} {kind} at t={t}: got {got}, expected {want}"


@pytest.mark.parametrize("name,guide_name", list(DRIVEN_GUIDE_U),
                         ids=[f"{n}-{g}" for n, g in DRIVEN_GUIDE_U])
def test_driven_guide_u_dependencies(name, guide_name):
    model, guide = pyro_dvae.build(name, guide=guide_name, x_dim=F, z_dim=Z, u_dim=U)
    deps = guide_dependencies(model, guide, driven=True)
    for (site, t), got in deps.items():
        want = _expected(GUIDE_DEPS[name, guide_name][site], t, False,
                         DRIVEN_GUIDE_U[name, guide_name])
        assert got == want, f"driven {name}/{guide_name} at t={t}: got {got}, expected {want}"


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("guide_name", ["filtering", "backward"])
def test_vrnn_states_shared_with_guide_are_exact(guide_name, fused):
    """The VRNN model takes h_{1:T} from its guide (8.13) instead of recomputing it: same ELBO and
    same gradients as recomputing, and the model's own LSTM pass is skipped (per-step and fused
    sites)."""
    from pyro.infer import Trace_ELBO

    from pyro_dvae.models.base import fused_sites

    x = torch.rand(3, T, F, dtype=torch.float64) + 0.1
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[0, 4:] = False
    results = []
    for share in (True, False):
        model, guide = pyro_dvae.build("vrnn", guide=guide_name, x_dim=F, z_dim=Z)
        model.double(), guide.double()
        torch.manual_seed(0)
        model.load_state_dict({k: torch.randn_like(v) * 0.3 for k, v in model.state_dict().items()})
        guide.load_state_dict({k: torch.randn_like(v) * 0.3 for k, v in guide.state_dict().items()})
        if not share:
            model.share_states = lambda *args: None
        calls = []
        model.h_rnn.rnn.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        torch.manual_seed(1)
        with fused_sites(fused):
            loss = Trace_ELBO().differentiable_loss(model.model, guide, x, None, mask)
        loss.backward()
        grads = [p.grad.clone() for p in list(model.parameters()) + list(guide.parameters())]
        results.append((loss.detach(), grads, len(calls)))
    (l1, g1, calls1), (l2, g2, calls2) = results
    assert torch.allclose(l1, l2, rtol=1e-12, atol=1e-10)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g1, g2))
    # the guide steps d_h with nn.lstm_step (no module call; h_1 = 0 needs none); + one
    # vectorised pass when the model recomputes
    assert calls1 == 0 and calls2 == 1


def test_vrnn_copies_after_a_run():
    """The shared-state caches do not stop copy.deepcopy (used by the structure reader)."""
    import copy

    from pyro.infer import Trace_ELBO

    model, guide = pyro_dvae.build("vrnn", x_dim=F, z_dim=Z)
    x = torch.rand(2, T, F) + 0.1
    Trace_ELBO().differentiable_loss(model.model, guide, x).backward()
    guide(x)  # a guide run alone leaves h_{1:T} waiting for the model
    model2, guide2 = copy.deepcopy((model, guide))
    assert guide2.model is model2
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
