"""Metrics of 13.2.3: hand-computed values, maxima on identical signals, ranges at 10 dB SNR."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from pyro_dvae import metrics as M

# a real recording (corpus README: PESQ-WB 1.80 / STOI 0.998 at 30 dB SNR); skipped without it
REAL_FILE = Path("/work/shared/data/speech16k/test/en_US_f_Allison__at-tone-time-exactly.flac")


@pytest.fixture(scope="module", params=["builtin", "recorded"])
def speech_wave(request):
    """3.4 s of the built-in (synthetic) corpus, and 3.5 s of recorded speech when available."""
    if request.param == "builtin":
        from pyro_dvae.data.datasets import load_utterances

        utterances = load_utterances(None, "test")
        return max((u.wave for u in utterances), key=len).astype(np.float64)
    if not REAL_FILE.is_file():
        pytest.skip(f"{REAL_FILE} not available")
    from pyro_dvae.data.audio import load_audio

    return load_audio(REAL_FILE).astype(np.float64)


def test_rmse_hand_computed_and_peak_normalised():
    ref = np.array([0.5, -1.0, 0.25])
    est = np.array([0.5, -1.0, 0.75])
    assert M.rmse(ref, est) == pytest.approx(math.sqrt(0.25 / 3), rel=1e-12)
    # the original is normalised to [-1, 1] and the estimate takes the same factor
    assert M.rmse(2 * ref, 2 * est) == pytest.approx(math.sqrt(0.25 / 3), rel=1e-12)


def test_si_sdr_hand_computed_and_scale_invariant():
    ref = np.array([1.0, -1.0, 1.0, -1.0])
    noise = np.array([1.0, 1.0, -1.0, -1.0])  # zero mean, orthogonal to ref
    assert M.si_sdr(ref, ref + noise) == pytest.approx(0.0, abs=1e-12)
    assert M.si_sdr(ref, 2 * ref + 0.5 * noise) == pytest.approx(10 * math.log10(16.0), abs=1e-12)
    assert M.si_sdr(ref, 3 * (2 * ref + 0.5 * noise)) == pytest.approx(
        10 * math.log10(16.0), abs=1e-12)
    # a DC offset is removed before the projection
    assert M.si_sdr(ref, ref + noise + 5.0) == pytest.approx(0.0, abs=1e-12)


def test_identical_signals_give_each_maximum(speech_wave):
    x = speech_wave
    values = M.compute_metrics(x, x.copy())
    assert values["rmse"] == 0.0
    assert values["si_sdr"] == math.inf
    # the pesq package's ceilings (P.862.2 and P.862.1 mappings of a perfect score); the corpus
    # README measured 4.644 for PESQ-WB of every test file against itself
    assert values["pesq_wb"] == pytest.approx(4.644, abs=1e-3)
    assert values["pesq_nb"] == pytest.approx(4.549, abs=1e-3)
    assert values["stoi"] == pytest.approx(1.0, abs=1e-9)
    assert values["estoi"] == pytest.approx(1.0, abs=1e-9)


def test_white_noise_at_10db_snr_gives_known_ranges(speech_wave):
    x = speech_wave.astype(np.float64)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(x.size)
    noise *= math.sqrt(np.mean(x ** 2) / np.mean(noise ** 2) / 10.0)  # exactly 10 dB SNR
    y = x + noise
    values = M.compute_metrics(x, y)
    # RMSE is the noise RMS over the original's peak
    assert values["rmse"] == pytest.approx(np.sqrt(np.mean(noise ** 2)) / np.abs(x).max(),
                                           rel=1e-12)
    # SI-SDR equals the SNR up to the chance correlation of noise and speech, whose relative size
    # is about 1/sqrt(L) (~0.005 here): a few hundredths of a dB
    assert values["si_sdr"] == pytest.approx(10.0, abs=0.1)
    # known behaviour of white noise at 10 dB SNR: PESQ is near its floor of about 1 (wideband
    # ~1.0-1.1, narrowband ~1.2-1.6), intelligibility stays fairly high (STOI ~0.8-0.95, ESTOI
    # ~0.65-0.88); the bounds leave room around what 7 utterances x 3 noise seeds gave
    assert 1.0 <= values["pesq_wb"] <= 1.3
    assert 1.1 <= values["pesq_nb"] <= 1.9
    assert values["pesq_nb"] > values["pesq_wb"]
    assert 0.75 <= values["stoi"] <= 0.96
    assert 0.6 <= values["estoi"] <= 0.9
    assert values["estoi"] < values["stoi"]
    # and every metric is worse than on the clean signal
    clean = M.compute_metrics(x, x)
    for name, (_, higher_better) in M.METRICS.items():
        assert (values[name] < clean[name]) if higher_better else (values[name] > clean[name])


def test_stoi_on_too_short_speech_is_nan_without_warning():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(int(0.4 * M.SAMPLE_RATE))  # < 30 frames of 256 at 10 kHz
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(M.stoi(x, x))
        assert math.isnan(M.estoi(x, x))


def test_pesq_on_too_short_signals_is_nan():
    x = np.random.default_rng(2).standard_normal(int(0.2 * M.SAMPLE_RATE))  # PESQ needs 0.25 s
    assert math.isnan(M.pesq_wb(x, x)) and math.isnan(M.pesq_nb(x, x))


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="differ in length"):
        M.rmse(np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="all zeros"):
        M.rmse(np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        M.si_sdr(np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute_metrics(np.ones(4), np.ones(4), metrics=["pesq"])


@pytest.mark.parametrize("n, ranks", [(5, (1, 5)), (10, (2, 9)), (20, (6, 15)), (100, (40, 61))])
def test_median_ci_matches_order_statistic_tables(n, ranks):
    # 95 % distribution-free intervals for the median (e.g. Conover, Practical Nonparametric
    # Statistics, table A3; n < 6 has none, so the whole range)
    values = np.arange(1, n + 1, dtype=float)[::-1]  # unsorted input
    assert M.median_ci(values) == ranks


def test_summarize_skips_nan_and_counts_it():
    s = M.summarize([1.0, 2.0, math.nan, 3.0])
    assert s["n"] == 3 and s["n_skipped"] == 1
    assert s["mean"] == pytest.approx(2.0) and s["median"] == 2.0
    assert s["std"] == pytest.approx(1.0)
    empty = M.summarize([math.nan])
    assert empty["n"] == 0 and math.isnan(empty["mean"])
