"""The built-in speech-like corpus: deterministic, the documented sizes, speech-like content."""

import numpy as np
import torch

from pyro_dvae.data import (
    BUILTIN_SPLITS,
    SAMPLE_RATE,
    builtin_waves,
    load_splits,
    load_utterances,
    power_spectrogram,
    synthesize_utterance,
)
from pyro_dvae.data import corpus as corpus_mod


def test_deterministic():
    first = [(n, w.copy()) for n, w in builtin_waves("val")]
    corpus_mod._split_waves.cache_clear()
    second = builtin_waves("val")
    assert [n for n, _ in first] == [n for n, _ in second]
    for (_, a), (_, b) in zip(first, second):
        np.testing.assert_array_equal(a, b)
    a = synthesize_utterance(np.random.default_rng(5), 1.0)
    b = synthesize_utterance(np.random.default_rng(5), 1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, synthesize_utterance(np.random.default_rng(6), 1.0))


def test_split_sizes_and_waveforms():
    for split, (count, (lo, hi)) in BUILTIN_SPLITS.items():
        waves = builtin_waves(split)
        assert len(waves) == count
        assert len({n for n, _ in waves}) == count
        for name, wave in waves:
            assert name.startswith(f"builtin/{split}/")
            assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all()
            assert lo - 0.01 <= len(wave) / SAMPLE_RATE <= hi + 0.01
            assert 0.3 <= np.abs(wave).max() <= 0.91
            assert not wave.flags.writeable


def test_speech_like_content():
    """Voiced frames (energy below 1 kHz, harmonic peaks), fricative frames (energy above 3 kHz)
    and pauses near -100 dBFS all occur; the pitch moves."""
    voiced = fricative = pause = 0
    pitches = []
    for _, wave in builtin_waves("val"):
        power, _ = power_spectrogram(wave.astype(np.float64))
        total = power.sum(1)
        low, high = power[:, :32].sum(1) / total, power[:, 96:].sum(1) / total  # 1 kHz, 3 kHz
        loud = total > 1e-3 * total.max()
        voiced += int((loud & (low > 0.7)).sum())
        fricative += int((loud & (high > 0.5)).sum())
        # one-sided Parseval with the window energy 256: total = 256 * 256 * mean square
        pause += int((10 * np.log10(total / 256**2) < -90).sum())  # frames below -90 dBFS
        for frame in power[loud & (low > 0.7)]:
            pitches.append(np.argmax(frame[2:20]) + 2)  # strongest low harmonic bin
    assert voiced > 100 and fricative > 20 and pause > 20
    assert len(set(pitches)) > 5


def test_builtin_datasets(tmp_path):
    data = load_splits(None, cache_dir=tmp_path)
    train, val = data["train"], data["val"]
    assert train.x.shape[1:] == (150, 257) and val.x.shape[1:] == (150, 257)
    assert 90 <= len(train) <= 110 and 15 <= len(val) <= 25
    assert train.x.dtype == torch.float32 and train.mask.dtype == torch.bool
    assert train.mask.any(1).all() and (~train.mask).any()  # some padding, no empty sequence
    assert (train.x[~train.mask] == 0).all() and (train.x[train.mask] > 0).all()
    assert train.names[0] == "builtin/train/train-000"
    corpus_mod._split_waves.cache_clear()
    again = load_splits(None, splits="train", cache_dir=tmp_path)["train"]  # from the cache
    assert corpus_mod._split_waves.cache_info().currsize == 0  # nothing synthesised
    assert torch.equal(again.x, train.x)
    utterances = load_utterances(None, "test")
    assert len(utterances) == BUILTIN_SPLITS["test"][0]
    assert len({u.num_frames for u in utterances}) == len(utterances)  # variable length
