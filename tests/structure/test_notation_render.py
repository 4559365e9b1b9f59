"""The notation summariser (index sets relative to t and T) and the graphviz drawing."""

import sys

import pytest

from pyro_dvae.structure import RenderError, Var, check_registered
from pyro_dvae.structure import render as render_mod
from pyro_dvae.structure.notation import fit_pattern, format_pattern, runs, summarise

T = 8


def family(sets_of, name="x", T=T):
    """Write {t: indices} for t = 1..T as the paper does."""
    per = {t: [Var(name, i, "observed") for i in sets_of(t)] for t in range(1, T + 1)}
    return summarise(per, {name: 0}, {name: (1, T)}, T)


@pytest.mark.parametrize("sets_of,expected", [
    (lambda t: [t - 1] if t > 1 else [], "x_{t-1}"),
    (lambda t: range(1, t), "x_{1:t-1}"),
    (lambda t: [t], "x_t"),
    (lambda t: range(t, T + 1), "x_{t:T}"),
    (lambda t: range(1, T + 1), "x_{1:T}"),
    (lambda t: range(t + 1, T + 1), "x_{t+1:T}"),
    (lambda t: range(1, t + 1), "x_{1:t}"),
    (lambda t: range(max(1, t - 1), min(T, t + 1) + 1), "x_{t-1:t+1}"),
    (lambda t: [i for i in (t - 2, t - 1) if i >= 1], "x_{t-2:t-1}"),
    (lambda t: [3], "x_3"),
    (lambda t: [1], "x_1"),
])
def test_index_sets(sets_of, expected):
    s = family(sets_of)
    assert s.terms == [expected] and s.deviations == {}


def test_two_runs_and_deviation():
    # x_1 and x_{t:T} (two runs at middle steps; one run at t = 1, 2: the truncation)
    s = family(lambda t: sorted({1} | set(range(t, T + 1))))
    assert s.terms == ["x_1", "x_{t:T}"] and s.deviations == {}
    # x_t except at t = 1 where it is x_{1:T}: a boundary deviation in absolute notation
    s = family(lambda t: range(1, T + 1) if t == 1 else [t])
    assert s.terms == ["x_t"] and s.deviations == {1: ["x_{1:T}"]}


def test_single_variable_and_order():
    per = {t: [Var("v", None, "latent"), Var("z", t - 1, "latent")] if t > 1
           else [Var("v", None, "latent")] for t in range(1, T + 1)}
    s = summarise(per, {"v": 0, "z": 1}, {"z": (1, T)}, T)
    assert s.terms == ["v", "z_{t-1}"] and s.deviations == {}


def test_runs_and_format():
    assert runs([5, 1, 2, 3]) == [(1, 3), (5, 5)]
    fit = fit_pattern({None: frozenset(range(1, T + 1))}, 1, T)
    assert format_pattern("a", fit.pattern, T) == ["a_{1:T}"]


# ---- rendering --------------------------------------------------------------------------------

def test_missing_links_are_gold():
    pytest.importorskip("graphviz")
    report = check_registered("dkf", "mf-lr", steps=5)
    source = render_mod.to_graphviz(report).source if render_mod.shutil.which("dot") else None
    if source is None:
        pytest.skip("Graphviz `dot` is not installed")
    # mf-lr misses z_{t-1} at t = 2..5: four gold edges; extra x_{1:t-1}: 1+2+3+4 red edges
    assert source.count(render_mod.GOLD) == 4 == len(report.missing_edges())
    assert source.count(render_mod.EXTRA) == 10 == len(report.extra_edges())


def test_render_png(tmp_path):
    pytest.importorskip("graphviz")
    if render_mod.shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed")
    out = tmp_path / "srnn.png"
    path = check_registered("srnn", "filtering", steps=5).render(str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("srnn.png")


def test_render_without_dot_says_how_to_install(monkeypatch):
    report = check_registered("vae", steps=5)
    monkeypatch.setattr(render_mod.shutil, "which", lambda name: None)
    with pytest.raises(RenderError, match="apt-get install graphviz"):
        report.render("out.png")


def test_render_without_python_package_says_how_to_install(monkeypatch):
    report = check_registered("vae", steps=5)
    monkeypatch.setitem(sys.modules, "graphviz", None)  # import fails
    with pytest.raises(RenderError, match="pip install graphviz"):
        report.render("out.png")
