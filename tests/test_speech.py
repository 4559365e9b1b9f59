"""Analysis-resynthesis (13.2): resynthesis exactness, Griffin-Lim, evaluation, generation, CLI."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pyro_dvae import metrics as M
from pyro_dvae import speech as S
from pyro_dvae.data.datasets import load_utterances
from pyro_dvae.data.stft import HOP, SAMPLE_RATE, stft


@pytest.fixture(scope="module")
def utterances():
    return load_utterances(None, "test")


def rms(a):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


# ---- resynthesis ---------------------------------------------------------------------------------
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


# ---- Griffin-Lim -----------------------------------------------------------------------------------
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
    T = 1 + 8000 // HOP
    for w in waves:
        assert w.shape == ((T - 1) * HOP,) and w.dtype == np.float32
        assert np.isfinite(w).all() and np.abs(w).max() <= 0.99 + 1e-6
    again = S.generate_waves(model, seconds=0.5, n=2, n_iter=5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(waves, again))
    with pytest.raises(ValueError, match="seconds"):
        S.generate_waves(model, seconds=0, n=1)


# ---- evaluation ------------------------------------------------------------------------------------
def test_evaluate_identity_gives_each_maximum_and_writes_json_csv(utterances, tmp_path):
    result = S.evaluate(S.identity_reconstructor, utterances, progress=False)
    rows = result["per_file"]
    assert [r["file"] for r in rows] == [u.name for u in utterances]
    for r, u in zip(rows, utterances):
        assert r["seconds"] == pytest.approx(u.wave.size / SAMPLE_RATE)
        assert r["frames"] == u.num_frames
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
    assert head == "| model | RMSE | PESQ-WB | PESQ-NB | STOI | ESTOI | SI-SDR (dB) |"
    assert line.startswith("| identity | 0.0000 | 4.64 | 4.55 | 1.000 | 1.000 |")


def test_evaluate_flags_too_short_files_and_uses_workers(utterances):
    class Short:
        name = "short"
        wave = utterances[0].wave[:int(0.3 * SAMPLE_RATE)]

    items = [utterances[1], Short()]
    serial = S.evaluate(S.identity_reconstructor, items, progress=False)
    parallel = S.evaluate(S.identity_reconstructor, items, workers=2, progress=False)
    assert math.isnan(serial["per_file"][1]["stoi"])
    assert serial["summary"]["stoi"]["n"] == 1 and serial["summary"]["stoi"]["n_skipped"] == 1
    for a, b in zip(serial["per_file"], parallel["per_file"]):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]) or (math.isnan(a[k]) and math.isnan(b[k]))


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
