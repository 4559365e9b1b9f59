"""check_posterior on small hand-written Pyro models it has never seen.

Each model's exact posterior is derived by hand in its comment (D-separation on the compact DAG)
and cross-checked against an independent oracle: the models are linear-Gaussian, so the exact
posterior p(z_i | z_{<i}, x, u) is Gaussian and conditions on exactly the variables with a non-zero
coefficient in the conditional mean, computed by brute-force Gaussian conditioning of the joint
covariance (inputs u are given a unit-variance prior: conditioning on them is the same).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_dvae import check_posterior
from pyro_dvae.structure import StructureError

T = 7
A, B2, C, D, G = 0.8, -0.5, 1.3, 0.9, 0.7  # transition, 2nd-order, emission, global, drive


def _x(T=T, batch=2, seed=0):
    return torch.randn(batch, T, 1, generator=torch.Generator().manual_seed(seed))


# ---- the models -------------------------------------------------------------------------------

def lg_ssm(x):
    """Linear-Gaussian SSM: z_t | z_{t-1}, x_t | z_t.  By hand: given z_{1:t-1} and x_{1:T}, z_{t-1}
    blocks every path from z_{1:t-2} and x_{1:t-1} (chains through an observed node); x_{t:T}
    hang below z_t.  Exact: z_{t-1}, x_{t:T}."""
    with pyro.plate("batch", x.shape[0]):
        z = x.new_zeros(x.shape[0])
        for t in range(1, x.shape[1] + 1):
            z = pyro.sample(f"z_{t}", dist.Normal(A * z, 1.0))
            pyro.sample(f"x_{t}", dist.Normal(C * z, 1.0), obs=x[:, t - 1, 0])


def second_order(x):
    """z_t | z_{t-1}, z_{t-2} directly.  By hand: both are parents; z_{t-3} reaches z_t only
    through the observed z_{t-1}, z_{t-2} (chains, blocked); x_{t:T} below z_t, z_{t+1}, ...
    Exact: z_{t-2:t-1}, x_{t:T}."""
    with pyro.plate("batch", x.shape[0]):
        z1 = z2 = x.new_zeros(x.shape[0])
        for t in range(1, x.shape[1] + 1):
            z = pyro.sample(f"z_{t}", dist.Normal(A * z1 + B2 * z2, 1.0))
            pyro.sample(f"x_{t}", dist.Normal(C * z, 1.0), obs=x[:, t - 1, 0])
            z1, z2 = z, z1


def driven(x, u):
    """Driven SSM: z_t | z_{t-1}, u_t.  By hand: u_t is a parent; u_{t+1} -> z_{t+1} <- z_t with the
    collider z_{t+1} having observed descendants x_{t+1:T}: open, so u_{t:T} all matter; u_{t-1}
    reaches z_t only through the observed z_{t-1}.  Exact: z_{t-1}, x_{t:T}, u_{t:T}."""
    with pyro.plate("batch", x.shape[0]):
        z = x.new_zeros(x.shape[0])
        for t in range(1, x.shape[1] + 1):
            z = pyro.sample(f"z_{t}", dist.Normal(A * z + G * u[:, t - 1, 0], 1.0))
            pyro.sample(f"x_{t}", dist.Normal(C * z, 1.0), obs=x[:, t - 1, 0])


def global_latent(x):
    """A sequence-level latent w (like DSAE's v): x_t | z_t, w.
    Guide order w, z_1..z_T.  w: every x_t is its child: x_{1:T}.  z_t given w, z_{1:t-1}: as the
    SSM plus its co-parent w at x_t: w, z_{t-1}, x_{t:T}.
    Guide order z_1..z_T, w (w marginalised while z_t is inferred): z_{t-2} -> x_{t-2} <- w -> x_t
    <- z_t is open (observed colliders, unobserved fork), so z_t needs z_{1:t-1}, x_{1:T}; and w
    needs every x_t and every co-parent z_t: z_{1:T}, x_{1:T}."""
    with pyro.plate("batch", x.shape[0]):
        w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        z = x.new_zeros(x.shape[0])
        for t in range(1, x.shape[1] + 1):
            z = pyro.sample(f"z_{t}", dist.Normal(A * z, 1.0))
            pyro.sample(f"x_{t}", dist.Normal(C * z + D * w, 1.0), obs=x[:, t - 1, 0])


def iid(x):
    """z_t iid, x_t | z_t (a frame-wise VAE).  Exact: x_t."""
    with pyro.plate("batch", x.shape[0]):
        for t in range(1, x.shape[1] + 1):
            z = pyro.sample(f"z_{t}", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample(f"x_{t}", dist.Normal(C * z, 1.0), obs=x[:, t - 1, 0])


# ---- guides: q(z_t | z_{t-k} for k in lags, x_s for s in window(t), u_s for s in u_window(t)) --

def linear_guide(window, lags=(1,), u_window=None, global_first=False, global_last=False,
                 z_uses_w=True, extra_site=None):
    def guide(x, u=None):
        n = x.shape[1]
        with pyro.plate("batch", x.shape[0]):
            w = None
            if global_first:
                w = pyro.sample("w", dist.Normal(0.1 * x[:, :, 0].sum(1), 1.0))
            zs = []
            for t in range(1, n + 1):
                loc = x.new_zeros(x.shape[0])
                for k in lags:
                    if t - k >= 1:
                        loc = loc + 0.5 * zs[t - k - 1]
                for s in window(t, n):
                    loc = loc + 0.3 * x[:, s - 1, 0]
                for s in (u_window(t, n) if u_window else ()):
                    loc = loc + 0.2 * u[:, s - 1, 0]
                if w is not None and z_uses_w:
                    loc = loc + 0.4 * w
                zs.append(pyro.sample(f"z_{t}", dist.Normal(loc, 1.0)))
            if global_last:
                loc = 0.1 * x[:, :, 0].sum(1) + 0.2 * torch.stack(zs, 1).sum(1)
                pyro.sample("w", dist.Normal(loc, 1.0))
            if extra_site:
                pyro.sample(extra_site, dist.Normal(x.new_zeros(x.shape[0]), 1.0))
    return guide


def future(t, n):
    return range(t, n + 1)


def everything(t, n):
    return range(1, n + 1)


# ---- the independent oracle: Gaussian conditioning ----------------------------------------------

def sem_ssm(n, second=False, drive=False, glob=False):
    """The same models as linear structural equations: name -> [(parent, coefficient)]."""
    eq = {}
    if glob:
        eq["w"] = []
    for t in range(1, n + 1):
        if drive:
            eq[f"u_{t}"] = []
        ps = [(f"z_{t - 1}", A)] if t > 1 else []
        if second and t > 2:
            ps.append((f"z_{t - 2}", B2))
        if drive:
            ps.append((f"u_{t}", G))
        eq[f"z_{t}"] = ps
        eq[f"x_{t}"] = [(f"z_{t}", C)] + ([("w", D)] if glob else [])
    return eq


def gaussian_exact(eq, latent_order):
    names = list(eq)
    idx = {v: i for i, v in enumerate(names)}
    n = len(names)
    B = torch.zeros(n, n, dtype=torch.float64)
    for v, ps in eq.items():
        for p, c in ps:
            B[idx[v], idx[p]] = c
    L = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - B)
    cov = L @ L.T
    known = [v for v in names if v not in latent_order]
    out = {}
    for i, z in enumerate(latent_order):
        cond = list(latent_order[:i]) + known
        ci = [idx[v] for v in cond]
        coef = torch.linalg.solve(cov[ci][:, ci], cov[ci, idx[z]])
        big = coef.abs().max()
        out[z] = {v for v, c in zip(cond, coef) if abs(c) > 1e-9 * big}
    return out


def exact_by_name(report):
    return {str(z): {str(v) for v in vs} for z, vs in report.exact_sets.items()}


def rows(report):
    return {r["latent"]: r for r in report.to_dict()["latents"]}


# ---- tests ------------------------------------------------------------------------------------

def test_linear_gaussian_ssm():
    report = check_posterior(lg_ssm, linear_guide(future), _x())
    r = rows(report)["z_t"]
    assert r["exact"] == ["z_{t-1}", "x_{t:T}"]
    assert r["guide"] == ["z_{t-1}", "x_{t:T}"] and r["consistent"]
    assert exact_by_name(report) == gaussian_exact(sem_ssm(T), [f"z_{t}" for t in range(1, T + 1)])
    # the compact DAG itself: z_{t-1} -> z_t -> x_t and nothing else
    edges = {(str(a), str(b)) for a, b in report.graph.edges}
    expected = {(f"z_{t - 1}", f"z_{t}") for t in range(2, T + 1)}
    expected |= {(f"z_{t}", f"x_{t}") for t in range(1, T + 1)}
    assert edges == expected


def test_second_order():
    report = check_posterior(second_order, linear_guide(future), _x())
    r = rows(report)["z_t"]
    assert r["exact"] == ["z_{t-2:t-1}", "x_{t:T}"]
    # a first-order guide misses z_{t-2}
    assert r["guide"] == ["z_{t-1}", "x_{t:T}"] and r["missing"] == ["z_{t-2}"]
    assert not r["consistent"] and not report.to_dict()["consistent"]
    order = [f"z_{t}" for t in range(1, T + 1)]
    assert exact_by_name(report) == gaussian_exact(sem_ssm(T, second=True), order)
    good = check_posterior(second_order, linear_guide(future, lags=(1, 2)), _x())
    assert good.consistent and rows(good)["z_t"]["guide"] == ["z_{t-2:t-1}", "x_{t:T}"]


def test_driven_input():
    x, u = _x(), _x(seed=1)
    report = check_posterior(driven, linear_guide(future, u_window=lambda t, n: [t]), x, u)
    r = rows(report)["z_t"]
    assert r["exact"] == ["z_{t-1}", "x_{t:T}", "u_{t:T}"]
    assert r["guide"] == ["z_{t-1}", "x_{t:T}", "u_t"] and r["missing"] == ["u_{t+1:T}"]
    order = [f"z_{t}" for t in range(1, T + 1)]
    assert exact_by_name(report) == gaussian_exact(sem_ssm(T, drive=True), order)
    # inputs are conditioning variables, not random: they are not nodes with parents
    assert all(v.kind == "input" and v.family == "u" for v in report.structure.inputs)
    good = check_posterior(driven, linear_guide(future, u_window=future), x, u)
    assert good.consistent


def test_global_latent_sampled_first():
    guide = linear_guide(future, global_first=True, z_uses_w=False)
    report = check_posterior(global_latent, guide, _x())
    r = rows(report)
    assert list(r) == ["w", "z_t"]
    assert r["w"]["exact"] == ["x_{1:T}"] and r["w"]["consistent"]
    assert r["z_t"]["exact"] == ["w", "z_{t-1}", "x_{t:T}"]
    # the guide of z_t does not use w: missing
    assert r["z_t"]["guide"] == ["z_{t-1}", "x_{t:T}"] and r["z_t"]["missing"] == ["w"]
    order = ["w"] + [f"z_{t}" for t in range(1, T + 1)]
    assert exact_by_name(report) == gaussian_exact(sem_ssm(T, glob=True), order)
    good = check_posterior(global_latent, linear_guide(future, global_first=True), _x())
    assert good.consistent and rows(good)["z_t"]["guide"] == ["w", "z_{t-1}", "x_{t:T}"]


def test_global_latent_sampled_last_changes_the_exact_posterior():
    guide = linear_guide(everything, lags=range(1, T), global_last=True)
    report = check_posterior(global_latent, guide, _x())
    r = rows(report)
    assert list(r) == ["z_t", "w"]
    assert r["z_t"]["exact"] == ["z_{1:t-1}", "x_{1:T}"] and r["z_t"]["consistent"]
    assert r["w"]["exact"] == ["z_{1:T}", "x_{1:T}"] and r["w"]["consistent"]
    order = [f"z_{t}" for t in range(1, T + 1)] + ["w"]
    assert exact_by_name(report) == gaussian_exact(sem_ssm(T, glob=True), order)


def test_guide_using_a_future_observation_is_extra():
    report = check_posterior(iid, linear_guide(lambda t, n: [t, t + 1] if t < n else [t], ()),
                             _x())
    r = rows(report)["z_t"]
    assert r["exact"] == ["x_t"] and r["guide"] == ["x_{t:t+1}"]
    assert r["missing"] == [] and r["extra"] == ["x_{t+1}"] and not r["consistent"]
    # at t = T there is no x_{T+1}: the obvious truncation, not a deviation
    assert report.latents[0].notes() == []


def test_boundary_deviation_is_noted():
    """A guide whose first step sees everything but the others only x_t: the pattern is x_t and the
    note says what z_1 sees."""
    report = check_posterior(iid, linear_guide(lambda t, n: range(1, n + 1) if t == 1 else [t], ()),
                             _x())
    lat = report.latents[0]
    assert lat.guide == ["x_t"] and lat.extra == []  # pattern of the middle steps
    assert not lat.consistent  # z_1 has extra x_{2:T}
    notes = lat.notes()
    assert "z_1: guide = x_{1:T}" in notes and "z_1: extra = x_{2:T}" in notes
    assert "boundary steps" in str(report)
    assert str(report).splitlines()[-1] == "verdict: NOT consistent: z_t (extra x_{2:T} at z_1)"


def test_table_text():
    text = str(check_posterior(second_order, linear_guide(future), _x()))
    assert "z_t" in text and "z_{t-2:t-1}, x_{t:T}" in text and "NOT consistent" in text
    assert "missing" in text and "z_{t-2}" in text


# ---- robustness ---------------------------------------------------------------------------------

def odd_names(x):
    """Sites not named NAME_t: latents alpha -> beta -> gamma, observed 'obs(a)' ... of x[:, 0..2].
    Exact (order alpha, beta, gamma): alpha | x_{1:3}; beta | alpha, x_{2:3}; gamma | beta, x_3."""
    with pyro.plate("batch", x.shape[0]):
        a = pyro.sample("alpha", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        b = pyro.sample("beta", dist.Normal(A * a, 1.0))
        c = pyro.sample("gamma", dist.Normal(A * b, 1.0))
        for name, v, t in (("obs(a)", a, 0), ("obs(b)", b, 1), ("obs(c)", c, 2)):
            pyro.sample(name, dist.Normal(C * v, 1.0), obs=x[:, t, 0])


def odd_guide(x):
    with pyro.plate("batch", x.shape[0]):
        a = pyro.sample("alpha", dist.Normal(x[:, :, 0].sum(1), 1.0))
        b = pyro.sample("beta", dist.Normal(a + x[:, 1:, 0].sum(1), 1.0))
        pyro.sample("gamma", dist.Normal(b + x[:, 2, 0], 1.0))


def test_site_names_not_following_name_t():
    report = check_posterior(odd_names, odd_guide, _x(T=3))
    d = report.to_dict()
    assert [r["latent"] for r in d["latents"]] == ["alpha", "beta", "gamma"]
    r = rows(report)
    assert r["alpha"]["exact"] == ["x_{1:T}"]
    assert r["beta"]["exact"] == ["alpha", "x_{2:T}"]
    assert r["gamma"]["exact"] == ["beta", "x_T"]
    assert d["consistent"], str(report)
    # observed sites are named by the argument slice they observe
    assert sorted(str(v) for v in report.structure.observed) == ["x_1", "x_2", "x_3"]
    assert report.structure.site_of[report.structure.observed[0]] == "obs(a)"


def whole_sequence(x):
    """One observed site for the whole sequence ('data'), one latent 'theta'."""
    with pyro.plate("batch", x.shape[0]):
        theta = pyro.sample("theta", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        pyro.sample("data", dist.Normal(theta[:, None, None].expand_as(x), 1.0).to_event(2), obs=x)


def test_one_site_observing_the_whole_sequence():
    def guide(x):
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("theta", dist.Normal(x[:, -1, 0], 1.0))  # sees only the last frame

    d = check_posterior(whole_sequence, guide, _x()).to_dict()
    assert d["latents"] == [{"latent": "theta", "exact": ["data"], "guide": ["data"],
                             "missing": [], "extra": [], "consistent": True,
                             "status": "consistent", "undetermined": []}]


def test_guide_samples_a_site_the_model_lacks():
    guide = linear_guide(future, extra_site="nuisance")
    with pytest.raises(StructureError, match="guide samples site.*nuisance.*model does not have"):
        check_posterior(lg_ssm, guide, _x())


def test_guide_misses_a_model_latent():
    with pytest.raises(StructureError, match="model samples latent site.*w.*guide does not sample"):
        check_posterior(global_latent, linear_guide(future), _x())


def test_guide_samples_an_observed_site():
    guide = linear_guide(future, extra_site="x_1")
    with pytest.raises(StructureError, match="x_1.*model observes"):
        check_posterior(lg_ssm, guide, _x())


def test_bad_first_argument():
    with pytest.raises(StructureError, match="first argument must be the observed sequence"):
        check_posterior(lg_ssm, linear_guide(future), torch.zeros(3, dtype=torch.long))


def test_non_causal_model_is_rejected():
    """x_t's distribution computed from x_t itself: not a DAG, said clearly."""
    def model(x):
        with pyro.plate("batch", x.shape[0]):
            for t in range(1, x.shape[1] + 1):
                z = pyro.sample(f"z_{t}", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
                pyro.sample(f"x_{t}", dist.Normal(z + x[:, t - 1, 0], 1.0), obs=x[:, t - 1, 0])

    with pytest.raises(StructureError, match="x_1 depends on its own value"):
        check_posterior(model, linear_guide(future, ()), _x())
