"""Speech quality metrics of the analysis-resynthesis experiment (13.2.3) and their summaries.

All functions take the original (reference) and the resynthesised (estimate) waveform as 1-D arrays
of the same length at 16 kHz and return a float; higher is better except for RMSE.

- :func:`rmse`: root mean squared error between the waveforms, with the original normalised to
  [-1, 1] (13.2.3) and the estimate scaled by the same factor, so it reads as a fraction of the
  original's peak amplitude.  Minimum 0.
- :func:`si_sdr`: scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019).
  Unbounded above: an exact copy (up to a positive gain) gives ``inf``.
- :func:`pesq_wb`: PESQ wideband, ITU-T P.862.2 at 16 kHz (MOS-LQO, at most about 4.64).
- :func:`pesq_nb`: PESQ narrowband, P.862 + P.862.1 mapping, on both signals resampled to 8 kHz
  (at most about 4.55).  The paper's text does not say which PESQ its Table 13.1 used; the authors'
  later tables used narrowband.  We report both, labelled.
- :func:`stoi` and :func:`estoi`: short-time objective intelligibility (Taal et al., 2011) and its
  extended version (Jensen and Taal, 2016), from ``pystoi``; at most 1.

Undefined values are NaN, never a made-up number: pystoi returns 1e-5 (with a warning) when fewer
than 30 frames of speech are left after its silence removal, and PESQ raises when it finds no
utterance or the signal is shorter than 0.25 s; these give NaN here and :func:`summarize` counts
them as skipped.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Mapping, Sequence

import numpy as np

SAMPLE_RATE = 16000

#: metric name -> (label in tables, higher is better)
METRICS: Dict[str, tuple] = {
    "rmse": ("RMSE", False),
    "pesq_wb": ("PESQ-WB", True),
    "pesq_nb": ("PESQ-NB", True),
    "stoi": ("STOI", True),
    "estoi": ("ESTOI", True),
    "si_sdr": ("SI-SDR (dB)", True),
}

#: pystoi's intermediate intelligibility needs this many 256-sample frames at 10 kHz
_STOI_MIN_FRAMES = 30


def _pair(reference, estimate) -> tuple:
    ref = np.asarray(reference, dtype=np.float64)
    est = np.asarray(estimate, dtype=np.float64)
    if ref.ndim != 1 or est.ndim != 1:
        raise ValueError(f"metrics take 1-D waveforms, got shapes {ref.shape} and {est.shape}")
    if ref.shape != est.shape:
        raise ValueError(f"reference and estimate differ in length: {ref.size} vs {est.size}")
    if ref.size == 0:
        raise ValueError("empty waveform")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(est))):
        raise ValueError("waveform holds NaN or infinite samples")
    return ref, est


def rmse(reference, estimate) -> float:
    """RMSE between the waveforms after dividing both by max|reference| (13.2.3).

    The estimate is a resynthesis of the reference at the reference's scale, so it takes the same
    factor: the result is a fraction of the original's peak amplitude.
    """
    ref, est = _pair(reference, estimate)
    peak = np.max(np.abs(ref))
    if peak == 0:
        raise ValueError("the reference is all zeros: RMSE normalised to its peak is undefined")
    return float(np.sqrt(np.mean(((est - ref) / peak) ** 2)))


def si_sdr(reference, estimate) -> float:
    """Scale-invariant SDR in dB: 10 log10(|a s|^2 / |a s - s_hat|^2), a = <s_hat, s> / |s|^2,
    on zero-mean signals (Le Roux et al., 2019, eq. 1-2).  ``inf`` for an exact scaled copy."""
    ref, est = _pair(reference, estimate)
    ref = ref - ref.mean()
    est = est - est.mean()
    energy = np.dot(ref, ref)
    if energy == 0:
        raise ValueError("the reference is constant: SI-SDR is undefined")
    target = (np.dot(est, ref) / energy) * ref
    noise = est - target
    target_energy, noise_energy = np.dot(target, target), np.dot(noise, noise)
    # float64 round-off leaves about 1e-32 relative noise on an exact copy; call anything below
    # 1e-20 (200 dB) exact
    if noise_energy <= 1e-20 * target_energy:
        return math.inf
    if target_energy == 0:
        return -math.inf
    return float(10 * np.log10(target_energy / noise_energy))


def _pesq(ref: np.ndarray, est: np.ndarray, fs: int, mode: str) -> float:
    from pesq import BufferTooShortError, NoUtterancesError, pesq

    try:
        return float(pesq(fs, ref, est, mode))
    except (NoUtterancesError, BufferTooShortError):  # no score defined: silence, < 0.25 s
        return math.nan


def _to_16k(x: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(SAMPLE_RATE, int(sample_rate))
    return resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g)


def pesq_wb(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """PESQ wideband (P.862.2) at 16 kHz; NaN when PESQ finds no utterance in the reference or
    the signals are shorter than 0.25 s."""
    ref, est = _pair(reference, estimate)
    ref, est = _to_16k(ref, sample_rate), _to_16k(est, sample_rate)
    return _pesq(ref, est, 16000, "wb")


def pesq_nb(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """PESQ narrowband (P.862 with the P.862.1 mapping) on both signals resampled to 8 kHz
    (polyphase low-pass at 4 kHz); NaN when PESQ finds no utterance in the reference or the
    signals are shorter than 0.25 s."""
    from scipy.signal import resample_poly

    ref, est = _pair(reference, estimate)
    g = math.gcd(8000, int(sample_rate))
    up, down = 8000 // g, int(sample_rate) // g
    return _pesq(resample_poly(ref, up, down), resample_poly(est, up, down), 8000, "nb")


def _stoi(reference, estimate, sample_rate: int, extended: bool) -> float:
    from pystoi import stoi as _pystoi

    ref, est = _pair(reference, estimate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(_pystoi(ref, est, int(sample_rate), extended=extended))
    too_short = any("Not enough STFT frames" in str(w.message) for w in caught)
    for w in caught:  # pass on anything else
        if "Not enough STFT frames" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # pystoi's placeholder for "fewer than 30 speech frames": not a score
    return math.nan if too_short else value


def stoi(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """STOI (Taal et al., 2011) from pystoi; NaN when fewer than 30 frames of speech remain after
    pystoi's silence removal (pystoi itself returns 1e-5 there)."""
    return _stoi(reference, estimate, sample_rate, extended=False)


