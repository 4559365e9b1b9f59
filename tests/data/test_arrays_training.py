"""Training on array files: pyro-dvae fit --data FILE.npz (x_dim from F, every likelihood, driven
inputs u), the data checks of pyro_dvae.train.fit, and the bad files as one-line CLI errors."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pyro_dvae
from pyro_dvae.cli import cli
from pyro_dvae.data import SequenceDataset, load_array_splits
from pyro_dvae.train import TrainConfig, fit, load_run

F = 6


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def piano_rolls(path, u_dim=0, seed=0):
    """A tiny binary data set of variable-length sequences (concatenated, with lengths)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, lengths in (("train", [9, 5, 12, 3]), ("val", [7, 4]), ("test", [6, 10, 2])):
        n = sum(lengths)
        arrays[split] = (rng.random((n, F)) < 0.3).astype(np.uint8)
        arrays[f"{split}_lengths"] = np.array(lengths)
        if u_dim:
            arrays[f"{split}_u"] = rng.standard_normal((n, u_dim)).astype(np.float32)
    np.savez(path, **arrays)
    return path


FIT = ["fit", "--epochs", "1", "--seq-len", "8", "--batch-size", "4", "-q", "-o", "z_dim=2"]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "is"])
def test_fit_on_an_array_file(tmp_path, likelihood):
    data = piano_rolls(tmp_path / "rolls.npz")
    out = tmp_path / "run"
    result = invoke(*FIT, "--model", "srnn", "--data", data, "--likelihood", likelihood,
                    "--out", out)
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["x_dim"] == F and cfg["u_dim"] == 0 and cfg["likelihood"] == likelihood
    assert cfg["data"] == str(data.resolve()) and cfg["seq_len"] == 8
    model, guide, _ = load_run(out)
    assert model.likelihood.name == likelihood and model.x_dim == F
    hist = json.loads((out / "history.json").read_text())
    assert np.isfinite(hist["val_loss"][0])


def test_fit_reports_the_array_data(tmp_path):
    data = piano_rolls(tmp_path / "rolls.npz")
    result = CliRunner().invoke(cli, [str(a) for a in (
        "fit", "--model", "vae", "--epochs", "1", "--seq-len", "8", "--data", data,
        "--likelihood", "bernoulli", "--out", tmp_path / "run")])
    assert result.exit_code == 0, result.output
    # train: 9 -> 8 + 1, 5, 12 -> 8 + 4, 3: six pieces from four sequences, all kept
    assert ("train: 6 sequences of 8 frames (6 features) from 4 sequences; 19 frames of padding"
            in result.output)
    # the speech commands refuse a run that was not trained on speech, in one line
    one_line_error(invoke("generate", "--checkpoint", tmp_path / "run", "--seconds", "1",
                          tmp_path / "gen"), "not on speech spectrograms", "generate writes audio")
    one_line_error(invoke("resynth", "--checkpoint", tmp_path / "run", tmp_path / "in.wav",
                          tmp_path / "out.wav"), "(6 features per frame)", "resynth")
    assert not (tmp_path / "gen").exists() and not (tmp_path / "out.wav").exists()


def test_fit_driven_data_sets_u_dim_and_trains_on_u(tmp_path):
    data = piano_rolls(tmp_path / "driven.npz", u_dim=3)
    out = tmp_path / "run"
    result = invoke(*FIT, "--model", "dkf", "--data", data, "--likelihood", "bernoulli",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["u_dim"] == 3
    model, _, _ = load_run(out)
    assert model.u_dim == 3
    one_line_error(invoke(*FIT, "--model", "dkf", "--data", data, "-o", "u_dim=2",
                          "--out", tmp_path / "r2"), "u_dim is set by the data")


def test_fit_refuses_data_outside_the_likelihood(tmp_path):
    path = tmp_path / "real.npz"
    rng = np.random.default_rng(0)
    np.savez(path, train=rng.standard_normal((3, 5, F)), val=rng.standard_normal((2, 5, F)))
    one_line_error(invoke(*FIT, "--model", "vae", "--data", path, "--likelihood", "bernoulli",
                          "--out", tmp_path / "a"), "train data is not binary", "Bernoulli")
    one_line_error(invoke(*FIT, "--model", "vae", "--data", path, "--out", tmp_path / "b"),
                   "train data holds negative values", "Itakura-Saito", "'gaussian'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    result = invoke(*FIT, "--model", "vae", "--data", path, "--likelihood", "gaussian",
                    "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output


def test_fit_bad_array_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train=np.zeros((2, 3, F)), val=np.zeros((2, 3, F + 1)))
    one_line_error(invoke(*FIT, "--model", "vae", "--data", bad), "array 'val' has 7 features")
    np.savez(bad, train=np.zeros((2, 3, F)))
    one_line_error(invoke(*FIT, "--model", "vae", "--data", bad), "has no array 'val'")
    one_line_error(invoke(*FIT, "--model", "vae", "--data", tmp_path / "none.npz"),
                   "does not exist")


def _driven_set(u, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(6, 5, F, generator=g) < 0.4).float()
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return SequenceDataset(x, mask, [f"s{i}" for i in range(6)], u=u)


def test_python_fit_passes_u_to_model_and_guide(tmp_path):
    """fit() trains a driven model on the dataset's u: another u gives other weights."""
    g = torch.Generator().manual_seed(1)
    u1 = torch.randn(6, 5, 2, generator=g)
    weights = []
    for i, u in enumerate((u1, 2 * u1 + 1)):
        torch.manual_seed(0)  # the same initial weights
        model, guide = pyro_dvae.build("dkf", x_dim=F, z_dim=2, u_dim=2, likelihood="bernoulli")
        config = TrainConfig(epochs=1, batch_size=3, lr=1e-2, seed=0)
        fit(model, guide, _driven_set(u), _driven_set(u), config, tmp_path / f"r{i}",
            progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.transition.parameters()]))
    assert not torch.allclose(weights[0], weights[1])


