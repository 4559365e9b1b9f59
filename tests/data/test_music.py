"""Bach chorales as piano rolls (pyro_dvae.data.music): the conversion rule on hand-made notes
and a tiny music21 score, the fixed split, the cache and the command; the real corpus is slow."""

import numpy as np
import pytest

from pyro_dvae.data import music
from pyro_dvae.data.arrays import read_arrays
from pyro_dvae.data.music import N_KEYS, PITCH_LOW, MusicError, roll_from_notes


def _keys(roll):
    """The MIDI pitches that are on at each step."""
    return [sorted(int(k) + PITCH_LOW for k in np.flatnonzero(step)) for step in roll]


def test_roll_samples_the_sounding_notes_at_each_quarter():
    notes = [(60, 0, 1), (64, 0, 2), (67, 1.5, 1), (72, 2, 0), (48, 3, 0.5), (108, 0.25, 0.5)]
    roll = roll_from_notes(notes)
    assert roll.shape == (4, N_KEYS) and roll.dtype == np.uint8
    # t = 0: C4 and E4; t = 1: E4 (C4 ended at 1); t = 2: G4 (1.5-2.5), E4 ended, the grace
    # note C5 never sounds; t = 3: C3; C8 (0.25-0.75) falls between two instants
    assert _keys(roll) == [[60, 64], [64], [67], [48]]
    # instants 0.5, 1.5, 2.5 (a pickup half a beat long)
    assert _keys(roll_from_notes(notes, phase=0.5)) == [[60, 64, 108], [64, 67], []]
    assert roll_from_notes(notes, end=6).shape == (6, N_KEYS)
    assert roll_from_notes([]).shape == (0, N_KEYS)
    # a tie is two notes back to back: one long note, on at every instant it covers
    assert _keys(roll_from_notes([(62, 0, 1.5), (62, 1.5, 1.5)])) == [[62]] * 3


def test_roll_refuses_what_it_cannot_draw():
    with pytest.raises(MusicError, match=r"pitch 20 \(MIDI\) is outside the 88 keys A0-C8"):
        roll_from_notes([(20, 0, 1)])
    with pytest.raises(MusicError, match="pitch 109"):
        roll_from_notes([(109, 0, 1)])
    with pytest.raises(MusicError, match="duration -1"):
        roll_from_notes([(60, 0, -1)])


def test_piano_roll_of_a_tiny_score():
    m21 = pytest.importorskip("music21")
    from music21 import chord, meter, note, stream

    score = stream.Score()
    for pitches in (["E5", "D5", "C5"], ["C4", "B3", "A3"]):  # soprano, bass of a 3/4 pickup
        part = stream.Part()
        pickup = stream.Measure(number=0)
        pickup.append(meter.TimeSignature("3/4"))
        pickup.append(note.Note(pitches[0], quarterLength=0.5))  # an eighth pickup
        pickup.paddingLeft = 2.5
        bar = stream.Measure(number=1)
        bar.append(note.Note(pitches[1], quarterLength=2))
        bar.append(note.Rest(quarterLength=0.5))
        bar.append(note.Note(pitches[2], quarterLength=0.5))
        part.append([pickup, bar])
        score.insert(0, part)
    roll = music.piano_roll(score)
    # the pickup eighth sits half a beat before the downbeat: the instants are 0.5 (downbeat),
    # 1.5, 2.5 after the start; the notes of the downbeat last two beats, then a rest and an
    # off-beat eighth that no instant hits
    assert _keys(roll) == [[59, 74], [59, 74], []]
    # one part from music21's parser, no pickup: the instants are the beats 0, 1, 2, 3, 4
    tiny = m21.converter.parse("tinyNotation: 4/4 c4 e4 g4 c'2")
    assert _keys(music.piano_roll(tiny)) == [[60], [64], [67], [72], [72]]
    one = stream.Score([stream.Part([stream.Measure([chord.Chord(["C4", "E4", "G4"],
                                                                 quarterLength=2)])])])
    assert _keys(music.piano_roll(one)) == [[60, 64, 67]] * 2


