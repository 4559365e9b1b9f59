"""STFT of the speech protocol (SPEC section 4): framing, an independent DFT reference, and the
round trip istft(stft(x)) = x on real speech and on noise."""

import numpy as np
import pytest
import torch

from pyro_dvae.data import (
    HOP,
    N_FFT,
    N_FREQ,
    POWER_FLOOR,
    SAMPLE_RATE,
    istft,
    load_audio,
    num_frames,
    num_samples,
    power_spectrogram,
    sine_window,
    spectrogram_from,
    stft,
)


def reference_stft(x):
    """Direct DFT of reflect-padded, sine-windowed frames centred on t * HOP (numpy only); the end
    is first extended by reflection to a multiple of HOP."""
    n = np.arange(N_FFT)
    w = np.sin(np.pi * (n + 0.5) / N_FFT)
    extended = np.pad(x, (0, -len(x) % HOP), mode="reflect")
    padded = np.pad(extended, N_FFT // 2, mode="reflect")
    T = 1 + len(extended) // HOP
    frames = np.stack([padded[t * HOP:t * HOP + N_FFT] * w for t in range(T)])
    k = np.arange(N_FREQ)
    dft = np.exp(-2j * np.pi * np.outer(n, k) / N_FFT)
    return frames @ dft


def test_constants_and_framing():
    assert (SAMPLE_RATE, N_FFT, HOP, N_FREQ) == (16000, 512, 256, 257)
    assert num_frames(num_samples(150)) == 150 and num_samples(150) == 38144
    for length in (1, 255, 256, 257, 511, 512, 1000, 38144, 38145, 38399):
        T = 1 + int(np.ceil(length / HOP))
        assert num_frames(length) == T
        assert stft(np.zeros(length)).shape == (T, N_FREQ)


def test_sine_window_princen_bradley():
    w = sine_window().numpy()
    assert w.shape == (N_FFT,)
    np.testing.assert_allclose(w[:HOP] ** 2 + w[HOP:] ** 2, 1.0, atol=1e-15)


@pytest.mark.parametrize("length", [3000, 3072, 38144])
def test_stft_matches_direct_dft(length):
    x = np.random.default_rng(0).standard_normal(length)
    np.testing.assert_allclose(stft(x), reference_stft(x), atol=1e-9)


def test_istft_of_a_modified_spectrogram_is_overlap_add():
    """Every returned sample lies under two frames whose squared windows sum to 1, so istft is
    plain weighted overlap-add: no division by a small window tail amplifies a modification."""
    rng = np.random.default_rng(3)
    length = 5 * HOP + 1  # the length where a single frame would cover the last samples
    spec = stft(rng.standard_normal(length))
    spec = spec * rng.uniform(0, 2, spec.shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, spec.shape))
    w = sine_window().numpy()
    frames = np.fft.irfft(spec, N_FFT) * w  # synthesis-windowed frames, centred on t * HOP
    out = np.zeros((spec.shape[0] + 1) * HOP)
    for t, frame in enumerate(frames):
        out[t * HOP:t * HOP + N_FFT] += frame
    np.testing.assert_allclose(istft(spec, length), out[HOP:HOP + length], atol=1e-12)


def test_sinusoid_peaks_in_its_bin():
    t = np.arange(16000) / SAMPLE_RATE
    power, _ = power_spectrogram(np.sin(2 * np.pi * 1000.0 * t))
    assert power.shape == (64, N_FREQ) and power.dtype == np.float32
    assert (power[1:-1].argmax(axis=1) == 32).all()  # 1000 Hz / (16000 / 512) = bin 32


@pytest.mark.parametrize("length", [1, 100, 256, 257, 300, 511, 512, 513, 4097, 38144, 40000])
def test_round_trip_noise(length):
    x = np.random.default_rng(length).standard_normal(length)
    y = istft(stft(x), length)
    assert y.shape == (length,)
    np.testing.assert_allclose(y, x, atol=1e-12)
    x32 = x.astype(np.float32)
    y32 = istft(stft(x32), length)
    assert y32.dtype == np.float32
    assert np.abs(y32 - x32).max() < 1e-6 * max(1.0, np.abs(x32).max())


def test_round_trip_real_speech(speech_files):
    for path in speech_files:
        x = load_audio(path)
        y = istft(stft(x), len(x))
        assert y.shape == x.shape
        assert np.abs(y - x).max() < 1e-6, path  # float32 rounding, peak < 1
        y64 = istft(stft(x.astype(np.float64)), len(x))
        assert np.abs(y64 - x).max() < 1e-12, path


def test_resynthesis_from_power_and_phase(speech_files):
    x = load_audio(speech_files[0]).astype(np.float64)
    power, phase = power_spectrogram(x)
    y = istft(spectrogram_from(power.astype(np.float64), phase.astype(np.float64)), len(x))
    # float32 power and phase: relative error ~1e-7 per coefficient
    assert np.abs(y - x).max() < 1e-5


def test_tensor_in_tensor_out_and_batches():
    x = torch.randn(3, 2, 2000, dtype=torch.float64)
    spec = stft(x)
    assert isinstance(spec, torch.Tensor) and spec.shape == (3, 2, 9, N_FREQ)
    np.testing.assert_allclose(spec[1, 0].numpy(), stft(x[1, 0].numpy()), atol=1e-12)
    y = istft(spec, 2000)
    assert isinstance(y, torch.Tensor) and torch.allclose(y, x, atol=1e-12)
    power, phase = power_spectrogram(x[0, 0])
    assert power.dtype == torch.float32 and phase.shape == (9, N_FREQ)
    back = istft(spectrogram_from(power.double(), phase.double()), 2000)
    assert torch.allclose(back, x[0, 0], atol=1e-5)


def test_power_floor_and_values():
    power, phase = power_spectrogram(np.zeros(1000))
    assert (power == np.float32(POWER_FLOOR)).all() and (phase == 0).all()
    x = np.random.default_rng(1).standard_normal(1000)
    power, _ = power_spectrogram(x)
    np.testing.assert_allclose(power, np.abs(reference_stft(x)) ** 2, rtol=1e-6)


def test_istft_checks_its_input():
    spec = stft(np.zeros(1000))
    assert istft(spec).shape == (num_samples(spec.shape[0]),)
    with pytest.raises(ValueError, match="frames"):
        istft(spec, 2000)
    with pytest.raises(TypeError):
        istft(spec.real, 1000)
    with pytest.raises(ValueError, match="257"):
        istft(spec[:, :100], 1000)
    with pytest.raises(ValueError):
        stft(np.zeros(0))
