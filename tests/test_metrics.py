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
    assert values["rmse"] == 0.0 and values["rmse_paper"] == 0.0
    assert values["si_sdr"] == math.inf
    # the raw P.862 score of a perfect copy is its maximum, 4.5 (the library's float32 mapping
    # leaves about 1e-6)
    assert values["pesq_paper"] == pytest.approx(4.5, abs=1e-5)
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


def test_pesq_on_too_short_signals_is_nan_with_the_reason():
    x = np.random.default_rng(2).standard_normal(int(0.2 * M.SAMPLE_RATE))  # PESQ needs 0.25 s
    assert math.isnan(M.pesq_wb(x, x)) and math.isnan(M.pesq_nb(x, x))
    assert math.isnan(M.pesq_paper(x, x))
    reasons = {}
    values = M.compute_metrics(x, x, metrics=["pesq_paper", "rmse"], reasons=reasons)
    assert math.isnan(values["pesq_paper"]) and values["rmse"] == 0.0
    assert reasons == {"pesq_paper": "PESQ needs at least 0.25 s"}


def test_rmse_paper_hand_computed():
    # s = [1, 0], s_hat = [1, 1]: gain 1/2, error [-1/2, 1/2], file scale 0.9 / max(1, 1)
    assert M.rmse_paper([1.0, 0.0], [1.0, 1.0]) == pytest.approx(0.45, rel=1e-12)
    # an estimate with peak 2: gain 1/4, the same error, file scale 0.9 / 2
    assert M.rmse_paper([1.0, 0.0], [2.0, 2.0]) == pytest.approx(0.225, rel=1e-12)
    # invariant to the reference's scale, and a scaled copy is exact (the gain undoes it)
    assert M.rmse_paper([3.0, 0.0], [3.0, 3.0]) == pytest.approx(0.45, rel=1e-12)
    assert M.rmse_paper([0.5, -1.0, 0.25], [0.25, -0.5, 0.125]) == 0.0
    # an all-zero estimate: every gain gives the same error, 0.9 rms(s)
    assert M.rmse_paper([1.0, 0.0], [0.0, 0.0]) == pytest.approx(0.9 * math.sqrt(0.5))


def test_si_sdr_of_a_constant_estimate_is_nan_not_inf():
    ref = np.array([1.0, -1.0, 0.5, -0.5])
    reasons = {}
    for est in (np.zeros(4), np.full(4, 0.3)):
        assert math.isnan(M.si_sdr(ref, est))
        assert math.isnan(M.compute_metrics(ref, est, metrics=["si_sdr"], reasons=reasons)
                          ["si_sdr"])
        assert "constant" in reasons["si_sdr"]
    # so a summary over files stays finite, the file counted as skipped
    s = M.summarize([M.si_sdr(ref, np.zeros(4)), 3.0, 5.0])
    assert s["mean"] == 4.0 and s["n_skipped"] == 1
    # a non-constant estimate orthogonal to the reference is a genuine -inf
    assert M.si_sdr(ref, np.array([1.0, 1.0, -1.0, -1.0])) == -math.inf


# ---- the raw P.862 score (pesq_paper) ------------------------------------------------------------
def test_p862_inverse_undoes_the_mapping():
    raw = np.linspace(-1.5, 4.5, 6001)
    # in float64 the inverse is exact up to rounding
    back = np.array([M.p862_raw_from_mos_lqo(M.p862_mos_lqo(r)) for r in raw])
    assert np.abs(back - raw).max() < 1e-12
    # the mapping as the pesq library's C code computes it, in float32
    f = np.float32
    r32 = raw.astype(f)
    arg = (f(-1.4945) * r32 + f(4.6607)).astype(f)
    mos = (f(0.999) + f(4.0) / (f(1.0) + np.exp(arg.astype(np.float64)).astype(f))).astype(f)
    back = np.array([M.p862_raw_from_mos_lqo(float(m)) for m in mos])
    err = np.abs(back - r32)
    assert err.max() < 1.2e-5  # near the floor, where the mapping is flattest
    assert err[r32 >= 0.5].max() < 1.2e-6
    # the known anchors: raw 4.5 maps to the package's ceiling 4.5486, raw 1 to about 1.10
    assert M.p862_mos_lqo(4.5) == pytest.approx(4.548638, abs=1e-6)
    assert M.p862_raw_from_mos_lqo(4.548638343811035) == pytest.approx(4.5, abs=1e-6)
    # the mapping is increasing, so is its inverse
    assert np.all(np.diff(back) >= -2.5e-5)


