"""Sequences, masks, folder layouts, the feature cache and every DataError case."""

import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from pyro_dvae.data import (
    HOP,
    DataError,
    SequenceDataset,
    istft,
    load_splits,
    load_utterances,
    make_sequences,
    num_frames,
    spectrogram_from,
)
from pyro_dvae.data import datasets as datasets_mod

from .conftest import SPEECH16K, tone, write


def utterance(n, F=257, seed=0):
    return torch.rand(n, F, generator=torch.Generator().manual_seed(seed)) + 0.1


def test_make_sequences_rule():
    powers = [utterance(40, seed=1), utterance(150, seed=2), utterance(310, seed=3),
              utterance(5, seed=4), utterance(166, seed=5)]
    names = ["a", "b", "c", "d", "e"]
    ds = make_sequences(powers, names, seq_len=150, min_frames=16)
    assert isinstance(ds, SequenceDataset)
    # a: 40 (padded); b: 150; c: 150 + 150 + 10 (dropped); d: 5 (dropped); e: 150 + 16 (padded)
    assert ds.names == ["a", "b", "c", "c", "e", "e"]
    assert ds.offsets.tolist() == [0, 0, 0, 150, 0, 150]
    assert ds.mask.sum(1).tolist() == [40, 150, 150, 150, 150, 16]
    assert ds.dropped == ["c (last 10 of 310 frames)", "d (5 frames)"]
    assert ds.num_frames == 40 + 4 * 150 + 16 and len(ds) == 6
    assert torch.equal(ds.x[0, :40], powers[0]) and (ds.x[0, 40:] == 0).all()
    assert torch.equal(ds.x[3], powers[2][150:300])
    assert torch.equal(ds.x[5, :16], powers[4][150:])
    x, mask = ds[5]
    assert x.shape == (150, 257) and mask.dtype == torch.bool
    # with min_frames 1 nothing is left out; a seq_len below min_frames keeps every full sequence
    assert make_sequences(powers, names, 150, 1).num_frames == sum(len(p) for p in powers)
    short = make_sequences(powers, names, 4, 16)
    assert short.mask.all() and short.dropped == [
        "b (last 2 of 150 frames)", "c (last 2 of 310 frames)", "d (last 1 of 5 frames)",
        "e (last 2 of 166 frames)"]


def test_folder_with_short_utterances(make_folder, tmp_path):
    root = make_folder({"train/long.wav": 5.0, "train/sub/short.wav": 0.8,
                        "val/v.flac": 1.0, "test/t.wav": 2.0})
    write(root / "train" / "tiny.wav", tone(0.1, lead=0, tail=0))  # 1600 samples, 8 frames
    data = load_splits(root, seq_len=150, cache_dir=tmp_path / "cache")
    train, val = data["train"], data["val"]
    assert set(data) == {"train", "val"}
    # 5 s -> ~313 frames -> 150 + 150 + remainder; 0.8 s -> ~50 frames, kept with a mask
    assert train.names.count("train/long.wav") == 3
    assert train.names.count("train/sub/short.wav") == 1
    i = train.names.index("train/sub/short.wav")
    assert 50 <= int(train.mask[i].sum()) <= 62 and not train.mask[i, -1]  # + trimming slack
    assert "train/tiny.wav" not in train.names  # fewer than 16 frames
    assert train.dropped == ["train/tiny.wav (8 frames)"]
    assert len(val) == 1 and val.mask[0].sum() < 150
    assert train.x.dtype == torch.float32 and train.x.shape[1:] == (150, 257)


def test_wsj0_layout(tmp_path, make_folder):
    root = make_folder({"si_tr_s/011/011a0101.wav": 1.0, "si_tr_s/012/012c0201.wav": 2.0,
                        "si_dt_05/050/050a0501.wav": 1.0, "si_et_05/440/440c0201.wav": 1.5})
    data = load_splits(root, splits=("train", "val", "test"), cache_dir=tmp_path / "c")
    assert sorted(set(data["train"].names)) == ["si_tr_s/011/011a0101.wav",
                                                 "si_tr_s/012/012c0201.wav"]
    assert data["val"].names == ["si_dt_05/050/050a0501.wav"]
    [utt] = load_utterances(root, "test")
    assert utt.name == "si_et_05/440/440c0201.wav"