def test_only_the_voices_are_drawn():
    pytest.importorskip("music21")
    from music21 import note, stream

    def part(name, pitch):
        p = stream.Part([stream.Measure([note.Note(pitch, quarterLength=1)])])
        p.partName = name
        return p

    score = stream.Score()
    for name, pitch in (("Violin 1", "A5"), ("Soprano", "G4"), ("Alto", "E4"), ("Tenor", "C4"),
                        ("Bass Continuo", "C3"), ("Timpani", "G2")):
        score.insert(0, part(name, pitch))
    assert [p.partName for p in music.voices(score)] == ["Soprano", "Alto", "Tenor",
                                                         "Bass Continuo"]
    assert _keys(music.piano_roll(score)) == [[48, 60, 64, 67]]
    unnamed = stream.Score()
    for pitch in ("G4", "C4"):
        unnamed.insert(0, part("", pitch))
    assert _keys(music.piano_roll(unnamed)) == [[60, 67]]  # no voice names: every part


def test_fixed_split_by_name():
    import hashlib

    names = [f"bwv{i}.{j}" for i in range(1, 120) for j in range(1, 4)]  # 357 names
    splits = music.chorale_splits(names)
    assert splits == music.chorale_splits(list(reversed(names)))  # order does not matter
    counts = {s: list(splits.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 214, "val": 72, "test": 71}  # round(0.6 n), round(0.8 n) - that
    # the documented rule, by hand: the first 60 % in the order of the names' SHA-256
    order = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert {n for n in order[:214]} == {n for n, s in splits.items() if s == "train"}
    assert {n for n in order[286:]} == {n for n, s in splits.items() if s == "test"}


def _fake_convert(calls):
    def convert(progress):
        calls.append(progress)
        rng = np.random.default_rng(0)
        out = {}
        for split, lengths in (("train", [4, 6]), ("val", [3]), ("test", [5, 2])):
            out[split] = (rng.random((sum(lengths), N_KEYS)) < 0.05).astype(np.uint8)
            out[f"{split}_lengths"] = np.array(lengths)
            out[f"{split}_names"] = np.array([f"{split}{i}" for i in range(len(lengths))])
        return out
    return convert


def test_cache_and_command(tmp_path, monkeypatch, capsys):
    m21 = pytest.importorskip("music21")
    calls = []
    monkeypatch.setattr(music, "_convert", _fake_convert(calls))
    path = music.bach_chorales(tmp_path / "cache")
    assert path.name == f"bach-chorales-music21-{m21.__version__}-v{music.VERSION}.npz"
    assert path.parent == tmp_path / "cache" / "music" and len(calls) == 1
    assert music.bach_chorales(tmp_path / "cache") == path and len(calls) == 1  # cached
    music.bach_chorales(tmp_path / "cache", refresh=True)
    assert len(calls) == 2
    data = read_arrays(path)
    assert [len(data[s].x) for s in ("train", "val", "test")] == [2, 1, 2]
    assert data["test"].names == ["test0", "test1"]
    stats = music.statistics(path)
    assert stats["train"]["steps"] == 10 and stats["test"]["max_length"] == 5
    roll = np.load(path)["val"]
    assert stats["val"]["mean_active_keys"] == pytest.approx(roll.sum() / 3)
    out = tmp_path / "rolls.npz"
    assert music.main(["--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "train: 2 chorales, 10 steps (length 4-6, mean 5.0)" in printed
    assert np.array_equal(np.load(out)["train"], np.load(path)["train"])
    assert music.main(["--out", str(tmp_path / "rolls.txt"),
                       "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "must end in .npz" in capsys.readouterr().err
    assert len(calls) == 2


@pytest.mark.slow
def test_real_corpus(tmp_path):
    """The whole conversion on music21's corpus (about 3 minutes): sizes, binary rolls, voices."""
    pytest.importorskip("music21")
    path = music.bach_chorales(tmp_path)
    stats = music.statistics(path)
    sizes = {s: stats[s]["sequences"] for s in ("train", "val", "test")}
    assert sum(sizes.values()) == len(music.chorale_files()) == 350
    assert sizes == {"train": 210, "val": 70, "test": 70}
    data = read_arrays(path)
    splits = music.chorale_splits(n for s in data.values() for n in s.names)
    for split in sizes:
        x = np.concatenate([s.numpy() for s in data[split].x])
        assert set(np.unique(x)) <= {0.0, 1.0}
        # four voices, sometimes in unison or resting: between 3.5 and 4 keys per step
        assert 3.5 < stats[split]["mean_active_keys"] < 4.0
        assert all(splits[n] == split for n in data[split].names)
    assert np.array_equal(np.load(path)["train"], np.load(music.bach_chorales(tmp_path))["train"])
