"""Short-time Fourier transform of the speech protocol (SPEC section 4, paper 13.2.1).

16 kHz audio, 512-sample (32 ms) sine window, 50 % overlap (hop 256), 257 bins (positive
frequencies of a 512-point DFT).  Spectrograms are **time-major**: ``(T, 257)``, the layout of
x in the models (batch, time, freq).

Framing: frame t is centred on sample ``t * HOP`` (as ``torch.stft(center=True)`` in the reference
implementation), and the signal is extended by reflection at both ends so that **every sample lies
under exactly two frames**: 256 samples before the start, and after the end up to the next multiple
of HOP plus 256.  A signal of L samples therefore gives ``T = 1 + ceil(L / HOP)`` frames; a sequence
of T frames comes from ``(T - 1) * HOP`` samples (T = 150 <-> 38144 samples, 2.4 s), where this
is the reference's ``1 + L // HOP``.  For other lengths we have one frame more than the reference,
so that the last samples are not covered by the tail of a single window: there the reference's
inverse divides by a squared window close to zero and amplifies any change of the spectrogram.
(Reflection needs a signal longer than the padding; shorter ones are zero-padded instead.)

The sine window ``w[n] = sin(pi (n + 1/2) / N)`` satisfies the Princen-Bradley condition
``w[n]^2 + w[n + N/2]^2 = 1``: with the same window for analysis and synthesis, weighted overlap-add
(:func:`istft`) reconstructs every sample exactly; no normalisation is needed anywhere in the
returned signal, which is cut to exactly ``length`` samples.  ``istft(stft(x), len(x)) == x`` up to
rounding for every length; for a modified spectrogram (resynthesis) :func:`istft` returns the
least-squares signal (Griffin & Lim 1984).

Power spectrogram: ``x = max(|STFT|^2, POWER_FLOOR)``.  The floor (1e-10) only touches bins of
frames that are exactly digital silence: with the waveform in [-1, 1], 16-bit quantisation noise
alone already gives about ``256 * (2^-15)^2 / 12 ~ 2e-8`` per bin (the window's energy is 256),
200 times the floor.  Without it an exact zero would make the Itakura-Saito / Gamma(1) likelihood
unbounded (its maximum over sigma^2 is ``-log x - 1``).  The reference adds no floor; WSJ0 has no
exact zeros.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 256
N_FREQ = N_FFT // 2 + 1  # 257
POWER_FLOOR = 1e-10

Array = np.ndarray | torch.Tensor

__all__ = [
    "HOP",
    "N_FFT",
    "N_FREQ",
    "POWER_FLOOR",
    "SAMPLE_RATE",
    "istft",
    "num_frames",
    "num_samples",
    "power_spectrogram",
    "sine_window",
    "spectrogram_from",
    "stft",
]


def sine_window(n: int = N_FFT, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The sine window ``sin(pi (k + 1/2) / n)``, k = 0..n-1 (32 ms at 16 kHz for n = 512)."""
    return torch.sin(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n).to(dtype)


def num_frames(length: int) -> int:
    """Number of STFT frames of a signal of ``length`` samples: ``1 + ceil(length / HOP)``."""
    return 1 + -(-int(length) // HOP)


def num_samples(frames: int) -> int:
    """Longest signal with ``frames`` frames: ``(frames - 1) * HOP`` (the shortest has
    ``(frames - 2) * HOP + 1``)."""
    return (int(frames) - 1) * HOP


def _as_tensor(wave: Array) -> tuple[torch.Tensor, bool]:
    if isinstance(wave, torch.Tensor):
        return wave, False
    return torch.from_numpy(np.ascontiguousarray(wave)), True


def stft(wave: Array) -> Array:
    """Complex STFT of a waveform: ``(..., L) -> (..., T, 257)`` with ``T = 1 + ceil(L / HOP)``.

    Returns a numpy array for a numpy input, a tensor for a tensor input; complex64 for float32
    input, complex128 for float64.
    """
    x, to_numpy = _as_tensor(wave)
    if x.is_complex():
        raise TypeError("stft expects a real waveform")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    elif x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"stft needs at least one sample, got shape {tuple(x.shape)}")
    batch_shape, length = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, length)
    extra = -length % HOP  # extend the end to a multiple of HOP: two frames over every sample
    if extra:
        mode = "reflect" if extra < length else "constant"
        flat = torch.nn.functional.pad(flat[:, None], (0, extra), mode=mode)[:, 0]
    pad_mode = "reflect" if flat.shape[-1] > N_FFT // 2 else "constant"
    spec = torch.stft(flat, N_FFT, HOP, window=sine_window(N_FFT, flat.dtype).to(flat.device),
                      center=True, pad_mode=pad_mode, normalized=False, onesided=True,
                      return_complex=True)  # (B, F, T)
    spec = spec.transpose(-1, -2).reshape(*batch_shape, -1, N_FREQ)
    return spec.numpy() if to_numpy else spec


