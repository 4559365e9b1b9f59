"""Importing the authors' checkpoints (pyro_dvae.reference, ``pyro-dvae import-reference``).

Two kinds of tests:

- without /work/shared: synthetic checkpoints in the reference's format, written here from the
  tensor tables of ``reference/DVAE-speech/README.md`` (names and shapes, independent of the
  converter's own table), with random values; every tensor must land in one of our parameters,
  and every kind of bad input gives one error and writes nothing;
- with /work/shared (as on CI): the seven real checkpoints import, and pyro-dvae's model and guide,
  with every latent at its guide mean during the recursion, reproduce the reference outputs of
  ``reference/expected/`` within the tolerances of ``expected.json``: encoder means and
  log-variances, learned priors, decoder log-variances and the loss terms after the documented
  offsets (reference KL = proper KL + z_dim / 2 per frame; Itakura-Saito = exponential NLL -
  sum_f (log x + 1)).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pyro.infer import TraceMeanField_ELBO

from pyro_dvae.cli import cli
from pyro_dvae.models.base import use_mean
from pyro_dvae.reference import (ReferenceError, convert, import_reference, outputs_at_means,
                                 read_config)
from pyro_dvae.registry import build
from pyro_dvae.train import load_run

REFERENCE = Path("/work/shared/reference")
CHECKPOINTS = REFERENCE / "DVAE-speech" / "saved_model"
EXPECTED = REFERENCE / "expected"


# ---- the reference format, from the DVAE-speech README's tables ----------------------------------
def _lin(name, i, o):
    return {f"{name}.weight": (o, i), f"{name}.bias": (o,)}


def _mlp(name, i, *widths):
    out = {}
    for k, o in enumerate(widths):
        out.update(_lin(f"{name}.linear{k}", i, o))
        i = o
    return out


def _lstm(name, i, h=128, reverse=False):
    s = "_reverse" if reverse else ""
    return {f"{name}.weight_ih_l0{s}": (4 * h, i), f"{name}.weight_hh_l0{s}": (4 * h, h),
            f"{name}.bias_ih_l0{s}": (4 * h,), f"{name}.bias_hh_l0{s}": (4 * h,)}


X, Z = 257, 16
HEADS = {**_lin("inf_mean", 32, Z), **_lin("inf_logvar", 32, Z), **_lin("gen_logvar", 256, X)}
#: label -> ([Network] fields of config.ini, {tensor name: shape}, registered name, tensor count)
FORMATS = {
    "VAE": ({"name": "VAE", "dense_x_z": "256,128,64,32"},
            {**_mlp("mlp_x_z", X, 256, 128, 64, 32), **_mlp("mlp_z_x", Z, 32, 64, 128, 256),
             **HEADS}, "vae", 22),
    "DKF": ({"name": "DKF", "dense_x_gx": "256", "dim_RNN_gx": "128", "num_RNN_gx": "1",
             "bidir_gx": "False", "dense_ztm1_g": "32,64", "dense_g_z": "64,32",
             "dense_z_x": "32,64,128,256"},
            {**_mlp("mlp_x_gx", X, 256), **_lstm("rnn_gx", 256),
             **_mlp("mlp_ztm1_g", Z, 32, 64), **_lin("mlp_ztm1_g.linear_last", 64, 128),
             **_mlp("mlp_g_z", 128, 64, 32),
             **_lin("mlp_gate.linear1", Z, Z), **_lin("mlp_gate.linear2", Z, Z),
             **_lin("mlp_z_prop.linear1", Z, Z), **_lin("mlp_z_prop.linear2", Z, Z),
             **_lin("prior_mean", Z, Z), **_lin("prior_logvar.1", Z, Z),
             **_mlp("mlp_z_x", Z, 32, 64, 128, 256), **HEADS}, "dkf", 42),
    "STORN": ({"name": "STORN", "dense_x_g": "256", "dim_RNN_g": "128", "num_RNN_g": "1",
               "dense_g_z": "64,32", "dense_z_h": "32,64", "dense_xtm1_h": "256",
               "dense_h_x": "256", "dim_RNN_h": "128", "num_RNN_h": "1"},
              {**_mlp("mlp_x_g", X, 256), **_lstm("rnn_g", 256), **_mlp("mlp_g_z", 128, 64, 32),
               **_mlp("mlp_z_h", Z, 32, 64), **_mlp("mlp_xtm1_h", X, 256),
               **_lstm("rnn_h", 320), **_mlp("mlp_h_x", 128, 256), **HEADS}, "storn", 28),
    "VRNN": ({"name": "VRNN", "dense_x": "256", "dense_z": "32,64", "dense_hx_z": "64,32",
              "dense_hz_x": "256", "dense_h_z": "64,32", "dim_RNN": "128", "num_RNN": "1"},
             {**_mlp("feature_extractor_x", X, 256), **_mlp("feature_extractor_z", Z, 32, 64),
              **_mlp("mlp_hx_z", 384, 64, 32), **_mlp("mlp_h_z", 128, 64, 32),
              **_lin("prior_mean", 32, Z), **_lin("prior_logvar", 32, Z),
              **_mlp("mlp_hz_x", 192, 256), **_lstm("rnn", 320), **HEADS}, "vrnn", 30),
    "SRNN": ({"name": "SRNN", "dense_x_h": "256", "dim_RNN_h": "128", "num_RNN_h": "1",
              "dense_hx_g": "256", "dim_RNN_g": "128", "num_RNN_g": "1", "dense_gz_z": "64,32",
              "dense_hz_x": "256", "dense_hz_z": "64,32"},
             {**_mlp("mlp_x_h", X, 256), **_lstm("rnn_h", 256), **_mlp("mlp_hx_g", 385, 256),
              **_lstm("rnn_g", 256), **_mlp("mlp_gz_z", 144, 64, 32),
              **_mlp("mlp_hz_z", 144, 64, 32), **_lin("prior_mean", 32, Z),
              **_lin("prior_logvar", 32, Z), **_mlp("mlp_hz_x", 144, 256), **HEADS}, "srnn", 32),
}
_RVAE = {"name": "RVAE", "dense_x_gx": "256", "dim_RNN_g_x": "128", "num_RNN_g_x": "1",
         "dense_z_gz": "32,64", "dim_RNN_g_z": "128", "num_RNN_g_z": "1", "dense_g_z": "64,32",
         "dense_z_h": "32,64", "dim_RNN_h": "128", "num_RNN_h": "1", "dense_h_x": "256"}
FORMATS["RVAE-Causal"] = (
    {**_RVAE, "bidir_g_x": "False", "bidir_h": "False"},
    {**_mlp("mlp_x_gx", X, 256), **_lstm("rnn_g_x", 256), **_mlp("mlp_z_gz", Z, 32, 64),
     **_lstm("rnn_g_z", 64), **_mlp("mlp_g_z", 256, 64, 32), **_mlp("mlp_z_h", Z, 32, 64),
     **_lstm("rnn_h", 64), **_mlp("mlp_h_x", 128, 256), **HEADS}, "rvae-causal", 34)
FORMATS["RVAE-NonCausal"] = (
    {**_RVAE, "bidir_g_x": "True", "bidir_h": "True"},
    {**_mlp("mlp_x_gx", X, 256), **_lstm("rnn_g_x", 256), **_lstm("rnn_g_x", 256, reverse=True),
     **_mlp("mlp_z_gz", Z, 32, 64), **_lstm("rnn_g_z", 64), **_mlp("mlp_g_z", 384, 64, 32),
     **_mlp("mlp_z_h", Z, 32, 64), **_lstm("rnn_h", 64), **_lstm("rnn_h", 64, reverse=True),
     **_mlp("mlp_h_x", 256, 256), **HEADS}, "rvae-noncausal", 42)


def config_text(network: dict, stft=None) -> str:
    fields = {"x_dim": "257", "z_dim": "16", "activation": "tanh", "dropout_p": "0",
              "tag": network.get("name", ""), **network}
    stft = {"wlen_sec": "32e-3", "hop_percent": "0.5", "fs": "16000", "zp_percent": "0",
            "trim": "True", **(stft or {})}
    return ("[STFT]\n" + "".join(f"{k} = {v}\n" for k, v in stft.items())
            + "\n[Network]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items())
            + "\n[Training]\nlr = 0.001\nbatch_size = 32\n\n[DataFrame]\nsequence_len = 150\n")


def synthetic(tmp_path: Path, label: str, network=None, state=None, stft=None,
              drop=(), add=None, reshape=None):
    """A checkpoint and config.ini of ``label`` in the reference format (random values), with
    optional damage; returns the checkpoint path."""
    fields, shapes, _, _ = FORMATS[label]
    torch.manual_seed(0)
    sd = {k: torch.randn(s) for k, s in shapes.items() if k not in drop}
    sd.update(add or {})
    for k, s in (reshape or {}).items():
        sd[k] = torch.randn(s)
    folder = tmp_path / label
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd if state is None else state, folder / f"{label}_final_epoch7.pt")
    (folder / "config.ini").write_text(config_text({**fields, **(network or {})}, stft))
    return folder / f"{label}_final_epoch7.pt"


# ---- the converter on synthetic checkpoints ------------------------------------------------------
@pytest.mark.parametrize("label", list(FORMATS))
def test_synthetic_checkpoint_imports_every_tensor_once(tmp_path, label):
    ckpt = synthetic(tmp_path, label)
    _, shapes, name, count = FORMATS[label]
    assert len(shapes) == count  # the README's tensor count
    run = import_reference(ckpt, tmp_path / "run")
    model, guide, cfg = load_run(run)
    assert (cfg["model"], cfg["source"]["tensors"]) == (name, count)
    ref = torch.load(ckpt, weights_only=True)
    ours = [t for m in (model, guide) for t in m.state_dict().values()]
    assert len(ours) == count
    # each reference tensor (random, so unique) is exactly one of our tensors, and vice versa
    for key, value in ref.items():
        hits = [t for t in ours if t.shape == value.shape and torch.equal(t, value)]
        assert len(hits) == 1, key
    history = json.loads((run / "history.json").read_text())
    assert history["status"] == "imported"
    assert history["source"]["checkpoint"] == str(ckpt.resolve())
    assert history["source"]["epoch"] == 7


def test_synthetic_srnn_tensors_land_in_the_named_layers(tmp_path):
    """Spot checks of the table against the README's description of each layer."""
    ref = torch.load(synthetic(tmp_path, "SRNN"), weights_only=True)
    model, guide = build("srnn")
    ms, gs = convert(ref, "srnn", model, guide)
    assert torch.equal(ms["h_rnn.rnn.weight_ih_l0"], ref["rnn_h.weight_ih_l0"])
    assert torch.equal(ms["decoder.0.weight"], ref["mlp_hz_x.linear0.weight"])  # [h_t | z_t]
    assert torch.equal(gs["combiner.2.bias"], ref["mlp_gz_z.linear1.bias"])
    assert torch.equal(gs["g_rnn.rnn.bias_hh_l0"], ref["rnn_g.bias_hh_l0"])


