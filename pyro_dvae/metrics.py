"""Speech quality metrics of the analysis-resynthesis experiment (13.2.3) and their summaries.

All functions take the original (reference) and the resynthesised (estimate) waveform as 1-D arrays
of the same length at 16 kHz and return a float; higher is better except for the RMSEs.

- :func:`rmse`: root mean squared error between the waveforms, with the original normalised to
  [-1, 1] (13.2.3) and the estimate scaled by the same factor, so it reads as a fraction of the
  original's peak amplitude.  Minimum 0.
- :func:`rmse_paper`: the RMSE as the authors' evaluation computes it for Table 13.1: the estimate
  first multiplied by its least-squares gain <s_hat, s> / <s_hat, s_hat>, both signals at the scale
  the authors' script writes them to file, 0.9 / max(max|s|, max|s_hat|) with s at peak 1.
- :func:`si_sdr`: scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019).
  Unbounded above: an exact copy (up to a positive gain) gives ``inf``.
- :func:`pesq_wb`: PESQ wideband, ITU-T P.862.2 at 16 kHz (MOS-LQO, at most about 4.64).
- :func:`pesq_nb`: PESQ narrowband, P.862 with the P.862.1 mapping to MOS-LQO, on both signals
  resampled to 8 kHz (at most about 4.55).
- :func:`pesq_paper`: the scale of Table 13.1: the raw P.862 narrowband score (range -0.5 to 4.5
  in P.862; the code's floor is lower) computed on the 16 kHz signals, which is what the authors'
  ``pypesq`` returns.  The ``pesq`` package's 16 kHz narrowband mode computes that score and returns
  its P.862.1 mapping; :func:`p862_raw_from_mos_lqo` inverts the mapping in closed form.
- :func:`stoi` and :func:`estoi`: short-time objective intelligibility (Taal et al., 2011) and its
  extended version (Jensen and Taal, 2016), from ``pystoi``; at most 1.

Undefined values are NaN, never a made-up number, and :func:`compute_metrics` can record why:
pystoi returns 1e-5 (with a warning) when fewer than 30 frames of speech are left after its
silence removal; PESQ finds no utterance, or the signal is shorter than 0.25 s; SI-SDR of a
constant (e.g. all-zero) estimate is 0/0.  :func:`summarize` counts NaN values as skipped.

The ``pesq`` C library overflows fixed-size buffers on long signals with many utterances (it
crashed with SIGSEGV on 120 s of recorded speech and on 60 one-second bursts), which would kill the
calling process.  Every PESQ score is therefore computed in a separate child process
(:class:`PesqProcess`): the score is PESQ of the whole signal wherever the library can compute it,
and NaN, with the crash as its reason, where it cannot.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

SAMPLE_RATE = 16000

#: metric name -> (label in tables, higher is better)
METRICS: Dict[str, tuple] = {
    "rmse": ("RMSE", False),
    "rmse_paper": ("RMSE-paper", False),
    "pesq_wb": ("PESQ-WB", True),
    "pesq_nb": ("PESQ-NB", True),
    "pesq_paper": ("PESQ-paper", True),
    "stoi": ("STOI", True),
    "estoi": ("ESTOI", True),
    "si_sdr": ("SI-SDR (dB)", True),
}

#: pystoi's intermediate intelligibility needs this many 256-sample frames at 10 kHz
_STOI_MIN_FRAMES = 30


class Undefined(Exception):
    """A metric that has no value on this pair of signals; the message says why.

    The public metric functions return NaN instead; :func:`compute_metrics` records the message.
    """


def _nan_if_undefined(fn: Callable[..., float]) -> Callable[..., float]:
    """The public form of a metric: NaN where ``fn`` raises :class:`Undefined`.  The strict form
    stays reachable as ``.strict`` (used by :func:`compute_metrics` to keep the reason)."""

    @functools.wraps(fn)
    def metric(*args, **kwargs) -> float:
        try:
            return fn(*args, **kwargs)
        except Undefined:
            return math.nan

    metric.strict = fn
    return metric


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


def _peak(ref: np.ndarray, what: str) -> float:
    peak = float(np.max(np.abs(ref)))
    if peak == 0:
        raise ValueError(f"the reference is all zeros: {what} normalised to its peak is undefined")
    return peak


def rmse(reference, estimate) -> float:
    """RMSE between the waveforms after dividing both by max|reference| (13.2.3).

    The estimate is a resynthesis of the reference at the reference's scale, so it takes the same
    factor: the result is a fraction of the original's peak amplitude.
    """
    ref, est = _pair(reference, estimate)
    peak = _peak(ref, "RMSE")
    return float(np.sqrt(np.mean(((est - ref) / peak) ** 2)))


#: the authors' evaluation writes both signals scaled so that the larger peak is this
_PAPER_FILE_PEAK = 0.9


def rmse_paper(reference, estimate) -> float:
    """RMSE as the authors' evaluation computes it (the numbers of Table 13.1).

    With s the reference divided by its peak and s_hat the estimate divided by the same factor:
    the estimate is multiplied by its least-squares gain a = <s_hat, s> / <s_hat, s_hat> (the gain
    that minimises the RMSE), and both are at the scale c = 0.9 / max(1, max|s_hat|) at which the
    authors' script writes them to 16-bit files before scoring:
    ``c * sqrt(mean((a s_hat - s)^2))``.  (The 16-bit rounding they add is below 1e-5 and left
    out.)  For an all-zero estimate every gain gives the same error, ``0.9 * rms(s)``.
    """
    ref, est = _pair(reference, estimate)
    peak = _peak(ref, "RMSE")
    s, s_hat = ref / peak, est / peak
    energy = float(np.dot(s_hat, s_hat))
    gain = float(np.dot(s_hat, s)) / energy if energy > 0 else 0.0
    scale = _PAPER_FILE_PEAK / max(1.0, float(np.max(np.abs(s_hat))))
    return float(scale * np.sqrt(np.mean((gain * s_hat - s) ** 2)))


@_nan_if_undefined
def si_sdr(reference, estimate) -> float:
    """Scale-invariant SDR in dB: 10 log10(|a s|^2 / |a s - s_hat|^2), a = <s_hat, s> / |s|^2,
    on zero-mean signals (Le Roux et al., 2019, eq. 1-2).

    ``inf`` for an exact scaled copy, ``-inf`` for a non-constant estimate orthogonal to the
    reference, NaN for a constant (e.g. all-zero) estimate, where the ratio is 0/0."""
    ref, est = _pair(reference, estimate)
    ref = ref - ref.mean()
    est = est - est.mean()
    energy = np.dot(ref, ref)
    if energy == 0:
        raise ValueError("the reference is constant: SI-SDR is undefined")
    if not np.any(est):
        raise Undefined("the estimate is constant (all zeros after removing its mean): "
                        "SI-SDR is 0/0")
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


# ---- PESQ in a guarded child process -------------------------------------------------------------
#: the child: reads jobs (a JSON header line, then the two float64 signals) from stdin and answers
#: one JSON line per job on a private copy of stdout (the C library's own prints go to stderr)
_PESQ_CHILD = r"""
import sys
del sys.path[0]  # never import from the working directory
import json, os
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
import numpy as np
from pesq import BufferTooShortError, NoUtterancesError, pesq
stdin = sys.stdin.buffer
while True:
    head = stdin.readline()
    if not head:
        break
    job = json.loads(head)
    n = job["n"]
    ref = np.frombuffer(stdin.read(8 * n), dtype=np.float64)
    est = np.frombuffer(stdin.read(8 * n), dtype=np.float64)
    try:
        out = {"value": float(pesq(job["fs"], ref, est, job["mode"]))}
    except NoUtterancesError:
        out = {"undefined": "PESQ found no utterance in the reference"}
    except BufferTooShortError:
        out = {"undefined": "PESQ needs at least 0.25 s"}
    except Exception as err:  # the inputs were checked: a failure of the library on them
        out = {"undefined": f"the pesq library failed ({type(err).__name__}: {err})"}
    reply.write(json.dumps(out) + "\n")
    reply.flush()