def test_cache_hit_does_not_recompute(make_folder, tmp_path, monkeypatch):
    root = make_folder({"train/a.wav": 1.0, "train/b.wav": 2.0, "val/c.wav": 1.0})
    calls = []
    real = datasets_mod.power_spectrogram

    def counting(wave, *args, **kwargs):
        calls.append(len(wave))
        return real(wave, *args, **kwargs)

    monkeypatch.setattr(datasets_mod, "power_spectrogram", counting)
    cache = tmp_path / "cache"
    first = load_splits(root, cache_dir=cache)
    assert len(calls) == 3
    second = load_splits(root, cache_dir=cache)
    assert len(calls) == 3  # nothing recomputed
    assert torch.equal(first["train"].x, second["train"].x)
    assert torch.equal(first["train"].mask, second["train"].mask)
    assert load_splits(root, seq_len=40, cache_dir=cache)["train"].x.shape[1] == 40
    assert len(calls) == 3  # another seq_len reuses the cached spectrograms
    for f in cache.iterdir():  # cache files are plain tensors and strings
        blob = torch.load(f, weights_only=True)
        assert set(blob) == {"key", "names", "skipped", "lengths", "power"}
    # a changed file invalidates its split only
    write(root / "train" / "b.wav", tone(1.5))
    load_splits(root, cache_dir=cache)
    assert len(calls) == 5
    # another trimming threshold is another key
    load_splits(root, splits="val", cache_dir=cache, top_db=40)
    assert len(calls) == 6


def test_cache_location_from_environment(make_folder, tmp_path, monkeypatch):
    root = make_folder({"train/a.wav": 1.0})
    monkeypatch.setenv("PYRO_DVAE_CACHE", str(tmp_path / "envcache"))
    load_splits(root, splits="train")
    assert len(list((tmp_path / "envcache").glob("folder-train-*.pt"))) == 1
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "envcache").iterdir())


def test_cache_damaged_or_unwritable(make_folder, tmp_path):
    root = make_folder({"train/a.wav": 1.0})
    cache = tmp_path / "cache"
    load_splits(root, splits="train", cache_dir=cache)
    [f] = cache.iterdir()
    f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        ds = load_splits(root, splits="train", cache_dir=cache)["train"]
    assert len(ds) == 1
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="cannot write the feature cache"):
        assert len(load_splits(root, splits="train", cache_dir=blocker)["train"]) == 1