def test_noncausal_directions_map_as_the_reference_runs_them(tmp_path):
    """rnn_g_x runs on the time-reversed x: its l0 weights are our backward x-LSTM; rnn_h runs
    in natural order: its l0 weights are our forward decoder LSTM."""
    ref = torch.load(synthetic(tmp_path, "RVAE-NonCausal"), weights_only=True)
    model, guide = build("rvae-noncausal")
    ms, gs = convert(ref, "rvae-noncausal", model, guide)
    assert torch.equal(gs["x_bwd.rnn.weight_ih_l0"], ref["rnn_g_x.weight_ih_l0"])
    assert torch.equal(gs["x_fwd.rnn.weight_ih_l0"], ref["rnn_g_x.weight_ih_l0_reverse"])
    assert torch.equal(ms["h_rnn.fwd.rnn.weight_hh_l0"], ref["rnn_h.weight_hh_l0"])
    assert torch.equal(ms["h_rnn.bwd.rnn.weight_hh_l0"], ref["rnn_h.weight_hh_l0_reverse"])


def test_other_layer_sizes_from_config(tmp_path):
    """A config with other widths, LSTM sizes and layers imports when the tensors follow it."""
    shapes = {**_mlp("mlp_x_h", X, 100), **_lstm("rnn_h", 100, 48),
              **{k.replace("l0", "l1"): s for k, s in _lstm("rnn_h", 48, 48).items()},
              **_mlp("mlp_hx_g", 48 + X, 80), **_lstm("rnn_g", 80, 40),
              **_mlp("mlp_gz_z", 40 + Z, 24), **_mlp("mlp_hz_z", 48 + Z, 20, 10),
              **_lin("prior_mean", 10, Z), **_lin("prior_logvar", 10, Z),
              **_mlp("mlp_hz_x", 48 + Z, 256, 128), **_lin("inf_mean", 24, Z),
              **_lin("inf_logvar", 24, Z), **_lin("gen_logvar", 128, X)}
    state = {k: torch.randn(s) for k, s in shapes.items()}
    ckpt = synthetic(tmp_path, "SRNN", state=state, network={
        "dense_x_h": "100", "dim_RNN_h": "48", "num_RNN_h": "2", "dense_hx_g": "80",
        "dim_RNN_g": "40", "dense_gz_z": "24", "dense_hz_z": "20,10", "dense_hz_x": "256,128",
        "activation": "relu"})
    model, guide, cfg = load_run(import_reference(ckpt, tmp_path / "run"))
    assert cfg["model_options"]["dense_hz_x"] == [256, 128]
    assert model.arch["activation"] == "relu" and model.h_rnn.rnn.num_layers == 2
    assert isinstance(model.decoder[1], torch.nn.ReLU)