@pytest.mark.parametrize("value", [0.999, 0.5, 4.9990001, 5.0, math.nan, math.inf])
def test_p862_inverse_refuses_values_outside_the_mapping(value):
    with pytest.raises(ValueError, match="outside the range"):
        M.p862_raw_from_mos_lqo(value)


@pytest.fixture(scope="module")
def raw_p862(tmp_path_factory):
    """The pesq package's own C sources compiled with a 10-line wrapper that returns the raw P.862
    score next to the mapped one: an independent reading of what ``pesq_paper`` inverts."""
    import ctypes
    import shutil
    import subprocess

    import pesq

    src = Path(pesq.__file__).parent
    sources = [src / n for n in ("pesqmod.c", "pesqdsp.c", "dsp.c")]
    if not all(p.is_file() for p in sources + [src / "pesqmain.h"]):
        pytest.skip(f"the pesq package at {src} ships no C sources")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the raw-score reference")
    out = tmp_path_factory.mktemp("rawpesq")
    (out / "wrap.c").write_text(RAW_PESQ_WRAPPER)
    subprocess.run([cc, "-O1", "-shared", "-fPIC", f"-I{src}", str(out / "wrap.c"),
                    *map(str, sources), "-o", str(out / "raw.so"), "-lm"], check=True,
                   capture_output=True)
    lib = ctypes.CDLL(str(out / "raw.so"))
    fp = ctypes.POINTER(ctypes.c_float)

    def run(ref, deg):
        peak = max(np.abs(ref).max(), np.abs(deg).max())  # as the package scales them
        r = np.ascontiguousarray(ref / peak, dtype=np.float32)
        d = np.ascontiguousarray(deg / peak, dtype=np.float32)
        raw, mapped = ctypes.c_float(), ctypes.c_float()
        rc = lib.raw_pesq(ctypes.c_long(16000), r.ctypes.data_as(fp), ctypes.c_long(r.size),
                          d.ctypes.data_as(fp), ctypes.c_long(d.size), ctypes.byref(raw),
                          ctypes.byref(mapped))
        assert rc == 0
        return raw.value, mapped.value

    return run


RAW_PESQ_WRAPPER = r"""
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "pesqio.h"
#include "pesqmain.h"
int raw_pesq(long fs, float *ref, long nref, float *deg, long ndeg, float *raw, float *mapped) {
    long err = 0; char *what = "unknown"; SIGNAL_INFO r, d; ERROR_INFO e;
    select_rate(fs, &err, &what); if (err) return -2;
    strcpy(r.path_name, "ref"); strcpy(r.file_name, "ref");
    strcpy(d.path_name, "deg"); strcpy(d.file_name, "deg");
    r.Nsamples = nref; d.Nsamples = ndeg; r.apply_swap = d.apply_swap = 0;
    r.input_filter = d.input_filter = 1; e.mode = NB_MODE; r.data = ref; d.data = deg;
    pesq_measure(&r, &d, &e, &err, &what); if (err) return (int)err;
    *raw = e.pesq_mos; *mapped = e.mapped_mos; return 0;
}
"""


