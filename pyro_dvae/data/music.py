"""Bach chorales as binary piano rolls, from the corpus that ships with ``music21`` (no download).

A benchmark of the kind the DKF/DMM, STORN and VRNN papers report (test log-likelihood on
polyphonic music), built like the JSB Chorales data set of Boulanger-Lewandowski et al. (2012):

- **Chorales**: the distinct files of music21's Riemenschneider chorale list
  (``music21.corpus.chorales.Iterator``; 371 entries, 350 distinct files in music21 10.5), each
  score as encoded there: no repeats expanded, no transposition (the original keys).
- **Voices**: the parts whose names begin with Soprano, Alto, Tenor or Bass (the four voices; five
  in bwv27.6, which has two soprano parts); the instrumental parts that 19 of the scores add
  (horns, trumpets, timpani, violins, continuo, ...) are left out, as in JSB's four-part
  harmonisations.  A score without such names (three chorales with unnamed parts) keeps all.
- **Piano roll**: 88 keys, A0 (MIDI 21) to C8 (MIDI 108); one step per quarter note.  Step k is
  the instant ``phi + k`` quarter notes after the start of the score, where ``phi`` aligns the
  steps with the beats of the bar (the fractional part of a pickup bar's missing length); a key is
  on (1) when a note of that pitch sounds at that instant (``onset <= phi + k < onset +
  duration``), in any voice.  Grace notes (no duration) and rests leave no trace; a tied note is
  on for its whole length.  The sequence covers the score up to its last sounding instant.
- **Split**: fixed, by name: the chorales sorted by the SHA-256 of their corpus names
  (``bwv269``, ``bwv10.7``; a pseudo-random order that depends on nothing else), then the first
  60 % (rounded) are train, the next 20 % validation, the rest test (60/20/20 %, as JSB's
  229/76/77); 210/70/70 of the 350 chorales of music21 10.5.

:func:`bach_chorales` parses the corpus once (about a second per chorale) and caches the result
as an array file (:mod:`pyro_dvae.data.arrays` format: ``train``, ``train_lengths``,
``train_names``, ...) under the pyro-dvae cache folder, keyed by the music21 version and
:data:`VERSION`; ``python -m pyro_dvae.data.music [--out FILE.npz]`` writes it and prints its
statistics.  music21 is an optional extra: ``pip install -e ".[music]"``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import atomic_write

PathLike = str | os.PathLike

#: lowest and highest MIDI pitch of the roll: A0 and C8, the 88 keys of a piano
PITCH_LOW, PITCH_HIGH = 21, 108
N_KEYS = PITCH_HIGH - PITCH_LOW + 1
#: version of the conversion (part of the cache key: change it when the rule above changes)
VERSION = 3
SPLIT_PERCENT = {"train": 60, "val": 20, "test": 20}
_EPS = 1e-6  # offsets and durations are exact fractions of a quarter; float rounding only

__all__ = ["N_KEYS", "PITCH_HIGH", "PITCH_LOW", "MusicError", "bach_chorales", "chorale_files",
           "chorale_splits", "piano_roll", "roll_from_notes", "statistics", "voices"]


class MusicError(ValueError):
    """A score that cannot become a piano roll, or music21 missing (one line, for the CLI)."""


def roll_from_notes(notes: Iterable[tuple[int, float, float]], phase: float = 0.0,
                    end: Optional[float] = None) -> np.ndarray:
    """Binary piano roll (T, 88) uint8 of ``notes`` = (MIDI pitch, onset, duration), onsets and
    durations in quarter notes: key p is on at step k when a note of pitch p sounds at the instant
    ``phase + k`` (module docstring).  ``end`` (default: the last note's end) bounds the roll:
    T = the number of instants ``phase + k`` before it."""
    notes = [(int(p), float(o), float(d)) for p, o, d in notes]
    for p, o, d in notes:
        if not PITCH_LOW <= p <= PITCH_HIGH:
            raise MusicError(f"pitch {p} (MIDI) is outside the 88 keys A0-C8 "
                             f"({PITCH_LOW}-{PITCH_HIGH})")
        if d < 0 or not math.isfinite(o) or not math.isfinite(d):
            raise MusicError(f"note of pitch {p} has onset {o} and duration {d}")
    if end is None:
        end = max((o + d for _, o, d in notes), default=0.0)
    T = max(0, math.ceil(end - phase - _EPS))
    roll = np.zeros((T, N_KEYS), dtype=np.uint8)
    for p, o, d in notes:
        if d <= _EPS:
            continue  # a grace note does not sound at any sampling instant
        first = max(0, math.ceil(o - phase - _EPS))     # first instant at or after the onset
        stop = min(T, math.ceil(o + d - phase - _EPS))  # instants strictly before the end
        roll[first:stop, p - PITCH_LOW] = 1
    return roll


def _music21():
    try:
        import music21
    except ImportError:
        raise MusicError("the music data need music21: pip install -e \".[music]\" "
                         "(or pip install music21)") from None
    return music21


VOICES = ("soprano", "alto", "tenor", "bass")


def voices(score) -> list:
    """The vocal parts of a music21 score: those named Soprano..., Alto..., Tenor... or Bass...;
    all parts when none is so named (module docstring)."""
    parts = list(getattr(score, "parts", None) or [score])
    named = [p for p in parts
             if (getattr(p, "partName", None) or "").strip().lower().split(" ")[0] in VOICES]
    return named or parts


def piano_roll(score) -> np.ndarray:
    """The piano roll (T, 88) uint8 of a music21 score (module docstring's rule)."""
    parts = voices(score)
    notes = []
    for part in parts:
        for n in part.flatten().notes:
            onset, duration = float(n.offset), float(n.quarterLength)
            for pitch in n.pitches:
                notes.append((pitch.midi, onset, duration))
    phase = 0.0
    measures = parts[0].getElementsByClass("Measure")
    if len(measures):
        # steps on the beats: a pickup bar missing paddingLeft quarters starts phi into a beat
        phase = (-float(measures[0].paddingLeft or 0.0)) % 1.0
        if phase > 1 - _EPS:
            phase = 0.0
    return roll_from_notes(notes, phase)


def chorale_splits(names: Iterable[str]) -> dict[str, str]:
    """The fixed split ("train", "val" or "test") of each chorale name (module docstring's rule;
    the result does not depend on the order of ``names``)."""
    order = sorted(set(names), key=lambda n: (hashlib.sha256(n.encode()).hexdigest(), n))
    n_train = round(len(order) * SPLIT_PERCENT["train"] / 100)
    n_val = round(len(order) * (SPLIT_PERCENT["train"] + SPLIT_PERCENT["val"]) / 100) - n_train
    return {name: ("train" if i < n_train else "val" if i < n_train + n_val else "test")
            for i, name in enumerate(order)}


def chorale_files() -> list[str]:
    """The distinct corpus paths of music21's Riemenschneider chorales, sorted."""
    music21 = _music21()
    return sorted(set(music21.corpus.chorales.Iterator(returnType="filename")))


def _convert(progress: bool) -> dict[str, np.ndarray]:
    music21 = _music21()
    rolls = {s: [] for s in SPLIT_PERCENT}
    names = {s: [] for s in SPLIT_PERCENT}
    files = chorale_files()
    splits = chorale_splits(Path(f).name for f in files)
    if progress:
        from tqdm.auto import tqdm
        files = tqdm(files, desc="chorales", unit="score", leave=False)
    for path in files:
        name = Path(path).name
        roll = piano_roll(music21.corpus.parse(path))
        if len(roll) == 0:
            raise MusicError(f"chorale {path} has no note")
        split = splits[name]
        rolls[split].append(roll)
        names[split].append(name)
    out = {}
    for split in SPLIT_PERCENT:
        out[split] = np.concatenate(rolls[split]).astype(np.uint8)
        out[f"{split}_lengths"] = np.array([len(r) for r in rolls[split]], dtype=np.int64)
        out[f"{split}_names"] = np.array(names[split])
    return out


def bach_chorales(cache_dir: Optional[PathLike] = None, refresh: bool = False,
                  progress: bool = False) -> Path:
    """Path of the Bach chorale piano rolls as an array file, converted on first use and cached
    (``cache_dir``, else the pyro-dvae cache folder, ``$PYRO_DVAE_CACHE`` or
    ``~/.cache/pyro-dvae``); ``refresh`` converts again."""
    from .datasets import cache_directory

    music21 = _music21()
    folder = cache_directory(cache_dir) / "music"
    path = folder / f"bach-chorales-music21-{music21.__version__}-v{VERSION}.npz"
    if path.is_file() and not refresh:
        return path
    arrays = _convert(progress)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def statistics(path: PathLike) -> dict:
    """Per split: number of sequences, their lengths (min, mean, max, total steps) and the mean
    number of active keys per step, of an array file of piano rolls."""
    from .arrays import read_arrays

    out = {}
    for split, s in read_arrays(path).items():
        lengths = np.array([len(x) for x in s.x])
        active = float(sum(float(x.sum()) for x in s.x) / lengths.sum())
        out[split] = {"sequences": len(s.x), "steps": int(lengths.sum()),
                      "min_length": int(lengths.min()), "mean_length": float(lengths.mean()),
                      "max_length": int(lengths.max()), "mean_active_keys": active}
    return out


def main(argv=None) -> int:
    """``python -m pyro_dvae.data.music``: convert (or find in the cache) the chorales, copy
    them to ``--out`` if given, print the path and the statistics of each split."""
    parser = argparse.ArgumentParser(prog="python -m pyro_dvae.data.music",
                                     description="Bach chorales from music21's corpus as binary "
                                                 "piano rolls (88 keys, quarter-note steps), "
                                                 "written as a pyro-dvae array file.")
    parser.add_argument("--out", metavar="FILE.npz", help="copy the array file here")
    parser.add_argument("--refresh", action="store_true", help="convert again, ignoring the "
                                                                "cache")
    parser.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: pyro-dvae's)")
    args = parser.parse_args(argv)
    try:
        path = bach_chorales(args.cache_dir, refresh=args.refresh, progress=True)
        if args.out:
            out = Path(args.out)
            if out.suffix.lower() != ".npz":
                raise MusicError(f"--out {out}: the file name must end in .npz")
            with open(path, "rb") as src:
                atomic_write(out, lambda f: shutil.copyfileobj(src, f))
            path = out
    except (MusicError, OSError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    print(path)
    for split, s in statistics(path).items():
        print(f"{split}: {s['sequences']} chorales, {s['steps']} steps (length "
              f"{s['min_length']}-{s['max_length']}, mean {s['mean_length']:.1f}), "
              f"{s['mean_active_keys']:.2f} active keys per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