BAD = {
    "extra tensor": (dict(add={"mlp_extra.linear0.weight": torch.zeros(3, 3)}),
                     "'mlp_extra.linear0.weight' does not map"),
    "missing tensor": (dict(drop=("rnn_g.bias_hh_l0",)), "no tensor 'rnn_g.bias_hh_l0'"),
    "shape": (dict(reshape={"mlp_gz_z.linear0.weight": (64, 145)}),
              "'mlp_gz_z.linear0.weight' has shape (64, 145)"),
    "model name": (dict(network={"name": "DSAE"}), "unknown model name 'DSAE'"),
    "field": (dict(network={"dense_foo": "3"}), "field dense_foo = 3 cannot be expressed"),
    "value": (dict(network={"dense_hz_x": "256,x"}), "dense_hz_x"),
    "dropout": (dict(network={"dropout_p": "0.2"}), "dropout_p = 0.2"),
    "stft": (dict(stft={"wlen_sec": "64e-3"}), "wlen_sec = 64e-3"),
    "not a state dict": (dict(state=[1, 2]), "not a state dict"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_and_writes_nothing(tmp_path, case):
    kwargs, message = BAD[case]
    ckpt = synthetic(tmp_path, "SRNN", **kwargs)
    with pytest.raises(ReferenceError, match=message.replace("(", r"\(").replace(")", r"\)")) \
            as info:
        import_reference(ckpt, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SRNN"]  # no temporary left behind


def test_rvae_mixed_directions_cannot_be_expressed(tmp_path):
    ckpt = synthetic(tmp_path, "RVAE-Causal", network={"bidir_h": "True"})
    with pytest.raises(ReferenceError, match="bidir_g_x = False with bidir_h = True"):
        import_reference(ckpt, tmp_path / "run")


def test_output_directory_must_be_new_or_empty(tmp_path):
    ckpt = synthetic(tmp_path, "VAE")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(ReferenceError, match="not an empty directory"):
        import_reference(ckpt, tmp_path / "run")
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert (import_reference(ckpt, tmp_path / "empty") / "best.pt").is_file()


def test_cli_import_reference(tmp_path):
    ckpt = synthetic(tmp_path, "VRNN")
    runner = CliRunner()
    result = runner.invoke(cli, ["import-reference", str(ckpt), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "as vrnn with guide filtering" in result.output
    model, guide, cfg = load_run(tmp_path / "run")
    assert cfg["model_options"]["dense_hx_z"] == [64, 32]
    # --config elsewhere; a missing config and a bad checkpoint are one-line errors
    other = tmp_path / "elsewhere.ini"
    other.write_text((ckpt.parent / "config.ini").read_text())
    result = runner.invoke(cli, ["import-reference", str(ckpt), "--out", str(tmp_path / "r2"),
                                 "--config", str(other)])
    assert result.exit_code == 0, result.output
    for ckpt_arg, config_arg, needle in (
            (ckpt, tmp_path / "none.ini", "no such config.ini"),
            (tmp_path / "none.pt", other, "no such checkpoint"),
            (other, other, "not a readable torch checkpoint")):
        result = runner.invoke(cli, ["import-reference", str(ckpt_arg), "--config",
                                     str(config_arg), "--out", str(tmp_path / "r3")])
        lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
        assert result.exit_code == 1 and len(lines) == 1 and needle in lines[0], result.output
        assert "Traceback" not in result.output and not (tmp_path / "r3").exists()


def test_read_config_errors(tmp_path):
    (tmp_path / "a.ini").write_text("[User]\nx = 1\n")
    with pytest.raises(ReferenceError, match="no \\[Network\\] section"):
        read_config(tmp_path / "a.ini")
    (tmp_path / "b.ini").write_text("not an ini file")
    with pytest.raises(ReferenceError, match="not a readable config.ini"):
        read_config(tmp_path / "b.ini")


# ---- the real checkpoints against the reference outputs ----------------------------------------
REAL = {"vae": "VAE", "dkf": "DKF", "storn": "STORN", "vrnn": "VRNN", "srnn": "SRNN",
        "rvae-causal": "RVAE-Causal", "rvae-noncausal": "RVAE-NonCausal"}


def _real(name):
    if not CHECKPOINTS.is_dir() or not EXPECTED.is_dir():
        pytest.skip(f"the authors' checkpoints / expected outputs are not at {REFERENCE}")
    meta = json.loads((EXPECTED / "expected.json").read_text())
    entry = meta["models"][name]
    return CHECKPOINTS.parent / entry["checkpoint"], entry, meta["tolerances"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The seven real checkpoints imported once per module: name -> run directory."""
    cache = {}

    def get(name):
        if name not in cache:
            ckpt, _, _ = _real(name)
            cache[name] = import_reference(ckpt, tmp_path_factory.mktemp("ref") / name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(REAL))
def test_reference_outputs_reproduced(name, imported):
    """Model and guide with every z_t at its guide mean reproduce the reference's tensors."""
    _, entry, tol = _real(name)
    model, guide, cfg = load_run(imported(name))
    assert cfg["source"]["tag"] == REAL[name]
    ref = torch.load(EXPECTED / entry["file"], weights_only=True)
    x = ref["x"]
    B, T = x.shape[:2]
    out = outputs_at_means(model, guide, x)

    def close(actual, key, expected=None):
        torch.testing.assert_close(actual, ref[key] if expected is None else expected,
                                   rtol=tol[key]["rtol"], atol=tol[key]["atol"],
                                   msg=lambda m: f"{name} {key}: {m}")

    for key in ("enc_mean", "enc_logvar", "dec_logvar"):
        close(out[key], key)
    assert ("prior_mean" in out) == entry["has_learned_prior"] == ("prior_mean" in ref)
    if entry["has_learned_prior"]:
        close(out["prior_mean"], "prior_mean")
        close(out["prior_logvar"], "prior_logvar")
    # the loss terms, after the documented offsets
    half_z = model.z_dim / 2
    close(out["is_"], "is_per_frame")
    close(out["kl"], "kl_proper_per_frame")
    close(out["kl"] + half_z, "kl_per_frame")
    scalar = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
    is_, kl = out["is_"].double().mean(), out["kl"].double().mean()
    close(is_, "loss_is", scalar(entry["loss_is"]))
    close(kl + half_z, "loss_kl", scalar(entry["loss_kl"]))
    close(kl, "loss_kl_proper", scalar(entry["loss_kl_proper"]))
    close(is_ + kl + half_z, "loss_total", scalar(entry["loss_total"]))
    close(is_ + kl, "loss_total_proper", scalar(entry["loss_total_proper"]))
    # pyro-dvae's own training loss (TraceMeanField_ELBO: exponential NLL + analytic KL) at
    # z = guide mean is the reference's proper total + sum_f (log x + 1) per frame
    loss = TraceMeanField_ELBO().loss(model.model, use_mean(guide), x) / (B * T)
    want = entry["loss_total_proper"] + entry["nll_offset_per_frame"]
    tl = tol["loss_total_proper"]
    assert abs(loss - want) <= tl["atol"] + tl["rtol"] * abs(want), (name, loss, want)


def test_cli_imports_a_real_checkpoint(tmp_path):
    ckpt, _, _ = _real("srnn")
    result = CliRunner().invoke(cli, ["import-reference", str(ckpt), "--out",
                                      str(tmp_path / "srnn")])
    assert result.exit_code == 0, result.output
    assert "imported SRNN (32 tensors) as srnn with guide smoothing" in result.output


# ---- fit --init-from -----------------------------------------------------------------------------
TINY = ["fit", "--epochs", "1", "--seq-len", "20", "--batch-size", "64", "-q"]


def test_fit_init_from_an_imported_run(tmp_path):
    """A new run starts from the imported weights, with the imported architecture; at a learning
    rate too small to move float32 weights, its best.pt holds exactly the imported weights."""
    run = import_reference(synthetic(tmp_path, "VAE"), tmp_path / "imported")
    runner = CliRunner()
    out = tmp_path / "tuned"
    result = runner.invoke(cli, [*TINY, "--init-from", str(run), "--out", str(out),
                                 "--lr", "1e-30"])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"], cfg["guide"]) == ("vae", "frame")
    assert cfg["model_options"]["dense_x_z"] == [256, 128, 64, 32]
    assert cfg["architecture"]["dense_z_x"] == [32, 64, 128, 256]
    assert cfg["init_from"]["run"] == str(run.resolve())
    assert cfg["init_from"]["source"]["tag"] == "VAE"
    start, _, _ = load_run(run)
    tuned, _, _ = load_run(out)
    for (k, a), b in zip(start.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b), k
    # the same -o as the run's is accepted; conflicting settings are one-line errors
    ok = runner.invoke(cli, [*TINY, "--init-from", str(run), "--out", str(tmp_path / "b"),
                             "--model", "vae", "-o", "dense_x_z=256,128,64,32"])
    assert ok.exit_code == 0, ok.output
    for extra, needle in ((["--model", "srnn"], "--model srnn conflicts"),
                          (["-o", "dense_x_z=256,128"], "-o dense_x_z=(256, 128) conflicts"),
                          (["-o", "z_dim=8"], "-o z_dim=8 conflicts"),
                          (["--likelihood", "gaussian"], "--likelihood gaussian conflicts"),
                          (["--resume"], "--init-from starts a new run")):
        result = runner.invoke(cli, [*TINY, "--init-from", str(run), "--out",
                                     str(tmp_path / "c"), *extra])
        lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
        assert result.exit_code == 1 and len(lines) == 1 and needle in lines[0], result.output
        assert not (tmp_path / "c").exists()
    result = runner.invoke(cli, [*TINY, "--init-from", str(tmp_path / "nothing"), "--out",
                                 str(tmp_path / "c")])
    assert result.exit_code == 1 and "no such run directory" in result.output


def test_runs_from_before_the_conventions_change_warn(tmp_path):
    """A run whose config.json has no "architecture" was written before SRNN, STORN, VRNN and the
    RVAEs took the authors' conventions: it loads, with a warning that says so."""
    run = import_reference(synthetic(tmp_path, "SRNN"), tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    del cfg["architecture"]
    cfg["model_options"] = {}
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="before pyro-dvae's srnn took the authors' first-step"):
        load_run(run)
    vae = import_reference(synthetic(tmp_path, "VAE"), tmp_path / "vae")
    cfg = json.loads((vae / "config.json").read_text())
    del cfg["architecture"]
    (vae / "config.json").write_text(json.dumps(cfg))
    load_run(vae)  # the VAE did not change: no warning (warnings are errors in the tests)
