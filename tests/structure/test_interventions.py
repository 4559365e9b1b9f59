"""check_posterior cannot be fooled by dependencies without a gradient (issue 11).

Hand-written model/guide pairs whose ground truth holds by construction: a guide that reads a frame
through ``.detach()`` or ``torch.sign`` depends on it (extra); a transition that is inactive
(``relu(|z| - 5)``) or saturated (``3 tanh(60 z)``) where the draws fall is still an edge; weights
the user set to zero do not hide an edge.  Where an edge can be neither found nor ruled out (a
latent with an unbounded discrete support, a value that changes which sites the program samples),
the report says so and the verdict is "undetermined" when it matters.
"""

import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import pyro_dvae.structure as structure_pkg
from pyro_dvae import check_posterior
from pyro_dvae.cli import cli

from .test_handwritten import (A, C, _x, exact_by_name, future, gaussian_exact, iid, lg_ssm,
                               linear_guide, rows, sem_ssm)

T = 7
ORDER = [f"z_{t}" for t in range(1, T + 1)]
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def ssm_edges(report):
    return {(str(a), str(b)) for a, b in report.graph.edges}


SSM_EDGES = ({(f"z_{t - 1}", f"z_{t}") for t in range(2, T + 1)}
             | {(f"z_{t}", f"x_{t}") for t in range(1, T + 1)})


# ---- dependencies without a gradient path ----------------------------------------------------

def detached_past_guide(x):
    """q(z_t | z_{t-1}, x_{t:T}) plus x_{1:t-1} through .detach(): extra x_{1:t-1}."""
    with pyro.plate("batch", x.shape[0]):
        z = x.new_zeros(x.shape[0])
        for t in range(1, x.shape[1] + 1):
            loc = 0.5 * z + 0.3 * x[:, t - 1:, 0].sum(1) + 0.2 * x[:, :t - 1, 0].detach().sum(1)
            z = pyro.sample(f"z_{t}", dist.Normal(loc, 1.0))


def test_linear_ssm_guide_reading_the_past_through_detach():
    report = check_posterior(lg_ssm, detached_past_guide, _x())
    r = rows(report)["z_t"]
    assert r["exact"] == ["z_{t-1}", "x_{t:T}"]
    assert r["guide"] == ["z_{t-1}", "x_{1:T}"] and r["extra"] == ["x_{1:t-1}"]
    assert r["status"] == "not consistent" and not report.consistent
    assert exact_by_name(report) == gaussian_exact(sem_ssm(T), ORDER)
    assert report.exit_code == 3


def sign_guide(x):
    """q(z_t | x_t, sign(x_{t+1})): the gradient of sign is zero everywhere; extra x_{t+1}."""
    with pyro.plate("batch", x.shape[0]):
        n = x.shape[1]
        for t in range(1, n + 1):
            loc = 0.3 * x[:, t - 1, 0]
            if t < n:
                loc = loc + 0.5 * torch.sign(x[:, t, 0])
            pyro.sample(f"z_{t}", dist.Normal(loc, 1.0))


def test_framewise_guide_reading_the_sign_of_the_next_frame():
    report = check_posterior(iid, sign_guide, _x())
    r = rows(report)["z_t"]
    assert r["exact"] == ["x_t"] and r["guide"] == ["x_{t:t+1}"]
    assert r["extra"] == ["x_{t+1}"] and not r["consistent"]
    assert report.latents[0].notes() == []


def nonlinear_ssm(transition):
    def model(x):
        with pyro.plate("batch", x.shape[0]):
            z = x.new_zeros(x.shape[0])
            for t in range(1, x.shape[1] + 1):
                loc = transition(z) if t > 1 else z
                z = pyro.sample(f"z_{t}", dist.Normal(loc, 1.0))
                pyro.sample(f"x_{t}", dist.Normal(C * z, 1.0), obs=x[:, t - 1, 0])
    return model


@pytest.mark.parametrize("transition", [
    lambda z: torch.relu(z.abs() - 5),   # inactive for typical draws: zero gradient
    lambda z: 3 * torch.tanh(60 * z),    # saturated: gradient below float64 resolution
], ids=["relu-inactive", "tanh-saturated"])
def test_transition_without_gradient_at_the_draws(transition):
    report = check_posterior(nonlinear_ssm(transition), linear_guide(future), _x())
    # the edge z_{t-1} -> z_t at every step, nothing else
    assert ssm_edges(report) == SSM_EDGES
    r = rows(report)["z_t"]
    assert r["exact"] == ["z_{t-1}", "x_{t:T}"] and r["consistent"], str(report)
    # the same exact posterior at every step: that of the SSM's graph
    assert report.latents[0].notes() == []
    assert exact_by_name(report) == gaussian_exact(sem_ssm(T), ORDER)


