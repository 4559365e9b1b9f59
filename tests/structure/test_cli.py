"""``pyro-dvae check-posterior``: text and JSON output for one model, errors, rendering."""

import json

from click.testing import CliRunner

from pyro_dvae.cli import cli
from pyro_dvae.structure import render as render_mod


def run(*args):
    return CliRunner().invoke(cli, ["check-posterior", *args])


def test_text_output_srnn_filtering():
    res = run("--model", "srnn", "--guide", "filtering")
    assert res.exit_code == 3, res.output  # 3: some latent is not consistent
    lines = res.output.splitlines()
    assert lines[0].startswith("model: srnn   guide: filtering")
    header = next(i for i, line in enumerate(lines) if line.startswith("latent"))
    assert lines[header].split() == ["latent", "exact", "posterior", "guide", "missing", "extra",
                                     "verdict"]
    row = lines[header + 2]
    assert row.startswith("z_t ")
    assert "z_{t-1}, x_{1:T}" in row and "z_{t-1}, x_{1:t}" in row and "x_{t+1:T}" in row
    assert row.rstrip().endswith("NOT consistent")
    assert lines[-1] == "verdict: NOT consistent: z_t (missing x_{t+1:T})"


def test_json_output_dkf_default_guide():
    res = run("--model", "dkf", "--format", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {
        "model": "dkf", "guide": "dks",
        "latents": [{"latent": "z_t", "exact": ["z_{t-1}", "x_{t:T}"],
                     "guide": ["z_{t-1}", "x_{t:T}"], "missing": [], "extra": [],
                     "consistent": True, "status": "consistent", "undetermined": []}],
        "consistent": True, "status": "consistent",
        "undetermined_edges": {"model": [], "guide": []}, "notes": []}


def test_bad_model_and_guide():
    res = run("--model", "nope")
    assert res.exit_code == 1 and res.output.startswith("Error: unknown model 'nope'")
    assert "Traceback" not in res.output
    res = run("--model", "dkf", "--guide", "nope")
    assert res.exit_code == 1 and "choose from dks" in res.output
    assert run().exit_code == 2  # --model is required


def test_render_without_graphviz(monkeypatch):
    monkeypatch.setattr(render_mod.shutil, "which", lambda name: None)
    res = run("--model", "vae", "--render", "graph.png")
    assert res.exit_code == 1
    assert "apt-get install graphviz" in res.output and "pip install graphviz" in res.output