def test_corrupt_file_is_skipped_with_a_warning(make_folder, tmp_path):
    root = make_folder({"train/good.wav": 1.0, "val/v.wav": 1.0})
    (root / "train" / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    write(root / "train" / "silent.wav", np.zeros(8000))
    cache = tmp_path / "cache"
    for _ in range(2):  # computed, then from the cache: the warning is repeated
        with pytest.warns(UserWarning) as record:
            data = load_splits(root, cache_dir=cache)
        messages = [str(w.message) for w in record]
        assert any("bad.wav" in m and "cannot read" in m for m in messages)
        assert any("silent.wav" in m and "silence only" in m for m in messages)
        assert data["train"].names == ["train/good.wav"]
    with pytest.warns(UserWarning) as record:
        utts = load_utterances(root, "train")
    assert sorted(str(w.message).split(":")[0] for w in record) == [
        f"skipping {root / 'train' / 'bad.wav'}", f"skipping {root / 'train' / 'silent.wav'}"]
    assert [u.name for u in utts] == ["train/good.wav"]


def test_data_errors(tmp_path, make_folder):
    def fails(match, *args, **kwargs):
        with pytest.raises(DataError, match=match) as info:
            load_splits(*args, cache_dir=tmp_path / "cache", **kwargs)
        assert "\n" not in str(info.value)

    fails("does not exist", tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x")
    fails("not a folder", tmp_path / "afile")
    flat = tmp_path / "flat"
    write(flat / "a.wav", tone(1.0))
    fails("train/ val/ test/ subfolders.*1 audio files directly", flat)
    only_train = make_folder({"train/a.wav": 1.0}, root=tmp_path / "only_train")
    fails("no val/ subfolder", only_train)
    wsj = make_folder({"si_tr_s/a.wav": 1.0}, root=tmp_path / "wsj")
    fails("WSJ0 layout.*si_dt_05", wsj)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    (empty / "train" / "readme.txt").write_text("no audio here")
    fails("no audio files", empty)
    sphere = tmp_path / "sphere"
    (sphere / "si_tr_s").mkdir(parents=True)
    (sphere / "si_tr_s" / "a.wv1").write_bytes(b"NIST_1A")
    fails("NIST SPHERE", sphere, splits="train")
    fails("unknown split", sphere, splits="dev")
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "train" / "x.wav").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="x.wav"):
        fails("no usable audio", broken, splits="train")
    short = make_folder({"train/a.wav": 0.1}, root=tmp_path / "short")
    fails("none with 16 frames", short, splits="train")
    with pytest.raises(DataError, match="seq_len"):
        load_splits(None, seq_len=0, cache_dir=tmp_path / "cache")


def test_utterances_for_evaluation(make_folder):
    root = make_folder({"train/a.wav": 1.0, "val/b.wav": 1.0, "test/c.wav": 1.7,
                        "test/d.wav": 0.3})
    utts = load_utterances(root)  # test split by default
    assert [u.name for u in utts] == ["test/c.wav", "test/d.wav"]
    for u in utts:
        assert u.wave.dtype == np.float32 and abs(np.abs(u.wave).max() - 1) < 1e-6
        assert u.power.shape == (num_frames(len(u.wave)), 257) and u.phase.shape == u.power.shape
        assert u.sample_rate == 16000
        back = istft(spectrogram_from(u.power.double(), u.phase.double()), len(u.wave))
        assert (back - torch.from_numpy(u.wave).double()).abs().max() < 1e-5
    # trimmed: 1.7 s of tone (+0.4 s of near-silence around it) comes back close to 1.7 s
    assert 1.7 <= len(utts[0].wave) / 16000 <= 1.7 + 2 * 1536 / 16000  # frame resolution


def test_real_speech_folder(speech_files, tmp_path):
    """A few real files in a train/ val/ test/ tree (symlinks): features, masks, trimming."""
    root = tmp_path / "speech"
    for split, path in zip(("train", "train", "val", "test"), speech_files):
        (root / split).mkdir(parents=True, exist_ok=True)
        os.symlink(path, root / split / path.name)
    data = load_splits(root, cache_dir=tmp_path / "cache")
    for ds in data.values():
        assert (ds.x[ds.mask] >= 1e-10).all() and torch.isfinite(ds.x).all()
        assert (ds.x[~ds.mask] == 0).all()
    [utt] = load_utterances(root, "test")
    assert len(utt.wave) < len(__import__("soundfile").read(speech_files[3])[0])  # trimmed
    assert utt.power.shape[0] == 1 + -(-len(utt.wave) // HOP)


@pytest.mark.slow
def test_full_speech16k(tmp_path):
    """All of speech16k train + val: every file usable, the documented counts."""
    if not SPEECH16K.is_dir():
        pytest.skip("speech16k not available")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_splits(SPEECH16K, cache_dir=tmp_path)
    assert len(set(data["train"].names)) == 1319 and len(set(data["val"].names)) == 146
    for ds in data.values():
        assert torch.isfinite(ds.x).all() and (ds.x[ds.mask] > 0).all()
        assert len(ds.dropped) < 0.1 * len(ds)
    shutil.rmtree(tmp_path)