def test_pesq_paper_is_the_raw_p862_score_on_real_files(raw_p862):
    """On recorded speech at six noise levels (raw scores from about 0.5 to 4.5), pesq_paper agrees
    with the raw P.862 score the library computes internally."""
    files = sorted(REAL_FILE.parent.glob("*.flac"))[:40:8]
    if not files:
        pytest.skip(f"{REAL_FILE.parent} not available")
    from pyro_dvae.data.audio import load_audio

    rng = np.random.default_rng(3)
    raws = []
    for f in files:
        x = load_audio(f).astype(np.float64)
        for sigma in (0.0, 0.003, 0.01, 0.03, 0.1, 0.5):
            y = x + sigma * np.abs(x).max() * rng.standard_normal(x.size)
            raw, mapped = raw_p862(x, y)
            assert M.pesq_paper(x, y) == pytest.approx(raw, abs=1e-5)
            assert M.p862_mos_lqo(raw) == pytest.approx(mapped, abs=1e-6)
            raws.append(raw)
    assert min(raws) < 1.0 and max(raws) == pytest.approx(4.5)


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


# ---- PESQ in a guarded child process (the library crashes on long signals) -----------------------
class CrashingPesq(M.PesqProcess):
    """The real child, made to die with SIGSEGV on signals longer than 2 s, as the pesq library
    does on long ones."""

    child_code = M.PesqProcess.child_code.replace(
        '    n = job["n"]\n',
        '    n = job["n"]\n    if n > 2 * job["fs"]:\n        os.kill(os.getpid(), 11)\n')


def test_a_crash_of_the_pesq_library_is_nan_with_the_reason_and_the_next_call_works(monkeypatch):
    assert CrashingPesq.child_code != M.PesqProcess.child_code
    rng = np.random.default_rng(4)
    short, long = rng.standard_normal(SR), rng.standard_normal(3 * SR)
    guard = CrashingPesq()
    try:
        first = guard.score(SR, short, short + 0.1 * rng.standard_normal(SR), "wb")
        assert 1.0 < first < 4.7
        with pytest.raises(M.Undefined, match=r"crashed \(SIGSEGV\) on this 3\.0 s signal"):
            guard.score(SR, long, long, "wb")
        # a new child answers the next call
        assert guard.score(SR, short, short, "nb") == pytest.approx(4.549, abs=1e-3)
        # through compute_metrics: NaN with the reason, the other metrics unaffected
        monkeypatch.setattr(M, "_PESQ", guard)
        reasons = {}
        values = M.compute_metrics(long, long, reasons=reasons)
        assert {k for k, v in values.items() if math.isnan(v)} == {"pesq_wb", "pesq_nb",
                                                                    "pesq_paper"}
        assert set(reasons) == {"pesq_wb", "pesq_nb", "pesq_paper"}
        assert all("crashed (SIGSEGV)" in why for why in reasons.values())
        assert values["rmse"] == 0.0 and values["stoi"] == pytest.approx(1.0)
    finally:
        guard.close()


SR = M.SAMPLE_RATE


@pytest.mark.slow
def test_pesq_on_a_long_signal_never_crashes_the_caller(bursts):
    """The real library: 40 one-second bursts score; 70 (more utterances than its fixed-size
    tables hold) crashed it with SIGSEGV, which now costs only the child."""
    rng = np.random.default_rng(5)
    x = bursts(40.0)
    assert 1.0 < M.pesq_paper(x, x + 0.01 * rng.standard_normal(x.size)) <= 4.5
    x = bursts(70.0)
    y = x + 0.01 * rng.standard_normal(x.size)
    reasons = {}
    values = M.compute_metrics(x, y, metrics=["pesq_nb", "pesq_paper", "si_sdr"],
                               reasons=reasons)
    assert math.isnan(values["pesq_paper"]) and math.isnan(values["pesq_nb"])
    assert "pesq library crashed" in reasons["pesq_paper"]
    assert "70.0 s signal" in reasons["pesq_paper"]
    assert math.isfinite(values["si_sdr"])