def test_python_fit_checks_the_data(tmp_path):
    config = TrainConfig(epochs=1, batch_size=3)
    driven = _driven_set(torch.zeros(6, 5, 2))
    model, guide = pyro_dvae.build("dkf", x_dim=F, z_dim=2, likelihood="bernoulli")
    with pytest.raises(ValueError, match=r"training set has 2 input features u, the model was "
                                         r"built for u_dim=0"):
        fit(model, guide, driven, driven, config, tmp_path / "a", progress=False)
    model, guide = pyro_dvae.build("dkf", x_dim=F, z_dim=2, u_dim=2)
    plain = _driven_set(None)
    with pytest.raises(ValueError, match=r"training set has no input features u"):
        fit(model, guide, plain, plain, config, tmp_path / "b", progress=False)
    model, guide = pyro_dvae.build("vae", x_dim=F, z_dim=2, likelihood="bernoulli")
    real = SequenceDataset(torch.randn(4, 5, F), torch.ones(4, 5, dtype=torch.bool), list("abcd"))
    with pytest.raises(ValueError, match=r"training set is not binary"):
        fit(model, guide, real, real, config, tmp_path / "c", progress=False)
    model, guide = pyro_dvae.build("vae", x_dim=F + 1, z_dim=2)
    with pytest.raises(ValueError, match=r"training set has 6 features per frame, the model was "
                                         r"built for 7"):
        fit(model, guide, plain, plain, config, tmp_path / "d", progress=False)
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_load_array_splits_feeds_fit(tmp_path):
    """The Python API: an array file -> load_array_splits -> fit, as the README shows."""
    splits = load_array_splits(piano_rolls(tmp_path / "r.npz"), seq_len=8)
    model, guide = pyro_dvae.build("vae", x_dim=splits["train"].x_dim, z_dim=2,
                                   likelihood="bernoulli")
    hist = fit(model, guide, splits["train"], splits["val"], TrainConfig(epochs=1),
               tmp_path / "run", progress=False)
    assert hist["status"] == "finished" and len(hist["epoch"]) == 1


def test_evaluate_reports_the_vlb_for_array_data(tmp_path):
    """evaluate of a run trained on an array file: the VLB of the whole test sequences (no speech
    metrics), the K = 1 bound of evaluate_nll with the same seed."""
    from pyro_dvae import evaluate_nll
    from pyro_dvae.data import load_array_sequences

    data = piano_rolls(tmp_path / "rolls.npz")
    run = tmp_path / "run"
    assert invoke(*FIT, "--model", "vrnn", "--data", data, "--likelihood", "bernoulli",
                  "--out", run).exit_code == 0
    result = invoke("evaluate", "--checkpoint", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "3 sequences (18 steps) of test in" in result.output
    assert "VLB per time step:" in result.output and "PESQ" not in result.output
    record = json.loads((run / "eval_test.json").read_text())
    assert record["K"] == 1 and record["num_frames"] == 18 and record["split"] == "test"
    model, guide, _ = load_run(run)
    ref = evaluate_nll(model, guide, load_array_sequences(data, "test"), K=1, seed=0)
    assert record["log_px_per_step"] == pytest.approx(ref.per_step, rel=1e-6)
    assert f"{ref.per_step:.4f} nats" in result.output
    # another split, and the flags that belong to speech or --nll
    assert invoke("evaluate", "--checkpoint", run, "--split", "val",
                  "--no-progress").exit_code == 0
    assert json.loads((run / "eval_val.json").read_text())["num_sequences"] == 2
    one_line_error(invoke("evaluate", "--checkpoint", run, "--workers", "2"), "--workers")
    bad = tmp_path / "other.npz"
    np.savez(bad, test=np.zeros((2, 4, F + 1)))
    one_line_error(invoke("evaluate", "--checkpoint", run, "--data", bad), "7 features")