def istft(spec: Array, length: int | None = None) -> Array:
    """Inverse STFT by weighted overlap-add: ``(..., T, 257) complex -> (..., length)``.

    ``length`` is the number of samples to return (default ``(T - 1) * HOP``); it must be one that
    gives T frames, i.e. ``1 + ceil(length / HOP) == T``.  ``istft(stft(x), len(x))`` returns x.
    """
    s, to_numpy = _as_tensor(spec)
    if not s.is_complex():
        raise TypeError("istft expects a complex spectrogram (use spectrogram_from(power, phase))")
    if s.dim() < 2 or s.shape[-1] != N_FREQ:
        raise ValueError(f"istft expects (..., T, {N_FREQ}), got shape {tuple(s.shape)}")
    frames = s.shape[-2]
    if length is None:
        length = num_samples(frames)
    if num_frames(length) != frames:
        raise ValueError(f"istft: {frames} frames come from {max(1, num_samples(frames - 1) + 1)} "
                         f"to {num_samples(frames)} samples, not length={length}")
    batch_shape = s.shape[:-2]
    flat = s.reshape(-1, frames, N_FREQ).transpose(-1, -2)  # (B, F, T)
    real_dtype = torch.float64 if flat.dtype == torch.complex128 else torch.float32
    # torch.istft divides by the overlap-added squared window, which is exactly 1 (up to
    # rounding) on the (T - 1) * HOP samples under two frames: plain weighted overlap-add.
    wave = torch.istft(flat, N_FFT, HOP, window=sine_window(N_FFT, real_dtype).to(flat.device),
                       center=True, normalized=False, onesided=True,
                       length=num_samples(frames))[:, :length]
    wave = wave.reshape(*batch_shape, length)
    return wave.numpy() if to_numpy else wave


def power_spectrogram(wave: Array, floor: float = POWER_FLOOR) -> tuple[Array, Array]:
    """``(power, phase)`` of a waveform, both ``(..., T, 257)`` float32.

    ``power = max(|STFT|^2, floor)`` is the model input x (13.2.1); ``phase = angle(STFT)`` is kept
    for resynthesis with :func:`spectrogram_from` and :func:`istft`.
    """
    spec = stft(wave)
    if isinstance(spec, torch.Tensor):
        power = (spec.real ** 2 + spec.imag ** 2).clamp_min(floor).to(torch.float32)
        return power, torch.angle(spec).to(torch.float32)
    power = np.maximum(spec.real ** 2 + spec.imag ** 2, floor).astype(np.float32)
    return power, np.angle(spec).astype(np.float32)


def spectrogram_from(power: Array, phase: Array) -> Array:
    """Complex STFT ``sqrt(power) * exp(i phase)`` (resynthesis: model power, input phase)."""
    if isinstance(power, torch.Tensor) or isinstance(phase, torch.Tensor):
        power, phase = torch.as_tensor(power), torch.as_tensor(phase)
        return torch.polar(power.clamp_min(0).sqrt(), phase.to(power.dtype))
    power, phase = np.asarray(power), np.asarray(phase)
    return np.sqrt(np.maximum(power, 0)) * np.exp(1j * phase)