def readme_example() -> dict:
    """The README's own ``MyDKF`` and ``FilteringGuide`` (the block that defines them, run)."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)
                 if "class MyDKF" in b)
    namespace = {"__name__": "__readme__"}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_readme_dkf_with_a_guide_reading_the_previous_frame_through_detach():
    ns = readme_example()

    class DetachedGuide(ns["FilteringGuide"]):
        """q(z_t | z_{t-1}, x_t) plus x_{t-1} through .detach()."""

        name = "detached"

        def guide(self, x, u=None, mask=None):
            prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1).detach()
            self.sample_chain("z", x, mask, lambda t, z_prev: self.net(
                torch.cat([z_prev, x[:, t] + 0.1 * prev[:, t]], -1)))

    model = ns["MyDKF"]()
    report = check_posterior(model.model, DetachedGuide(model), torch.rand(2, T, 20) + 0.1)
    r = rows(report)["z_t"]
    assert r["exact"] == ["z_{t-1}", "x_{t:T}"]
    assert r["guide"] == ["z_{t-1}", "x_{t-1:t}"]
    assert r["missing"] == ["x_{t+1:T}"] and r["extra"] == ["x_{t-1}"]
    # the README's guide itself: only the missing future
    plain = check_posterior(model.model, ns["FilteringGuide"](model), torch.rand(2, T, 20) + 0.1)
    assert rows(plain)["z_t"]["missing"] == ["x_{t+1:T}"] and rows(plain)["z_t"]["extra"] == []


# ---- parameters the user initialised to zero ------------------------------------------------

class ZeroSSM(nn.Module):
    """z_t | z_{t-1} through a linear layer whose weight the user set to zero, and a guide
    q(z_t | z_{t-1}, x_{t:T}) that also reads x_{1:t-1} through a zero parameter: both edges
    exist in the architecture (training moves the weights), so both must be seen."""

    def __init__(self):
        super().__init__()
        self.transition = nn.Linear(1, 1)
        nn.init.zeros_(self.transition.weight)
        self.past = nn.Parameter(torch.zeros(()))

    def model(self, x):
        pyro.module("zero_ssm", self)
        with pyro.plate("batch", x.shape[0]):
            z = x.new_zeros(x.shape[0])
            for t in range(1, x.shape[1] + 1):
                loc = self.transition(z[:, None])[:, 0] if t > 1 else z
                z = pyro.sample(f"z_{t}", dist.Normal(loc, 1.0))
                pyro.sample(f"x_{t}", dist.Normal(C * z, 1.0), obs=x[:, t - 1, 0])

    def guide(self, x):
        pyro.module("zero_ssm", self)
        scale = pyro.param("zero_scale", torch.zeros(()))  # a zero in Pyro's parameter store
        with pyro.plate("batch", x.shape[0]):
            z = x.new_zeros(x.shape[0])
            for t in range(1, x.shape[1] + 1):
                loc = (0.5 * z + 0.3 * x[:, t - 1:, 0].sum(1)
                       + self.past * x[:, :t - 1, 0].sum(1) + scale * x[:, -1, 0])
                z = pyro.sample(f"z_{t}", dist.Normal(loc, 1.0))


def test_parameters_initialised_to_zero():
    pyro.clear_param_store()
    m = ZeroSSM()
    report = check_posterior(m.model, m.guide, _x())
    assert ssm_edges(report) == SSM_EDGES
    r = rows(report)["z_t"]
    assert r["exact"] == ["z_{t-1}", "x_{t:T}"]
    assert r["guide"] == ["z_{t-1}", "x_{1:T}"] and r["extra"] == ["x_{1:t-1}"]
    # the user's parameters are untouched
    assert not m.transition.weight.detach().any() and not m.past.detach().any()
    assert list(pyro.get_param_store().keys()) == []


def test_a_single_draw_at_the_users_parameters_misses_the_zero_weights():
    """What the re-initialisations are for: without them the zero weights hide both edges."""
    from pyro_dvae.structure import build_report, read_structure

    m = ZeroSSM()
    s = read_structure(m.model, m.guide, _x(), reinits=0)
    r = {x.latent: x for x in build_report(s).latents}["z_t"]
    assert r.exact == ["x_t"] and r.guide == ["z_{t-1}", "x_{t:T}"]
    assert s.draws == 1 and read_structure(m.model, m.guide, _x()).draws == 3


# ---- honest uncertainty ------------------------------------------------------------------------

def ssm_with(latent_site):
    """The linear SSM plus a per-sequence discrete latent ``n`` that nothing uses."""
    def model(x):
        with pyro.plate("batch", x.shape[0]):
            latent_site(x)
            z = x.new_zeros(x.shape[0])
            for t in range(1, x.shape[1] + 1):
                z = pyro.sample(f"z_{t}", dist.Normal(A * z, 1.0))
                pyro.sample(f"x_{t}", dist.Normal(C * z, 1.0), obs=x[:, t - 1, 0])

    def guide(x):
        with pyro.plate("batch", x.shape[0]):
            latent_site(x)
            z = x.new_zeros(x.shape[0])
            for t in range(1, x.shape[1] + 1):
                z = pyro.sample(f"z_{t}", dist.Normal(0.5 * z + 0.3 * x[:, t - 1:, 0].sum(1), 1.0))
    return model, guide


def poisson(x):
    return pyro.sample("n", dist.Poisson(3.0 * x.new_ones(x.shape[0])))


def bernoulli(x):
    return pyro.sample("n", dist.Bernoulli(0.5 * x.new_ones(x.shape[0])))


def test_unbounded_discrete_latent_leaves_its_edges_undetermined():
    """n ~ Poisson: a few replacement values cannot rule out an edge n -> z_t or n -> x_t.  If
    n -> x_t existed, n would be a co-parent of every x_t and z_t's exact posterior would need it:
    the verdict cannot be told, and the report says why."""
    report = check_posterior(*ssm_with(poisson), _x())
    r = rows(report)
    # n itself: if n -> x_t existed, its exact posterior would condition on x_{1:T}
    assert r["n"]["status"] == "undetermined" and r["n"]["undetermined"] == ["x_{1:T}"]
    assert r["z_t"]["status"] == "undetermined" and not r["z_t"]["consistent"]
    assert r["z_t"]["exact"] == ["z_{t-1}", "x_{t:T}"] and r["z_t"]["undetermined"] == ["n"]
    assert r["z_t"]["missing"] == [] and r["z_t"]["extra"] == []
    assert report.missing_edges() == [] and report.extra_edges() == []
    upper = {str(z): {str(v) for v in vs} for z, vs in report.exact_upper.items()}
    assert upper["z_3"] == {"n", "z_2", "x_3", "x_4", "x_5", "x_6", "x_7"}
    d = report.to_dict()
    assert d["status"] == "undetermined" and not d["consistent"]
    assert "n -> x_1" in d["undetermined_edges"]["model"]
    assert "n -> z_3" in d["undetermined_edges"]["guide"]
    assert report.exit_code == 4
    assert "cannot tell" in str(report) and "n -> x_1" in str(report)


def test_enumerable_discrete_latent_is_determined():
    """n ~ Bernoulli inside the plate: both support values are tried, every edge is known."""
    report = check_posterior(*ssm_with(bernoulli), _x())
    d = report.to_dict()
    assert d["undetermined_edges"] == {"model": [], "guide": []}
    assert d["status"] == "consistent" and report.exit_code == 0
    assert rows(report)["z_t"]["exact"] == ["z_{t-1}", "x_{t:T}"]


def alarm_model(x):
    """The frame-wise model plus an observed site that exists only when x_1 is large: replacing
    x_1 changes which sites are sampled, so x_1's edges cannot be compared."""
    iid(x)
    if bool((x[:, 0, 0] > 5).any()):
        with pyro.plate("batch_alarm", x.shape[0]):
            pyro.sample("alarm", dist.Normal(0.0, 1.0), obs=x[:, 0, 0] - 5)


