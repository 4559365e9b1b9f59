"""Fixtures for the data-pipeline tests: real speech files and small audio folders in tmp_path."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SPEECH16K = Path("/work/shared/data/speech16k")


@pytest.fixture
def speech_files():
    """A few real 16 kHz recordings of different lengths (skipped where the corpus is absent)."""
    folder = SPEECH16K / "val"
    if not folder.is_dir():
        pytest.skip(f"real speech corpus not available at {SPEECH16K}")
    files = sorted(folder.glob("*.flac"))
    return [files[i] for i in (0, 3, 50, 100)]


def tone(seconds, sr=16000, freq=220.0, amp=0.5, lead=0.2, tail=0.2):
    """A harmonic tone with `lead`/`tail` seconds of near-silence (-100 dBFS noise) around it."""
    rng = np.random.default_rng(int(seconds * 1000) + int(freq))
    t = np.arange(int(seconds * sr)) / sr
    body = amp * sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, 6)) / 2
    silence = lambda s: 1e-5 * rng.standard_normal(int(s * sr))
    return np.concatenate([silence(lead), body, silence(tail)]).astype(np.float32)


def write(path, wave, sr=16000, subtype=None):
    """Write a test file: float wav (exact) or 16-bit flac."""
    path = Path(path)
    subtype = subtype or ("PCM_16" if path.suffix == ".flac" else "FLOAT")
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, sr, subtype=subtype)
    return path


@pytest.fixture
def make_folder(tmp_path):
    """make_folder({"train/a.wav": seconds, ...}) writes tones of those (speech) durations."""

    def make(spec, root=None):
        root = Path(root or tmp_path / "data")
        for i, (rel, seconds) in enumerate(spec.items()):
            write(root / rel, tone(seconds, freq=150.0 + 10 * i))
        return root

    return make
