"""Audio input/output for the speech protocol (SPEC section 4): 16 kHz mono float32 waveforms.

- :func:`load_audio` reads wav/flac (anything libsndfile reads), mixes channels to mono (mean) and
  resamples any other rate to 16 kHz with a polyphase FIR filter (``scipy.signal.resample_poly``,
  Kaiser window; the output has ``ceil(L * 16000 / sr)`` samples).
- :func:`save_audio` writes atomically (temporary file in the same folder, then ``os.replace``), so
  an interrupted write never leaves a truncated file under the final name.
- :func:`trim_silence` removes leading and trailing silence (13.2.1: "beginning and ending silence
  portions removed"), the rule of ``librosa.effects.trim`` that the reference implementation uses
  (``top_db=30``, frames of 2048 samples, hop 512, threshold relative to the loudest frame), with
  the signal padded by reflection for the frame energies as librosa <= 0.9 (the authors' version)
  did; librosa >= 0.10 pads with zeros, which trims 8 of the 143 test files of speech16k
  differently (``pad="zeros"``).
  A file whose loudest frame is below ``floor_db`` dBFS (default -80; 16-bit quantisation noise is
  about -101 dBFS RMS and the pauses of ``speech16k`` are near -100 dBFS) is silence only.
- :func:`peak_normalize` scales a waveform to peak amplitude 1 (the reference normalises every
  sequence this way, and the RMSE of 13.2.3 is computed on waveforms normalised to [-1, 1]).

Every failure on a file raises :class:`AudioError` (a ``ValueError``) with a one-line message that
names the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from ..atomic import create_temp
from .stft import SAMPLE_RATE

PathLike = str | os.PathLike

AUDIO_EXTENSIONS = (".wav", ".flac")
TRIM_TOP_DB = 30.0
SILENCE_FLOOR_DB = -80.0
TRIM_FRAME = 2048
TRIM_HOP = 512

__all__ = [
    "AUDIO_EXTENSIONS",
    "TRIM_TOP_DB",
    "AudioError",
    "load_audio",
    "peak_normalize",
    "resample",
    "save_audio",
    "trim_bounds",
    "trim_silence",
]


class AudioError(ValueError):
    """A file that cannot be used as speech: missing, unreadable, empty or silent."""


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample ``(..., L)`` from ``orig_sr`` to ``target_sr`` (polyphase, exact rational ratio)."""
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wave
    g = math.gcd(orig_sr, target_sr)
    out = resample_poly(wave, target_sr // g, orig_sr // g, axis=-1)
    return out.astype(wave.dtype, copy=False)


def load_audio(path: PathLike) -> np.ndarray:
    """Read an audio file as a mono float32 waveform at 16 kHz, in [-1, 1] for PCM files."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # noqa: BLE001 (libsndfile raises LibsndfileError, RuntimeError...)
        reason = " ".join(str(err).split()) or type(err).__name__
        raise AudioError(f"{path}: cannot read audio ({reason})") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: empty audio file (0 samples)")
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    wave = resample(np.ascontiguousarray(wave, dtype=np.float32), sr, SAMPLE_RATE)
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: empty audio file after resampling from {sr} Hz")
    return wave


def save_audio(path: PathLike, wave, sr: int = SAMPLE_RATE, subtype: str | None = None) -> Path:
    """Write ``wave`` (L,) or (L, channels) to ``path`` atomically; format from the extension.

    ``subtype`` is passed to soundfile (default: its default for the format, 16-bit PCM for wav and
    flac, which clips samples outside [-1, 1)).  Use ``subtype="FLOAT"`` for an exact wav copy.
    """
    path = Path(path)
    wave = np.asarray(wave.detach().cpu() if hasattr(wave, "detach") else wave)
    if wave.ndim not in (1, 2) or wave.shape[0] == 0:
        raise ValueError(f"save_audio: expected a non-empty (L,) or (L, C) waveform, "
                         f"got shape {wave.shape}")
    fmt = path.suffix.lstrip(".").upper()
    if not fmt or fmt not in sf.available_formats():
        raise ValueError(f"save_audio: cannot infer an audio format from {path.name!r}; "
                         f"use a .wav or .flac name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp(path)  # mode 0o666 less the umask
    try:
        sf.write(tmp, wave, int(sr), subtype=subtype, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


TRIM_PADS = ("reflect", "zeros")


def _frame_db(wave: np.ndarray, pad: str = "reflect") -> np.ndarray:
    """RMS of centred frames (2048, hop 512) in dB re full scale (librosa's rule); the signal is
    extended by 1024 samples at each end by reflection (``pad="reflect"``, librosa <= 0.9) or with
    zeros (``"zeros"``, librosa >= 0.10)."""
    if pad not in TRIM_PADS:
        raise ValueError(f"pad must be one of {', '.join(TRIM_PADS)}, got {pad!r}")
    half = TRIM_FRAME // 2
    padded = np.pad(wave.astype(np.float64), (half, half),
                    mode="reflect" if pad == "reflect" and wave.shape[0] > 1 else "constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, TRIM_FRAME)[::TRIM_HOP]
    ms = np.einsum("ij,ij->i", frames, frames) / TRIM_FRAME
    return 10.0 * np.log10(np.maximum(ms, 1e-20))


def trim_bounds(wave: np.ndarray, top_db: float = TRIM_TOP_DB,
                floor_db: float = SILENCE_FLOOR_DB, name: str | None = None,
                pad: str = "reflect") -> tuple[int, int]:
    """``(start, end)`` sample indices of the non-silent part (see :func:`trim_silence`)."""
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.shape[0] == 0:
        raise AudioError(f"{name or 'waveform'}: expected a non-empty mono waveform, "
                         f"got shape {wave.shape}")
    db = _frame_db(wave, pad)
    loudest = db.max()
    if loudest < floor_db:
        raise AudioError(f"{name or 'waveform'}: silence only (loudest frame {loudest:.0f} dBFS "
                         f"< {floor_db:.0f} dBFS)")
    voiced = np.flatnonzero(db > loudest - top_db)
    start = int(voiced[0]) * TRIM_HOP
    end = min(wave.shape[0], (int(voiced[-1]) + 1) * TRIM_HOP)
    return start, end


def trim_silence(wave: np.ndarray, top_db: float = TRIM_TOP_DB,
                 floor_db: float = SILENCE_FLOOR_DB, name: str | None = None,
                 pad: str = "reflect") -> np.ndarray:
    """Remove leading and trailing silence.

    A frame (2048 samples, hop 512) is silent when its RMS is more than ``top_db`` below the
    loudest frame's; the result runs from the first to the end of the last non-silent frame's hop,
    exactly as ``librosa.effects.trim(wave, top_db=top_db)`` of librosa <= 0.9, which pads the
    signal by reflection for the frame energies (``pad="zeros"``: librosa >= 0.10).  Raises
    :class:`AudioError` (naming ``name``) when the loudest frame is below ``floor_db`` dBFS: an
    absolute test, since a relative threshold alone would keep the loudest frame of pure noise.
    """
    start, end = trim_bounds(wave, top_db, floor_db, name, pad)
    return wave[start:end]


def peak_normalize(wave: np.ndarray) -> np.ndarray:
    """``wave / max|wave|`` (unchanged if all zero)."""
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    return wave / peak if peak > 0 else wave
