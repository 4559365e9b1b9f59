"""The pyro-dvae command line with tiny settings: every command and each bad-input case."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import pyro_dvae.train as train
from pyro_dvae.cli import cli
from pyro_dvae.registry import REGISTRY
from pyro_dvae.train import load_run

TINY = ["fit", "--model", "vae", "--epochs", "1", "--seq-len", "20", "--batch-size", "64", "-q"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *needles):
    """Non-zero exit, no traceback, one 'Error: ...' line containing every needle."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exception
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tone(seconds, freq=200.0, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    wave = sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, 6)) / 4
    return (wave * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.fixture
def audio_dir(tmp_path):
    """train/ and val/ with a few short tones (0.3 - 1 s), 16 kHz wav."""
    root = tmp_path / "audio"
    for split, n in (("train", 4), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            sf.write(root / split / f"{split}{i}.wav", tone(0.3 + 0.2 * i, 150 + 30 * i), 16000)
    return root


def test_models_lists_registry_with_default_guides():
    result = invoke("models")
    assert result.exit_code == 0, result.output
    for name, entry in REGISTRY.items():
        assert name in result.output
        assert f"{entry.default_guide}*" in result.output
        for g in entry.guides:
            assert g in result.output


def test_fit_builtin_corpus_writes_the_run(tmp_path):
    out = tmp_path / "run"
    result = invoke(*TINY, "--out", out, "-o", "z_dim=3", "-o", "dense_x_z=64,32", "--seed", "1")
    assert result.exit_code == 0, result.output
    for f in ("config.json", "history.json", "loss.png", "last.pt", "best.pt"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"], cfg["guide"], cfg["x_dim"], cfg["z_dim"]) == ("vae", "frame", 257, 3)
    assert cfg["model_options"] == {"z_dim": 3, "dense_x_z": [64, 32]} and cfg["data"] is None
    assert cfg["seq_len"] == 20 and cfg["likelihood"] == "is" and cfg["train"]["seed"] == 1
    hist = json.loads((out / "history.json").read_text())
    assert hist["epoch"] == [1] and hist["status"] == "finished"
    model, guide, _ = load_run(out)
    assert model.z_dim == 3
    assert model.arch["dense_x_z"] == (64, 32) and model.arch["dense_z_x"] == (32, 64)


def test_fit_default_out_dir_and_progress(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("fit", "--model", "vae", "--epochs", "1", "--seq-len", "20",
                    "--guide", "frame", "--elbo", "meanfield", "--likelihood", "gaussian")
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-vae")
    assert "epoch 1/1" in result.output and "train: " in result.output
    assert json.loads((runs[0] / "config.json").read_text())["likelihood"] == "gaussian"


def test_fit_audio_folder_short_and_corrupt_files(tmp_path, audio_dir):
    (audio_dir / "train" / "broken.wav").write_bytes(b"RIFF but not really audio")
    sf.write(audio_dir / "train" / "tiny.wav", tone(0.1), 16000)  # 7 frames: too short to use
    result = invoke("fit", "--model", "vae", "--epochs", "1", "--seq-len", "40", "--data",
                    audio_dir, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.output and "broken.wav" in result.output
    # files shorter than a sequence are padded and masked, and the summary says so; pieces
    # under 16 frames are left out and named
    summary = next(ln for ln in result.output.splitlines() if ln.startswith("train: "))
    assert "train: 5 sequences of 40 frames from 4 utterances" in summary
    assert " 0 frames of padding" not in summary and "zero-padded and masked" in summary
    assert "shorter than 16 frames: train/tiny.wav (8 frames)" in summary
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"] == str(audio_dir.resolve())


def test_fit_bad_inputs(tmp_path, audio_dir):
    one_line_error(invoke("fit", "--model", "nosuch", "--out", tmp_path / "a"), "nosuch", "srnn")
    one_line_error(invoke("fit", "--model", "srnn", "--guide", "nosuch"), "nosuch", "smoothing")
    one_line_error(invoke("fit", "--epochs", "1"), "--model")
    one_line_error(invoke(*TINY, "--data", tmp_path / "missing"), "does not exist")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    one_line_error(invoke(*TINY, "--data", empty), "no audio files")
    for f in (audio_dir / "train").iterdir():
        f.write_bytes(b"garbage")
    one_line_error(invoke(*TINY, "--data", audio_dir), "no usable audio")
    one_line_error(invoke(*TINY, "-o", "nosuch=1"), "nosuch")
    one_line_error(invoke(*TINY, "-o", "novalue"), "KEY=VALUE")
    one_line_error(invoke(*TINY, "-o", "x_dim=3"), "x_dim")
    one_line_error(invoke(*TINY, "-o", "z_dim='a'"), "z_dim must be an integer")
    one_line_error(invoke(*TINY, "-o", "dense_x_z=256,0"), "dense_x_z", ">= 1")
    one_line_error(invoke(*TINY, "-o", "activation=swish"), "activation", "tanh")
    one_line_error(invoke(*TINY, "-o", "dense_x_h=256"), "unknown model option 'dense_x_h'",
                   "dense_x_z")


def test_fit_option_values_are_checked_before_the_data_is_loaded(tmp_path):
    """-o z_dim=-3 / abc, --epochs 0 and --seq-len 1: one line each, before any data is read (the
    data folder does not exist, so a later check would report that instead)."""
    missing = ["--data", tmp_path / "missing", "--out", tmp_path / "run"]
    one_line_error(invoke(*TINY, *missing, "-o", "z_dim=-3"), "z_dim=-3", ">= 1")
    one_line_error(invoke(*TINY, *missing, "-o", "z_dim=abc"), "z_dim", "integer")
    one_line_error(invoke(*TINY, *missing, "--seq-len", "1"), "--seq-len 1", "2 or more")
    one_line_error(invoke("fit", "--model", "vae", "--epochs", "0", *missing), "--epochs", "0")
    assert not (tmp_path / "run").exists()


def test_resume_bad_inputs(tmp_path):
    one_line_error(invoke("fit", "--resume"), "--out")
    (tmp_path / "empty").mkdir()
    one_line_error(invoke("fit", "--resume", "--out", tmp_path / "empty"), "no last.pt")
    out = tmp_path / "run"
    assert invoke(*TINY, "--out", out).exit_code == 0
    one_line_error(invoke(*TINY, "--out", out), "already holds a run")
    one_line_error(invoke("fit", "--resume", "--out", out, "--model", "srnn"), "'vae'", "'srnn'")
    one_line_error(invoke("fit", "--resume", "--out", out, "--lr", "0.1"), "--lr", "differs")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["model_name"] = "dkf"
    torch.save(ckpt, out / "last.pt")
    one_line_error(invoke("fit", "--resume", "--out", out, "--epochs", "2", "-q"), "'dkf'")


class _Evil:
    pass


def test_resume_refuses_pickled_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert invoke(*TINY, "--out", out).exit_code == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["x"] = _Evil()
    torch.save(ckpt, out / "last.pt")
    one_line_error(invoke("fit", "--resume", "--out", out, "--epochs", "2"), "pickled")


@pytest.mark.parametrize("signum,code,said", [
    (signal.SIGINT, 130, "Interrupted in epoch 1 after 3 batches"),
    # SIGTERM (SLURM, Kubernetes, preemption) is Ctrl-C: save the position, exit 143, resume
    (signal.SIGTERM, 143, "Interrupted by SIGTERM in epoch 1 after 3 batches")])
def test_ctrl_c_or_sigterm_then_resume_matches_uninterrupted(tmp_path, monkeypatch, signum, code,
                                                            said):
    args = ["fit", "--model", "vae", "--epochs", "2", "--seq-len", "20", "--batch-size", "16", "-q",
            "-o", "z_dim=2", "--lr", "1e-3"]
    assert invoke(*args, "--out", tmp_path / "a").exit_code == 0

    real_fit = train.fit

    def interrupted_fit(model, guide, *a, **k):
        calls, orig = [0], guide.guide

        def guide_fn(*args, **kwargs):
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == 3:
                    os.kill(os.getpid(), signum)
            return orig(*args, **kwargs)

        guide.guide = guide_fn
        return real_fit(model, guide, *a, **k)

    monkeypatch.setattr(train, "fit", interrupted_fit)
    result = invoke(*args, "--out", tmp_path / "b")
    assert result.exit_code == code, result.output
    assert said in result.output
    assert "--resume" in result.output and "Traceback" not in result.output
    assert json.loads((tmp_path / "b" / "history.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(train, "fit", real_fit)
    result = invoke("fit", "--resume", "--out", tmp_path / "b", "-q")
    assert result.exit_code == 0, result.output
    a, _, _ = load_run(tmp_path / "a", "last")
    b, _, _ = load_run(tmp_path / "b", "last")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # a finished run can be extended
    result = invoke("fit", "--resume", "--out", tmp_path / "b", "--epochs", "3", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "history.json").read_text())["epoch"] == [1, 2, 3]


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_data_loads_stops_with_one_line(tmp_path, monkeypatch, signum, code):
    import pyro_dvae.data

    def interrupted_loading(*a, **k):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(pyro_dvae.data, "load_splits", interrupted_loading)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = invoke(*TINY, "--out", tmp_path / "run")
    assert result.exit_code == code, result.output
    assert "before training started; nothing was saved" in result.output
    assert ("by SIGTERM" in result.output) == (signum == signal.SIGTERM)
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_a_second_run_in_the_same_out_is_refused_in_one_line(tmp_path):
    from pyro_dvae.train.rundir import RunFolderLock

    out = tmp_path / "run"
    with RunFolderLock(out):  # a run that is still loading its data, or training
        one_line_error(invoke(*TINY, "--out", out), "in use by another run",
                       f"pid {os.getpid()}")
    assert invoke(*TINY, "--out", out).exit_code == 0
    result = invoke(*TINY, "--out", out)
    one_line_error(result, "already holds a run (finished)", "--resume")


def _cli(log, *args):
    """``pyro-dvae ARGS`` in a process of its own: stdout (the per-epoch lines) piped, stderr
    (progress bars and messages) to the file ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "pyro_dvae.cli", *map(str, args)],
                                env=env, stdout=subprocess.PIPE, stderr=err, text=True)


@pytest.mark.slow
def test_real_sigterm_as_timeout_sends_it_then_resume_is_exact(tmp_path):
    """``timeout -s TERM`` on a real ``pyro-dvae fit`` process: SIGTERM once the first epoch is
    done (when timeout would have fired), exit 143 with the resume hint, and --resume ends with
    exactly the weights of an uninterrupted run."""
    args = ["fit", "--model", "srnn", "--epochs", "4", "--seq-len", "50", "--batch-size", "16",
            "-o", "z_dim=2", "--lr", "1e-3", "--threads", "1", "--patience", "0"]
    ref = _cli(tmp_path / "a.log", *args, "-q", "--out", tmp_path / "a")
    proc = _cli(tmp_path / "b.log", *args, "--out", tmp_path / "b")
    for line in proc.stdout:
        if line.startswith("epoch 1/4  train"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 143, (tmp_path / "b.log").read_text()
    err = (tmp_path / "b.log").read_text()
    assert "Interrupted by SIGTERM in epoch 2 after" in err and "--resume --out" in err, err
    assert "Traceback" not in err
    ref.communicate(timeout=600)
    assert ref.returncode == 0, (tmp_path / "a.log").read_text()
    res = _cli(tmp_path / "c.log", "fit", "--resume", "--out", tmp_path / "b", "-q")
    res.communicate(timeout=600)
    assert res.returncode == 0, (tmp_path / "c.log").read_text()
    a, _, _ = load_run(tmp_path / "a", "last")
    b, _, _ = load_run(tmp_path / "b", "last")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert hb["status"] == "finished" and hb["val_loss"] == ha["val_loss"]


def test_python_dash_m_entry_point():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pyro_dvae.cli", "models"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "srnn" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pyro_dvae.cli", "fit", "--model", "nosuch"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("Error: unknown model")


def test_fit_reports_a_non_finite_loss_in_one_line(tmp_path, monkeypatch):
    """A numerical failure (NaN loss) stops training with one line naming it, no traceback."""
    from click.testing import CliRunner

    from pyro_dvae import cli
    from pyro_dvae.models.vae import VAE

    def broken_emission(self, z, ctx, x, u):
        return self.x_out(self.decoder(z)) * float("nan")

    monkeypatch.setattr(VAE, "emission", broken_emission)
    out = tmp_path / "run"
    res = CliRunner().invoke(cli.cli, ["fit", "--model", "vae", "--epochs", "1", "--out",
                                       str(out), "-q", "--threads", "1"])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "non-finite loss" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in res.output
