"""Analysis-resynthesis (13.2): resynthesis exactness, Griffin-Lim, evaluation, generation, CLI."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from pyro_dvae import metrics as M
from pyro_dvae import speech as S
from pyro_dvae.data.datasets import load_utterances
from pyro_dvae.data.stft import SAMPLE_RATE, stft


@pytest.fixture(scope="module")
def utterances():
    return load_utterances(None, "test")


def rms(a):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


# ---- resynthesis --------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.03, 7.0])
def test_identity_resynthesis_gives_the_input_back(utterances, scale):
    for utt in utterances:
        wave = utt.wave * np.float32(scale)
        out = S.resynthesize(S.identity_reconstructor, wave)
        assert out.wave.shape == wave.shape
        # RMSE as 13.2.3 (original normalised to [-1, 1]); float32 power and phase leave ~1e-8
        assert M.rmse(wave, out.wave) < 1e-4


@pytest.mark.parametrize("length", [1, 255, 257, 511, 1000, 16001])
def test_identity_resynthesis_at_any_length(length):
    rng = np.random.default_rng(length)
    wave = rng.standard_normal(length).astype(np.float32) * 0.1
    out = S.resynthesize(S.identity_reconstructor, wave)
    assert out.wave.shape == (length,)
    assert M.rmse(wave, out.wave) < 1e-4


@pytest.mark.parametrize("length", [255, 300, 512, 1000, 16001, 16384])
def test_reference_framing_drops_the_partial_last_frame(length):
    """Issue 10.5: the reference analyses L samples with 1 + floor(L / 256) frames, the same as our
    first frames (our extension and its centring reflect alike), and returns 256 floor(L / 256)
    samples."""
    rng = np.random.default_rng(length)
    wave = rng.standard_normal(length).astype(np.float32) * 0.1
    ours = S.resynthesize(S.identity_reconstructor, wave)
    ref = S.resynthesize(S.identity_reconstructor, wave, frames="reference")
    keep = 256 * (length // 256) or length  # a signal shorter than a hop stays whole
    assert ref.wave.shape == ref.original.shape == (keep,)
    np.testing.assert_array_equal(ref.original, wave[:keep])
    assert ref.power.shape[0] == (1 + length // 256 if length >= 256 else ours.power.shape[0])
    np.testing.assert_array_equal(ref.power, ours.power[:ref.power.shape[0]])
    assert M.rmse(ref.original, ref.wave) < 1e-4
    # the reference's frames from an independent STFT (numpy, float64) of the peak-normalised
    # signal: centred frames, the signal extended by numpy "reflect" by 256 at both ends, the
    # sine window
    if length >= 256:
        padded = np.pad(wave.astype(np.float64) / np.abs(wave).max(), 256, mode="reflect")
        window = np.sin(np.pi * (np.arange(512) + 0.5) / 512)
        frames = np.lib.stride_tricks.sliding_window_view(padded, 512)[::256] * window
        power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
        assert power.shape == ref.power.shape
        np.testing.assert_allclose(ref.power, np.maximum(power, 1e-10), rtol=1e-5,
                                   atol=1e-5 * power.max())
    with pytest.raises(ValueError, match="frames must be"):
        S.resynthesize(S.identity_reconstructor, wave, frames="last")


def test_resynthesis_uses_model_power_and_input_phase(utterances):
    wave = utterances[0].wave
    # halving the power everywhere must scale the waveform by 1/sqrt(2) (same phase, linear istft)
    out = S.resynthesize(lambda x: 0.5 * x, wave)
    assert M.rmse(wave / math.sqrt(2), out.wave) < 1e-4
    assert out.recon_power == pytest.approx(0.5 * out.power, rel=1e-6)


def test_resynthesis_rejects_bad_inputs_and_outputs():
    with pytest.raises(ValueError, match="not all zeros"):
        S.resynthesize(S.identity_reconstructor, np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        S.resynthesize(S.identity_reconstructor, np.zeros(0, np.float32))
    wave = np.random.default_rng(0).standard_normal(2000).astype(np.float32)
    with pytest.raises(ValueError, match="shape"):
        S.resynthesize(lambda x: x[:, :-1], wave)
    with pytest.raises(ValueError, match="NaN"):
        S.resynthesize(lambda x: x * float("nan"), wave)


def test_model_reconstruction_is_the_gamma_mean(utterances):
    from pyro_dvae import build

    model, guide = build("srnn", z_dim=4)
    model.eval()
    guide.eval()
    x = utterances[0].power[None]
    expected = model.reconstruct(guide, x)
    got = S.model_reconstructor(model, guide)(x)
    assert torch.equal(got, expected)
    # the Itakura-Saito decoder's Gamma(1, scale sigma^2) mean is sigma^2 > 0
    assert (got > 0).all()
    out = S.resynthesize(S.model_reconstructor(model, guide), utterances[0].wave)
    assert out.wave.shape == utterances[0].wave.shape and np.isfinite(out.wave).all()


# ---- Griffin-Lim ------------------------------------------------------------------------------
def spectral_convergence(wave, power):
    mag = np.sqrt(power)
    return np.linalg.norm(np.abs(stft(wave)) - mag) / np.linalg.norm(mag)


def test_griffin_lim_recovers_a_consistent_magnitude(utterances):
    wave = utterances[0].wave.astype(np.float64)
    power = np.abs(stft(wave)) ** 2
    out = S.griffin_lim(torch.from_numpy(power), wave.size, n_iter=100).numpy()
    assert out.shape == wave.shape
    random_phase = S.griffin_lim(torch.from_numpy(power), wave.size, n_iter=0).numpy()
    # a consistent magnitude (that of a real signal) is reached closely; random phase is far off
    assert spectral_convergence(out, power) < 0.05
    assert spectral_convergence(random_phase, power) > 0.3


def test_generate_waves_shapes_and_scale():
    from pyro_dvae import build

    model, _ = build("srnn", z_dim=4)
    model.eval()
    waves = S.generate_waves(model, seconds=0.5, n=2, n_iter=5, seed=1)
    assert len(waves) == 2
    for w in waves:
        assert w.shape == (8000,) and w.dtype == np.float32
        assert np.isfinite(w).all() and np.abs(w).max() <= 0.99 + 1e-6
    again = S.generate_waves(model, seconds=0.5, n=2, n_iter=5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(waves, again))
    with pytest.raises(ValueError, match="seconds"):
        S.generate_waves(model, seconds=0, n=1)


# ---- evaluation ---------------------------------------------------------------------------------
def test_evaluate_identity_gives_each_maximum_and_writes_json_csv(utterances, tmp_path):
    result = S.evaluate(S.identity_reconstructor, utterances, progress=False)
    rows = result["per_file"]
    assert [r["file"] for r in rows] == [u.name for u in utterances]
    assert result["framing"] == "reference"
    for r, u in zip(rows, utterances):
        # the reference's framing: the samples up to the last full hop, 1 + floor(L / 256) frames
        assert r["seconds"] == pytest.approx(256 * (u.wave.size // 256) / SAMPLE_RATE)
        assert r["frames"] == 1 + u.wave.size // 256
        assert r["rmse"] < 1e-4 and r["si_sdr"] > 60
        assert r["pesq_wb"] == pytest.approx(4.644, abs=2e-3)
        assert r["stoi"] == pytest.approx(1.0, abs=1e-6)
    summary = result["summary"]
    assert summary["pesq_nb"]["n"] == len(utterances) and summary["stoi"]["n_skipped"] == 0

    json_path, csv_path = S.write_results(result, tmp_path / "out" / "eval.json")
    assert csv_path == tmp_path / "out" / "eval.csv"
    loaded = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert loaded["summary"]["rmse"]["mean"] == pytest.approx(summary["rmse"]["mean"])
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["file"] for r in table] == [u.name for u in utterances]
    assert float(table[0]["pesq_wb"]) == pytest.approx(rows[0]["pesq_wb"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.csv", "eval.json"]

    text = S.format_table({"identity": summary})
    head, rule, line = text.splitlines()
    assert head == ("| model | RMSE | RMSE-paper | PESQ-WB | PESQ-NB | PESQ-paper | STOI | ESTOI "
                    "| SI-SDR (dB) |")
    # PESQ-paper is the raw P.862 score: 4.5 for a perfect copy
    assert line.startswith("| identity | 0.0000 | 0.0000 | 4.64 | 4.55 | 4.50 | 1.000 | 1.000 |")


def test_evaluate_flags_too_short_files_and_uses_workers(utterances):
    class Short:
        name = "short"
        wave = utterances[0].wave[:int(0.3 * SAMPLE_RATE)]

    items = [utterances[1], Short()]
    serial = S.evaluate(S.identity_reconstructor, items, progress=False)
    parallel = S.evaluate(S.identity_reconstructor, items, workers=2, progress=False)
    assert math.isnan(serial["per_file"][1]["stoi"])
    assert serial["summary"]["stoi"]["n"] == 1 and serial["summary"]["stoi"]["n_skipped"] == 1
    assert serial["per_file"][0]["notes"] == ""
    assert "stoi: fewer than 30 frames of speech" in serial["per_file"][1]["notes"]
    for a, b in zip(serial["per_file"], parallel["per_file"]):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]) or (math.isnan(a[k]) and math.isnan(b[k]))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_evaluate_survives_a_pesq_crash_on_a_long_file(utterances, workers, bursts):
    """Issue 12.1: a long file used to kill evaluate with SIGSEGV (or, with workers, break the
    process pool).  Now its PESQ is NaN with the reason, everything else is scored."""
    class Long:
        name = "long"
        wave = bursts(70.0).astype(np.float32)

    result = S.evaluate(S.identity_reconstructor, [Long(), utterances[0]], workers=workers,
                        progress=False)
    long, normal = result["per_file"]
    assert math.isnan(long["pesq_paper"]) and "pesq_paper: the pesq library crashed" in \
        long["notes"]
    assert long["rmse"] < 1e-4 and long["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert normal["pesq_paper"] == pytest.approx(4.5, abs=1e-5) and normal["notes"] == ""
    assert result["summary"]["pesq_paper"]["n_skipped"] == 1


def test_write_results_encodes_non_finite_values(tmp_path):
    result = {"per_file": [{"file": "a", "si_sdr": math.inf, "stoi": math.nan}],
              "summary": {}}
    json_path, _ = S.write_results(result, tmp_path / "r.json")
    loaded = json.loads(json_path.read_text())
    assert loaded["per_file"][0] == {"file": "a", "si_sdr": "inf", "stoi": None}


def test_atomic_files_leave_nothing_on_error(tmp_path):
    target = tmp_path / "new" / "deeper" / "x.wav"
    with pytest.raises(RuntimeError):
        with S.AtomicFiles() as files:
            files.temp(target).write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---- CLI: evaluate, resynth, generate on a tiny trained run -------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """SRNN (predictive) trained for one epoch on the built-in corpus, as `fit` writes it."""
    import pyro

    from pyro_dvae import build
    from pyro_dvae.data.datasets import load_splits
    from pyro_dvae.train import TrainConfig, fit

    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    splits = load_splits(None, 150, ("train", "val"))
    model, guide = build("srnn", z_dim=4)
    out = tmp_path_factory.mktemp("run")
    fit(model, guide, splits["train"], splits["val"], TrainConfig(epochs=1, lr=1e-3),
        out_dir=out, progress=False, meta={"data": None, "seq_len": 150})
    return out


def invoke(*args):
    from click.testing import CliRunner

    from pyro_dvae.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *words):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_evaluate_writes_results_and_prints_the_table(run_dir, tmp_path):
    out = tmp_path / "eval" / "srnn.json"
    result = invoke("evaluate", "--checkpoint", run_dir, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert ("| model | RMSE | RMSE-paper | PESQ-WB | PESQ-NB | PESQ-paper | STOI | ESTOI "
            "| SI-SDR (dB) |") in result.output
    assert "| srnn (smoothing) |" in result.output
    data = json.loads(out.read_text())
    names = [u.name for u in load_utterances(None, "test")]
    assert [r["file"] for r in data["per_file"]] == names  # the run's data: the built-in corpus
    assert data["model"] == "srnn" and data["split"] == "test" and data["data"] is None
    for r in data["per_file"]:
        assert 0 < r["rmse"] < 1 and -0.5 <= r["pesq_wb"] <= 4.65 and 0 <= r["stoi"] <= 1
    assert set(data["summary"]) == set(M.METRICS)
    assert out.with_suffix(".csv").is_file()


def test_cli_resynth_any_rate_and_channels(run_dir, utterances, tmp_path):
    wave = utterances[0].wave
    from pyro_dvae.data.audio import resample

    stereo = np.stack([resample(wave, 16000, 44100), 0.5 * resample(wave, 16000, 44100)], 1)
    src = tmp_path / "in.wav"
    sf.write(src, stereo, 44100, subtype="FLOAT")
    out, plot = tmp_path / "out" / "re.wav", tmp_path / "re.png"
    result = invoke("resynth", "--checkpoint", run_dir, src, out, "--plot", plot)
    assert result.exit_code == 0, result.output
    got, sr = sf.read(out)
    assert sr == SAMPLE_RATE and got.ndim == 1
    assert got.size == math.ceil(stereo.shape[0] * 16000 / 44100)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RMSE" in result.output


def test_cli_generate_writes_wavs(run_dir, tmp_path):
    out = tmp_path / "gen"
    result = invoke("generate", "--checkpoint", run_dir, "--seconds", 0.5, "--n", 2,
                    "--griffin-lim-iters", 5, out)
    assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert len(files) == 2
    for f in files:
        w, sr = sf.read(f)
        assert sr == SAMPLE_RATE and w.size == 8000 and np.abs(w).max() > 0


def _bad_audio(tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "no_samples":
        sf.write(path, np.zeros(0), SAMPLE_RATE)
    elif kind == "silence":
        sf.write(path, np.zeros(SAMPLE_RATE), SAMPLE_RATE)
    return path


@pytest.mark.parametrize("kind, words", [
    ("missing", ["no such audio file"]), ("corrupt", ["cannot read"]),
    ("zero_bytes", ["cannot read"]), ("no_samples", ["empty"]), ("silence", ["silence only"])])
def test_cli_resynth_bad_audio_one_line_error_no_output(run_dir, tmp_path, kind, words):
    src = _bad_audio(tmp_path, kind)
    out_dir = tmp_path / "out"
    result = invoke("resynth", "--checkpoint", run_dir, src, out_dir / "o.wav",
                    "--plot", out_dir / "o.png")
    assert_one_line_error(result, src.name, *words)
    assert not out_dir.exists()


def _bad_run(run_dir, tmp_path, kind):
    bad = tmp_path / kind
    bad.mkdir()
    config = json.loads((run_dir / "config.json").read_text())
    if kind == "unregistered":
        config["model"] = "not-a-model"
        (bad / "best.pt").write_bytes((run_dir / "best.pt").read_bytes())
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("kind, words", [("no_weights", ["best.pt"]),
                                         ("unregistered", ["not-a-model", "not registered"])])
def test_cli_bad_checkpoint_one_line_error_no_output(run_dir, tmp_path, kind, words, utterances):
    bad = _bad_run(run_dir, tmp_path, kind)
    src = tmp_path / "in.wav"
    sf.write(src, utterances[0].wave, SAMPLE_RATE)
    out = tmp_path / "out"
    for args in (["evaluate", "--checkpoint", bad, "--out", out / "e.json", "--no-progress"],
                 ["resynth", "--checkpoint", bad, src, out / "o.wav", "--plot", out / "p.png"],
                 ["generate", "--checkpoint", bad, "--seconds", 0.2, out]):
        assert_one_line_error(invoke(*args), *words)
        assert not out.exists()
    assert sorted(p.name for p in bad.iterdir()) == sorted(
        ["config.json"] + (["best.pt"] if kind == "unregistered" else []))


def test_cli_evaluate_bad_data_and_generate_bad_length(run_dir, tmp_path):
    empty = tmp_path / "data"
    (empty / "test").mkdir(parents=True)
    out = tmp_path / "e.json"
    assert_one_line_error(invoke("evaluate", "--checkpoint", run_dir, "--data", empty,
                                 "--out", out, "--no-progress"))
    assert not out.exists()
    result = invoke("generate", "--checkpoint", run_dir, "--seconds", 0, tmp_path / "g")
    assert result.exit_code != 0 and not (tmp_path / "g").exists()


def test_cli_error_exit_status_in_a_real_process(run_dir, tmp_path):
    # the console entry point itself: a one-line message on stderr, status 1, no traceback
    proc = subprocess.run([sys.executable, "-m", "pyro_dvae.cli", "resynth", "--checkpoint",
                           str(run_dir), str(tmp_path / "missing.wav"), str(tmp_path / "o.wav")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no such audio file" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.wav").exists()