def estoi(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """Extended STOI (Jensen and Taal, 2016) from pystoi; NaN on too-short speech (:func:`stoi`)."""
    return _stoi(reference, estimate, sample_rate, extended=True)


_FUNCTIONS = {"rmse": rmse, "pesq_wb": pesq_wb, "pesq_nb": pesq_nb, "stoi": stoi, "estoi": estoi,
              "si_sdr": si_sdr}


def compute_metrics(reference, estimate, sample_rate: int = SAMPLE_RATE,
                    metrics: Iterable[str] = tuple(METRICS)) -> Dict[str, float]:
    """All requested metrics of one (reference, estimate) pair: ``{name: value}``."""
    out = {}
    for name in metrics:
        if name not in _FUNCTIONS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        fn = _FUNCTIONS[name]
        if name in ("rmse", "si_sdr"):
            out[name] = fn(reference, estimate)
        else:
            out[name] = fn(reference, estimate, sample_rate)
    return out


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple:
    """Distribution-free confidence interval of the median from order statistics.

    With n values, the number below the true median is Binomial(n, 1/2); the interval
    [x_(j), x_(n+1-j)] (1-based order statistics) covers the median with probability
    1 - 2 P(B <= j - 1), and j is the largest index keeping that at least ``level``.  When no j
    reaches the level (n < 6 at 95 %), the whole range [min, max] is returned.
    """
    from scipy.stats import binom

    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    if n == 0:
        return (math.nan, math.nan)
    j = 1
    while j + 1 <= n // 2 and 1 - 2 * binom.cdf(j, n, 0.5) >= level:
        j += 1
    return (float(x[j - 1]), float(x[n - j]))


def summarize(values: Iterable[float], level: float = 0.95) -> Dict[str, float]:
    """Mean, standard deviation, median and its confidence interval over the finite values.

    NaN values (metric undefined on that file) are left out and counted in ``n_skipped``.
    +-inf values (SI-SDR of an exact copy) are kept: the mean is then inf as well.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    keep = arr[~np.isnan(arr)]
    n = int(keep.size)
    if n == 0:
        return {"n": 0, "n_skipped": int(arr.size), "mean": math.nan, "std": math.nan,
                "median": math.nan, "median_ci_low": math.nan, "median_ci_high": math.nan}
    lo, hi = median_ci(keep, level)
    with np.errstate(invalid="ignore"):
        std = float(np.std(keep, ddof=1)) if n > 1 else math.nan
    return {"n": n, "n_skipped": int(arr.size - n), "mean": float(np.mean(keep)), "std": std,
            "median": float(np.median(keep)), "median_ci_low": lo, "median_ci_high": hi}


def summarize_table(rows: Sequence[Mapping[str, float]],
                    metrics: Iterable[str] = tuple(METRICS)) -> Dict[str, Dict[str, float]]:
    """:func:`summarize` of every metric over per-file rows ``[{metric: value, ...}, ...]``."""
    return {m: summarize([r[m] for r in rows if m in r]) for m in metrics}