def test_python_control_flow_on_a_value_is_undetermined():
    report = check_posterior(alarm_model, linear_guide(lambda t, n: [t], ()), _x())
    r = rows(report)["z_t"]
    assert r["status"] == "undetermined" and r["undetermined"] == ["x_1"]
    edges = report.to_dict()["undetermined_edges"]
    assert "x_1 -> z_3" in edges["model"] and "x_1 -> z_3" in edges["guide"]
    assert report.exit_code == 4


def test_cli_exit_status_when_undetermined(monkeypatch):
    report = check_posterior(*ssm_with(poisson), _x())
    monkeypatch.setattr(structure_pkg, "check_registered", lambda *a, **k: report)
    res = CliRunner().invoke(cli, ["check-posterior", "--model", "vae", "--format", "json"])
    assert res.exit_code == 4, res.output
    assert '"status": "undetermined"' in res.output


# ---- when the batched interventions cannot be trusted -------------------------------------------

def batch_centred_guide(x):
    """q(z_t | x_t) written with the batch mean of x_t subtracted: the sequences of a batch are
    mixed, so the interventions cannot share one batch and run one at a time (same answer)."""
    with pyro.plate("batch", x.shape[0]):
        for t in range(1, x.shape[1] + 1):
            xt = x[:, t - 1, 0]
            pyro.sample(f"z_{t}", dist.Normal(0.3 * (xt - 0.5 * xt.mean()), 1.0))


def fussy_guide(x):
    """q(z_t | x_t) that refuses large frames: the batch raises, each kind of replacement value
    runs as its own batch, the failing one value by value."""
    if bool((x.abs() > 50).any()):
        raise ValueError("frame out of range")
    linear_guide(lambda t, n: [t], ())(x)


@pytest.mark.parametrize("guide", [batch_centred_guide, fussy_guide], ids=["mixing", "raising"])
def test_interventions_fall_back_to_one_at_a_time(guide):
    report = check_posterior(iid, guide, _x())
    r = rows(report)["z_t"]
    assert r["exact"] == ["x_t"] and r["guide"] == ["x_t"] and r["consistent"], str(report)
    assert report.to_dict()["undetermined_edges"] == {"model": [], "guide": []}
    assert not report.structure.batched