"""


def _signal_name(returncode: Optional[int]) -> str:
    if returncode is not None and returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class PesqProcess:
    """The ``pesq`` library run in a child process, so that a crash of its C code (SIGSEGV or a
    stack-smashing abort on long signals) ends that child, not the caller.

    :meth:`score` sends both signals to the child and returns its score.  When the child dies, the
    call raises :class:`Undefined` naming the signal and the signal's length, and the next call
    starts a new child.  One child per calling process (started on first use, ended at exit);
    calls from several threads are serialised.
    """

    #: Python code the child runs (a class attribute, so a test can substitute a crashing child)
    child_code = _PESQ_CHILD

    def __init__(self):
        self._proc: Optional[subprocess.Popen] = None
        self._pid = None  # the process that started the child (a forked copy starts its own)
        self._stderr = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _start(self) -> None:
        import importlib.util

        if importlib.util.find_spec("pesq") is None:
            raise ModuleNotFoundError("PESQ needs the 'pesq' package: pip install pesq")
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self._proc = subprocess.Popen([sys.executable, "-c", self.child_code],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env=env)
        self._pid = os.getpid()

    def _release(self) -> None:
        """Close the pipes and the stderr file of the (ended) child."""
        for f in (self._proc.stdin, self._proc.stdout, self._stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:  # e.g. a broken pipe while flushing to a dead child
                pass
        self._proc, self._stderr = None, None

    def _crash_reason(self, seconds: float) -> str:
        code = self._proc.wait()
        detail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace")
                     .splitlines() if ln.strip()]
            detail = f": {lines[-1]}" if lines else ""
        self._release()
        return (f"the pesq library crashed ({_signal_name(code)}{detail}) on this "
                f"{seconds:.1f} s signal")

    def score(self, fs: int, reference: np.ndarray, estimate: np.ndarray, mode: str) -> float:
        """PESQ (``pesq.pesq(fs, reference, estimate, mode)``) of the whole signals; raises
        :class:`Undefined` where the library gives no score or crashes."""
        ref = np.ascontiguousarray(reference, dtype=np.float64)
        est = np.ascontiguousarray(estimate, dtype=np.float64)
        head = json.dumps({"fs": int(fs), "mode": mode, "n": int(ref.size)}).encode() + b"\n"
        with self._lock:
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(head + ref.tobytes() + est.tobytes())
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except (BrokenPipeError, ConnectionResetError):
                line = b""
            if not line:
                raise Undefined(self._crash_reason(ref.size / fs))
        out = json.loads(line)
        if "undefined" in out:
            raise Undefined(out["undefined"])
        return float(out["value"])

    def close(self) -> None:
        """End the child (it exits when its input closes)."""
        if self._proc is None or self._pid != os.getpid():
            return
        proc = self._proc
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        self._release()


_PESQ = PesqProcess()


def _pesq(ref: np.ndarray, est: np.ndarray, fs: int, mode: str) -> float:
    return _PESQ.score(fs, ref, est, mode)


def _to_16k(x: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(SAMPLE_RATE, int(sample_rate))
    return resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g)


@_nan_if_undefined
def pesq_wb(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """PESQ wideband (P.862.2) at 16 kHz; NaN when PESQ finds no utterance in the reference, the
    signals are shorter than 0.25 s or the library crashes on them."""
    ref, est = _pair(reference, estimate)
    ref, est = _to_16k(ref, sample_rate), _to_16k(est, sample_rate)
    return _pesq(ref, est, 16000, "wb")


@_nan_if_undefined
def pesq_nb(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """PESQ narrowband (P.862 with the P.862.1 mapping to MOS-LQO) on both signals resampled to
    8 kHz (polyphase low-pass at 4 kHz); NaN as for :func:`pesq_wb`."""
    from scipy.signal import resample_poly

    ref, est = _pair(reference, estimate)
    g = math.gcd(8000, int(sample_rate))
    up, down = 8000 // g, int(sample_rate) // g
    return _pesq(resample_poly(ref, up, down), resample_poly(est, up, down), 8000, "nb")


# P.862.1: MOS-LQO = 0.999 + 4 / (1 + exp(-1.4945 x + 4.6607)) of the raw P.862 score x, with the
# constants as the pesq library's C code holds them (float32)
_P8621_LOW = float(np.float32(0.999))
_P8621_SPAN = 4.0
_P8621_SLOPE = float(np.float32(1.4945))
_P8621_OFFSET = float(np.float32(4.6607))


def p862_mos_lqo(raw: float) -> float:
    """The P.862.1 mapping of a raw P.862 narrowband score to MOS-LQO (in float64)."""
    return _P8621_LOW + _P8621_SPAN / (1.0 + math.exp(-_P8621_SLOPE * raw + _P8621_OFFSET))


def p862_raw_from_mos_lqo(mos_lqo: float) -> float:
    """The raw P.862 score whose P.862.1 mapping is ``mos_lqo``: the closed-form inverse

    x = (4.6607 + ln((m - 0.999) / (4.999 - m))) / 1.4945,

    defined for 0.999 < m < 4.999, the open range of the mapping.  The library maps in float32,
    so a score it returns carries up to about 2e-7 relative rounding, which the inverse turns
    into at most about 1e-5 near the floor (the mapping's slope is smallest there) and 1e-6 above
    raw 0.5.  A value outside the range cannot come from the mapping: ``ValueError``."""
    m = float(mos_lqo)
    low, high = _P8621_LOW, _P8621_LOW + _P8621_SPAN
    if not (low < m < high):
        raise ValueError(f"{m!r} is outside the range ({low:.6f}, {high:.6f}) of the P.862.1 "
                         f"mapping: no raw P.862 score maps to it")
    return (_P8621_OFFSET + math.log((m - low) / (high - m))) / _P8621_SLOPE


@_nan_if_undefined
def pesq_paper(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """The raw P.862 narrowband score on the 16 kHz signals (the PESQ of Table 13.1, as the
    authors' ``pypesq`` computes it): the ``pesq`` package's 16 kHz 'nb' score (P.862.1 MOS-LQO)
    mapped back by :func:`p862_raw_from_mos_lqo`.  NaN as for :func:`pesq_wb`."""
    ref, est = _pair(reference, estimate)
    ref, est = _to_16k(ref, sample_rate), _to_16k(est, sample_rate)
    return p862_raw_from_mos_lqo(_pesq(ref, est, 16000, "nb"))


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
    if too_short:  # pystoi's placeholder for "fewer than 30 speech frames": not a score
        raise Undefined(f"fewer than {_STOI_MIN_FRAMES} frames of speech after pystoi's "
                        "silence removal")
    return value


@_nan_if_undefined
def stoi(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """STOI (Taal et al., 2011) from pystoi; NaN when fewer than 30 frames of speech remain after
    pystoi's silence removal (pystoi itself returns 1e-5 there)."""
    return _stoi(reference, estimate, sample_rate, extended=False)


@_nan_if_undefined
def estoi(reference, estimate, sample_rate: int = SAMPLE_RATE) -> float:
    """Extended STOI (Jensen and Taal, 2016) from pystoi; NaN on too-short speech (:func:`stoi`)."""
    return _stoi(reference, estimate, sample_rate, extended=True)


_FUNCTIONS = {"rmse": rmse, "rmse_paper": rmse_paper, "pesq_wb": pesq_wb, "pesq_nb": pesq_nb,
              "pesq_paper": pesq_paper, "stoi": stoi, "estoi": estoi, "si_sdr": si_sdr}
#: the metrics that take no sample rate
_WAVEFORM_ONLY = ("rmse", "rmse_paper", "si_sdr")


def compute_metrics(reference, estimate, sample_rate: int = SAMPLE_RATE,
                    metrics: Iterable[str] = tuple(METRICS),
                    reasons: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """All requested metrics of one (reference, estimate) pair: ``{name: value}``.

    A metric without a value on this pair is NaN; if ``reasons`` (a dict) is given, the reason is
    stored there under the metric's name."""
    out = {}
    for name in metrics:
        if name not in _FUNCTIONS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        fn = getattr(_FUNCTIONS[name], "strict", _FUNCTIONS[name])
        args = (reference, estimate) if name in _WAVEFORM_ONLY else (reference, estimate,
                                                                      sample_rate)
        try:
            out[name] = fn(*args)
        except Undefined as why:
            out[name] = math.nan
            if reasons is not None:
                reasons[name] = str(why)
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
