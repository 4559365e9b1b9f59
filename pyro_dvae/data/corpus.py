"""A built-in, deterministic, speech-like corpus: the default data of ``pyro-dvae fit`` (no download).

Each utterance is synthesised at 16 kHz by a small source-filter model (Fant's model of speech
production, the one behind the Gamma / Itakura-Saito power-spectrogram model of 13.2.1):

- **speaker**: mean pitch 95-210 Hz, vocal-tract scale 0.88-1.15 (scales all formants), spectral
  tilt of the glottal source;
- **voiced segments** (vowels): a band-limited harmonic source (closed-form sum of the harmonics
  below 7.6 kHz, Dirichlet kernel) whose pitch moves continuously (declination over the utterance,
  an accent per syllable, 5 Hz vibrato, slow jitter), with a -6 dB/octave tilt and a little
  breath noise, through a cascade of four time-varying formant resonators (F1-F4 and bandwidths
  updated every 5 ms) whose targets move smoothly from vowel to vowel (coarticulation);
- **unvoiced segments**: noise through fricative-like band-pass filters ("s" 3.8-7.6 kHz, "sh"
  2.2-5.5 kHz, "f" above 1 kHz, "h" 0.5-4 kHz), stop closures followed by short decaying bursts;
- **pauses** between words and leading/trailing silence at about -100 dBFS (Gaussian noise), like
  the pauses of real studio recordings.

Everything is drawn from ``numpy.random.default_rng([SEED, split, index])``: the corpus is identical
on every run.  The waveforms are turned into features by exactly the pipeline used for audio files
(:mod:`pyro_dvae.data.datasets`: trim, peak-normalise, STFT).  Sizes (``BUILTIN_SPLITS``): 72 train
utterances of 1.2-4.4 s, 15 val, 6 test of 1.5-4.5 s; with T = 150 this gives about a hundred
training sequences, small enough for ``pyro-dvae fit --model srnn`` to train in minutes on 2 cores.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.signal import butter, lfilter, sosfilt

from .stft import SAMPLE_RATE

SEED = 20211213
CORPUS_VERSION = 1
BLOCK = 80  # control rate: formants and pitch targets are updated every 5 ms
NOISE_DBFS = -100.0

# split -> (number of utterances, (min, max) duration in seconds)
BUILTIN_SPLITS: dict[str, tuple[int, tuple[float, float]]] = {
    "train": (72, (1.2, 4.4)),
    "val": (15, (1.2, 4.4)),
    "test": (6, (1.5, 4.5)),
}
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}

# Formant targets F1-F4 (Hz) of a few vowels (Peterson & Barney 1952, adult male averages).
VOWELS = np.array([
    [730, 1090, 2440, 3400],   # a
    [270, 2290, 3010, 3500],   # i
    [300, 870, 2240, 3300],    # u
    [530, 1840, 2480, 3500],   # e
    [570, 840, 2410, 3300],    # o
    [660, 1720, 2410, 3400],   # ae
    [440, 1020, 2240, 3300],   # schwa-like
], dtype=np.float64)
BANDWIDTHS = np.array([[60, 90], [80, 120], [120, 180], [180, 250]], dtype=np.float64)

FRICATIVES = {  # band edges (Hz) and amplitude range relative to vowels
    "s": (("bandpass", (3800, 7600)), (0.25, 0.40)),
    "sh": (("bandpass", (2200, 5500)), (0.30, 0.45)),
    "f": (("highpass", 1000), (0.08, 0.15)),
    "h": (("bandpass", (500, 4000)), (0.05, 0.10)),
}

__all__ = ["BUILTIN_SPLITS", "CORPUS_VERSION", "SEED", "builtin_names", "builtin_waves",
           "synthesize_utterance"]


def _ramp(n: int, rise: int) -> np.ndarray:
    """Raised-cosine attack and release of ``rise`` samples on a length-n envelope."""
    env = np.ones(n)
    rise = max(1, min(rise, n // 2))
    r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(rise) + 0.5) / rise)
    env[:rise] *= r
    env[n - rise:] *= r[::-1]
    return env


def _noise_filter(kind: str):
    (btype, edges), _ = FRICATIVES[kind]
    return butter(4, edges, btype=btype, fs=SAMPLE_RATE, output="sos")


@functools.cache
def _fricative_sos(kind: str):
    return _noise_filter(kind)


def _plan(rng: np.random.Generator, n: int, lead: int, tail: int):
    """Segments of one utterance: lists of vowels (start, length, formants, accent, amplitude)
    and of noise events (start, length, kind, amplitude)."""
    vowels, noises = [], []
    t, end = lead, n - tail
    vtl = rng.uniform(0.88, 1.15)
    while True:
        for _ in range(rng.integers(1, 4)):  # syllables of a word
            u = rng.random()
            if u < 0.45:  # fricative onset
                kind = rng.choice(list(FRICATIVES))
                length = int(rng.uniform(0.06, 0.16) * SAMPLE_RATE)
                noises.append((t, length, kind, rng.uniform(*FRICATIVES[kind][1])))
                t += length - int(0.01 * SAMPLE_RATE)  # overlaps the vowel onset by 10 ms
            elif u < 0.65:  # stop: closure, then a short burst
                t += int(rng.uniform(0.03, 0.07) * SAMPLE_RATE)
                length = int(rng.uniform(0.008, 0.02) * SAMPLE_RATE)
                noises.append((t, length, "burst", rng.uniform(0.3, 0.5)))
                t += length
            length = int(rng.uniform(0.08, 0.25) * SAMPLE_RATE)
            formants = VOWELS[rng.integers(len(VOWELS))] * vtl * (1 + 0.05 * rng.standard_normal(4))
            vowels.append((t, length, formants, rng.uniform(-0.1, 0.2), rng.uniform(0.5, 1.0)))
            t += length
            if rng.random() < 0.2:  # fricative coda
                kind = rng.choice(["s", "sh", "f"])
                length = int(rng.uniform(0.05, 0.12) * SAMPLE_RATE)
                t -= int(0.01 * SAMPLE_RATE)
                noises.append((t, length, kind, rng.uniform(*FRICATIVES[kind][1])))
                t += length
            if t >= end:
                break
        if t >= end:
            break
        if rng.random() < 0.35:  # pause between words
            t += int(rng.uniform(0.08, 0.3) * SAMPLE_RATE)
    return vowels, noises


def _resonator_sos(freqs: np.ndarray, bws: np.ndarray) -> np.ndarray:
    """Two-pole resonators with unit gain at DC, one second-order section per formant.

    freqs, bws: (blocks, 4) -> sos (blocks, 4, 6).
    """
    r = np.exp(-np.pi * bws / SAMPLE_RATE)
    theta = 2 * np.pi * np.minimum(freqs, 0.45 * SAMPLE_RATE) / SAMPLE_RATE
    a1, a2 = -2 * r * np.cos(theta), r ** 2
    sos = np.zeros(freqs.shape + (6,))
    sos[..., 0] = 1 + a1 + a2
    sos[..., 3] = 1
    sos[..., 4] = a1
    sos[..., 5] = a2
    return sos


def synthesize_utterance(rng: np.random.Generator, duration: float) -> np.ndarray:
    """One speech-like utterance of ``duration`` seconds at 16 kHz, float32, peak 0.3-0.9."""
    n = round(duration * SAMPLE_RATE)
    n -= n % BLOCK
    blocks = n // BLOCK
    lead = int(rng.uniform(0.1, 0.35) * SAMPLE_RATE)
    tail = int(rng.uniform(0.1, 0.35) * SAMPLE_RATE)
    f0_base = rng.uniform(95, 210)
    tilt = rng.uniform(0.92, 0.97)
    vowels, noises = _plan(rng, n, lead, tail)

    # Control tracks at the block rate: voicing amplitude, pitch, formants (moving between the
    # vowels' targets, anchored at each vowel's centre).
    centres = np.array([(s + length / 2) / BLOCK for s, length, *_ in vowels])
    block_t = np.arange(blocks) + 0.5
    formants = np.stack([np.interp(block_t, centres, [v[2][k] for v in vowels])
                         for k in range(4)], axis=1)
    bw = BANDWIDTHS[:, 0] + (BANDWIDTHS[:, 1] - BANDWIDTHS[:, 0]) * rng.random(4)
    bws = np.broadcast_to(bw * (1 + 0.1 * np.sin(2 * np.pi * block_t[:, None] / 40.0)),
                          formants.shape)
    accent = np.interp(block_t, centres, [v[3] for v in vowels])
    declination = np.linspace(1.12, 0.85, blocks)
    slow = np.interp(block_t, np.linspace(0, blocks, 12), 1 + 0.03 * rng.standard_normal(12))
    f0_blocks = f0_base * declination * (1 + accent) * slow

    # Voiced source: sum of the harmonics below 7.6 kHz (Dirichlet kernel) at the moving pitch.
    t = np.arange(n) / SAMPLE_RATE
    f0 = np.interp(np.arange(n) / BLOCK, block_t, f0_blocks)
    f0 *= 1 + 0.01 * np.sin(2 * np.pi * 5.0 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    K = int(7600 // f0.max())
    half = np.sin(phase / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        source = np.where(np.abs(half) > 1e-9,
                          np.sin((K + 0.5) * phase) / (2 * half) - 0.5, float(K)) / K
    source = lfilter([1 - tilt], [1, -tilt], source)  # -6 dB/octave above ~100 Hz
    source = source + 0.02 * rng.standard_normal(n) * np.abs(source).max()
    voicing = np.zeros(n)
    for start, length, _, _, amp in vowels:
        stop = min(start + length, n)
        if stop > start:
            voicing[start:stop] += amp * _ramp(stop - start, int(0.02 * SAMPLE_RATE))
    source *= voicing

    # Time-varying formant cascade, one filter update per 5 ms block, state carried across blocks.
    sos = _resonator_sos(formants, bws)
    voiced = np.empty(n)
    zi = np.zeros((4, 2))
    for b in range(blocks):
        sl = slice(b * BLOCK, (b + 1) * BLOCK)
        voiced[sl], zi = sosfilt(sos[b], source[sl], zi=zi)
    wave = voiced / (np.abs(voiced).max() + 1e-12)

    # Noise-excited segments (fricatives, bursts), filtered once per segment.
    for start, length, kind, amp in noises:
        stop = min(start + length, n)
        if stop <= start:
            continue
        noise = rng.standard_normal(stop - start)
        if kind == "burst":
            noise = sosfilt(butter(2, 1500, btype="highpass", fs=SAMPLE_RATE, output="sos"), noise)
            env = np.exp(-np.arange(stop - start) / (0.004 * SAMPLE_RATE))
        else:
            noise = sosfilt(_fricative_sos(kind), noise)
            env = _ramp(stop - start, int(0.015 * SAMPLE_RATE))
        wave[start:stop] += amp * env * noise / (np.abs(noise).max() + 1e-12)

    wave *= rng.uniform(0.3, 0.9) / np.abs(wave).max()
    wave += 10 ** (NOISE_DBFS / 20) * rng.standard_normal(n)  # near-digital silence in pauses
    return wave.astype(np.float32)


@functools.cache
def _split_waves(split: str) -> tuple[tuple[str, np.ndarray], ...]:
    count, (lo, hi) = BUILTIN_SPLITS[split]
    out = []
    for i in range(count):
        rng = np.random.default_rng([SEED, _SPLIT_ID[split], i])
        wave = synthesize_utterance(rng, rng.uniform(lo, hi))
        wave.flags.writeable = False
        out.append((builtin_names(split)[i], wave))
    return tuple(out)


def builtin_names(split: str) -> list[str]:
    """Names of the utterances of a split, without synthesising them."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"the built-in corpus has splits {sorted(BUILTIN_SPLITS)}, not {split!r}")
    return [f"builtin/{split}/{split}-{i:03d}" for i in range(BUILTIN_SPLITS[split][0])]


def builtin_waves(split: str) -> list[tuple[str, np.ndarray]]:
    """``[(name, waveform)]`` of a split of the built-in corpus (read-only float32 arrays)."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"the built-in corpus has splits {sorted(BUILTIN_SPLITS)}, not {split!r}")
    return list(_split_waves(split))
