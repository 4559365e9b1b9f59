"""--threads, --device and --precision on the commands that run a model (issue 14 part 5)."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from pyro_dvae.cli import cli
from pyro_dvae.precision import DEVICES, PRECISIONS, resolve_device

TINY = ["fit", "--model", "vae", "--epochs", "1", "--seq-len", "20", "--batch-size", "64", "-q"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "vae"
    result = invoke(*TINY, "--out", out, "-o", "z_dim=3", "--precision", "bf16",
                    "--threads", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_fit_bf16_records_the_precision_and_resume_keeps_it(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["precision"] == "bf16"
    hist = json.loads((run_dir / "history.json").read_text())
    assert np.isfinite(hist["val_loss"][0])
    one_line_error(invoke("fit", "--resume", "--out", run_dir, "--precision", "fp32"),
                   "--precision", "differs")
    result = invoke("fit", "--resume", "--out", run_dir, "--epochs", "2", "-q")
    assert result.exit_code == 0, result.output
    assert len(json.loads((run_dir / "history.json").read_text())["epoch"]) == 2


def test_the_choices_are_the_library_s():
    options = {p.name: p for p in cli.commands["fit"].params}
    assert tuple(options["precision"].type.choices) == PRECISIONS
    assert tuple(options["device"].type.choices) == DEVICES


@pytest.mark.parametrize("command", ["fit", "evaluate", "resynth", "generate"])
def test_every_model_command_has_threads_and_device(command):
    names = {p.name for p in cli.commands[command].params}
    assert {"threads", "device"} <= names


@NO_CUDA
def test_an_unavailable_device_is_a_one_line_error(run_dir, tmp_path):
    one_line_error(invoke(*TINY, "--out", tmp_path / "r", "--device", "cuda"), "cuda")
    assert not (tmp_path / "r").exists()
    one_line_error(invoke("evaluate", "--checkpoint", run_dir, "--device", "cuda"), "cuda")
    one_line_error(invoke("generate", "--checkpoint", run_dir, "--seconds", "0.2", "--device",
                          "cuda", tmp_path / "g"), "cuda")
    src = tmp_path / "in.wav"
    sf.write(src, np.sin(np.arange(8000) / 5.0).astype(np.float32), 16000)
    one_line_error(invoke("resynth", "--checkpoint", run_dir, src, tmp_path / "o.wav",
                          "--device", "cuda"), "cuda")
    assert not (tmp_path / "o.wav").exists()
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_threads_and_auto_device_on_generate_resynth_evaluate(run_dir, tmp_path):
    try:
        result = invoke("generate", "--checkpoint", run_dir, "--seconds", "0.2",
                        "--griffin-lim-iters", "2", "--threads", "2", "--device", "auto",
                        tmp_path / "g")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2
        src = tmp_path / "in.wav"
        sf.write(src, (0.3 * np.sin(np.arange(8000) / 5.0)).astype(np.float32), 16000)
        result = invoke("resynth", "--checkpoint", run_dir, src, tmp_path / "o.wav",
                        "--threads", "1", "--device", "auto")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        result = invoke("evaluate", "--checkpoint", run_dir, "--no-progress", "--threads", "1",
                        "--device", "cpu", "--out", tmp_path / "e.json")
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "e.json").read_text())["n_files"] > 0
    finally:
        torch.set_num_threads(1)
