"""Training sequences and test utterances: audio folders or the built-in corpus -> power spectrograms.

Pipeline for every utterance (13.2.1, SPEC section 4): :func:`~pyro_dvae.data.audio.load_audio`
(16 kHz mono), :func:`~pyro_dvae.data.audio.trim_silence` (leading/trailing silence, top_db 30 as in
the reference implementation), :func:`~pyro_dvae.data.audio.peak_normalize` (peak 1, as the reference
normalises its sequences and as the RMSE of 13.2.3 expects), then
:func:`~pyro_dvae.data.stft.power_spectrogram` (sine window 512, hop 256, 257 bins, power floored at
1e-10: see :mod:`pyro_dvae.data.stft`).

Cutting into training sequences of T = ``seq_len`` frames (the rule the README states):
an utterance of n frames gives the chunks ``[0, T), [T, 2T), ...``; every chunk, including a whole
utterance shorter than T and the final remainder of a longer one, is **kept if it has at least
``min_frames`` frames** (default 16, a quarter of a second), zero-padded at the end to T frames with
``mask`` False on the padding.  Nothing is dropped silently: shorter pieces are listed in
``dataset.dropped`` (and counted by ``repr(dataset)``) for the caller to report; no warning, since
they are an expected consequence of the rule, not a fault of the data.
Padding goes at the end so that, for causal generative models, the density of the real frames does
not depend on the padding (masked sites contribute nothing to the ELBO); a backward RNN in a guide
still reads the padded zeros.  (The reference instead drops every file shorter than T, 65 % of the
files of ``speech16k``.)

Data folders: ``DIR/train/``, ``DIR/val/``, ``DIR/test/`` or the WSJ0 layout ``DIR/si_tr_s/``,
``DIR/si_dt_05/``, ``DIR/si_et_05/``; audio files (.wav, .flac) are found recursively.  ``data=None``
is the built-in corpus (:mod:`pyro_dvae.data.corpus`).

Caching: the per-utterance power spectrograms of a split are stored in one file under ``cache_dir``,
``$PYRO_DVAE_CACHE`` or ``~/.cache/pyro-dvae`` (the data folder may be read-only), named by a hash
of the split folder's absolute path, every file's relative path, size and mtime, and the feature
parameters; written atomically and read with ``torch.load(weights_only=True)``.  A second call
recomputes no STFT; a changed, added or removed file changes the key.  Chunking into sequences is
done after loading, so any ``seq_len`` reuses the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from . import corpus
from .arrays import is_array_file, load_array_splits
from .audio import (
    AUDIO_EXTENSIONS,
    SILENCE_FLOOR_DB,
    TRIM_TOP_DB,
    AudioError,
    load_audio,
    peak_normalize,
    trim_silence,
)
from .sequences import MIN_FRAMES, DataError, SequenceDataset, make_sequences
from .stft import HOP, N_FFT, N_FREQ, POWER_FLOOR, SAMPLE_RATE, power_spectrogram

PathLike = str | os.PathLike

SPLITS = ("train", "val", "test")
WSJ0_FOLDERS = {"train": "si_tr_s", "val": "si_dt_05", "test": "si_et_05"}
#: part of the cache key; 2: silence trimmed with reflection padding (as the reference's librosa)
FEATURE_VERSION = 2
_SPHERE_EXTENSIONS = (".wv1", ".wv2", ".sph")

__all__ = [
    "MIN_FRAMES",
    "SPLITS",
    "WSJ0_FOLDERS",
    "DataError",
    "SequenceDataset",
    "Utterance",
    "cache_directory",
    "find_audio_files",
    "load_splits",
    "load_utterances",
    "make_sequences",
    "split_folder",
]


@dataclass
class Utterance:
    """One whole utterance for evaluation (13.2.1: test sequences of variable length).

    ``wave``: (L,) float32 numpy, 16 kHz, silence-trimmed and peak-normalised (the reference of
    RMSE/PESQ/STOI); ``power`` = x and ``phase``: (T, 257) float32 tensors with T = 1 + L // 256,
    so ``istft(spectrogram_from(power, phase), len(wave))`` gives ``wave`` back.
    """

    name: str
    wave: np.ndarray
    power: torch.Tensor
    phase: torch.Tensor

    @property
    def num_frames(self) -> int:
        return int(self.power.shape[0])

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE


# --------------------------------------------------------------------------- folders and files


def split_folder(root: PathLike, split: str) -> Path:
    """The folder of ``split`` under ``root``: ``root/split`` or its WSJ0 name (si_tr_s ...)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    plain = [s for s in SPLITS if s in subdirs]
    wsj0 = [s for s in SPLITS if WSJ0_FOLDERS[s] in subdirs]
    if plain:
        if split in subdirs:
            return subdirs[split]
        raise DataError(f"data folder {root} has no {split}/ subfolder "
                        f"(found {', '.join(s + '/' for s in plain)})")
    if wsj0:
        if WSJ0_FOLDERS[split] in subdirs:
            return subdirs[WSJ0_FOLDERS[split]]
        raise DataError(f"data folder {root} (WSJ0 layout) has no {WSJ0_FOLDERS[split]}/ "
                        f"subfolder for the {split} split")
    hint = ""
    direct = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS]
    if direct:
        hint = f"; it holds {len(direct)} audio files directly: move them into train/ val/ test/"
    raise DataError(f"data folder {root} needs train/ val/ test/ subfolders or a WSJ0 layout "
                    f"(si_tr_s/ si_dt_05/ si_et_05/){hint}")


def find_audio_files(folder: PathLike) -> list[Path]:
    """Audio files (.wav, .flac, any case) under ``folder``, recursively, sorted; hidden files
    (names starting with '.') are ignored.  Raises :class:`DataError` if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    files, sphere = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            ext = os.path.splitext(f)[1].lower()
            if ext in AUDIO_EXTENSIONS:
                files.append(Path(dirpath) / f)
            elif ext in _SPHERE_EXTENSIONS:
                sphere += 1
    if not files:
        hint = (f"; it holds {sphere} NIST SPHERE files (.wv1/.sph): convert them to .wav or "
                f".flac first (for example with sph2pipe)" if sphere else "")
        raise DataError(f"no audio files (.wav, .flac) found in {folder}{hint}")
    return sorted(files)


def cache_directory(cache_dir: PathLike | None = None) -> Path:
    """``cache_dir``, else ``$PYRO_DVAE_CACHE``, else ``$XDG_CACHE_HOME/pyro-dvae`` or
    ``~/.cache/pyro-dvae``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("PYRO_DVAE_CACHE"):
        return Path(os.environ["PYRO_DVAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro-dvae"


# --------------------------------------------------------------------------- features


def _features(wave: np.ndarray, name: str, top_db: float, trim_pad: str = "reflect"
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trimmed, peak-normalised float32 wave and its (power, phase); AudioError if silent."""
    wave = peak_normalize(trim_silence(np.asarray(wave, dtype=np.float32), top_db,
                                       SILENCE_FLOOR_DB, name=name, pad=trim_pad))
    power, phase = power_spectrogram(wave.astype(np.float64))
    return wave.astype(np.float32), power, phase


def _sources(data: PathLike | None, split: str):
    """(source id for the cache key, [(name, label, loader)]) of a split: ``name`` relative to the
    data folder, ``label`` (the full path) for messages, ``loader()`` returns a 16 kHz wave."""
    if data is None:
        if split not in corpus.BUILTIN_SPLITS:
            raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        source = {"builtin": corpus.CORPUS_VERSION, "seed": corpus.SEED,
                  "sizes": corpus.BUILTIN_SPLITS[split], "split": split}
        # synthesised on first use only: a cache hit needs no waveform
        return source, [(name, name, (lambda i=i: corpus.builtin_waves(split)[i][1]))
                        for i, name in enumerate(corpus.builtin_names(split))]
    root = Path(data).expanduser()
    folder = split_folder(root, split)
    files = find_audio_files(folder)
    absroot = root.resolve()
    entries = []
    for f in files:
        st = f.stat()
        entries.append([f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    source = {"folder": str(folder.resolve()), "root": str(absroot), "files": entries}
    return source, [(rel, str(f), (lambda f=f: load_audio(f)))
                    for (rel, _, _), f in zip(entries, files)]


def _compute_split(items, split: str, top_db: float, progress: bool):
    powers, names, skipped = [], [], []
    iterator = items
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(items, desc=f"features {split}", unit="file", leave=False)
    for name, label, load in iterator:
        try:
            _, power, _ = _features(load(), label, top_db)
        except AudioError as err:
            skipped.append(str(err))
            continue
        powers.append(torch.from_numpy(power))
        names.append(name)
    return powers, names, skipped


def _split_powers(data, split, cache_dir, top_db, progress):
    """Per-utterance power spectrograms of a split, from the cache when valid.

    Returns (powers [(T_i, F)], names, skipped-file messages, whether it came from the cache)."""
    source, items = _sources(data, split)
    params = {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop": HOP, "window": "sine",
              "power_floor": POWER_FLOOR, "top_db": float(top_db),
              "silence_floor_db": SILENCE_FLOOR_DB, "peak_normalize": True,
              "version": FEATURE_VERSION}
    key = json.dumps({"source": source, "params": params}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    cdir = cache_directory(cache_dir)
    path = cdir / f"{'builtin' if data is None else 'folder'}-{split}-{digest}.pt"

    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                lengths = blob["lengths"].tolist()
                powers = list(torch.split(blob["power"], lengths)) if lengths else []
                return powers, list(blob["names"]), list(blob["skipped"]), True
        except Exception as err:  # noqa: BLE001 (a damaged cache file is recomputed)
            warnings.warn(f"feature cache {path} is unreadable ({type(err).__name__}); "
                          f"recomputing it", stacklevel=3)

    powers, names, skipped = _compute_split(items, split, top_db, progress)
    blob = {"key": key, "names": names, "skipped": skipped,
            "lengths": torch.tensor([p.shape[0] for p in powers], dtype=torch.long),
            "power": (torch.cat(powers) if powers else torch.zeros(0, N_FREQ))}
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(blob, f))
    except OSError as err:
        warnings.warn(f"cannot write the feature cache in {cdir} ({err.strerror or err}); "
                      f"features will be recomputed next time", stacklevel=3)
    return powers, names, skipped, False


def _where(data, split):
    return f"the built-in corpus ({split})" if data is None else f"{split} data in {data}"


def load_splits(data: PathLike | None = None, seq_len: int = 150,
                splits: str | Sequence[str] = ("train", "val"),
                cache_dir: PathLike | None = None, *, min_frames: int = MIN_FRAMES,
                top_db: float = TRIM_TOP_DB, progress: bool = False
                ) -> dict[str, SequenceDataset]:
    """Training/validation sequences of power spectrograms, one :class:`SequenceDataset` per split.

    ``data``: None for the built-in corpus, or a folder with train/ val/ test/ (or si_tr_s/
    si_dt_05/ si_et_05/) subfolders.  ``seq_len``: T, frames per sequence (150 = 2.4 s).
    Unreadable, empty or silent files are skipped with a warning naming each (also when the
    features come from the cache); pieces shorter than ``min_frames`` are listed in
    ``dataset.dropped``.  Raises :class:`DataError` when a
    folder is missing, holds no audio, or nothing usable is left.

    An array file (``data`` ending in ``.npz``, :mod:`pyro_dvae.data.arrays`) gives its own
    sequences instead, cut into pieces of ``seq_len`` steps, every piece kept (``min_frames``,
    ``cache_dir``, ``top_db`` concern audio only).
    """
    if is_array_file(data):
        return load_array_splits(data, seq_len, splits)
    if isinstance(splits, str):
        splits = (splits,)
    out = {}
    for split in splits:
        powers, names, skipped, cached = _split_powers(data, split, cache_dir, top_db, progress)
        for message in skipped:  # also on a cache hit: the files are still bad
            warnings.warn(f"skipping {message}{' (cached result)' if cached else ''}",
                          stacklevel=2)
        ds = make_sequences(powers, names, seq_len, min_frames)
        if len(ds) == 0:
            n_bad = len(skipped)
            raise DataError(f"no usable audio in {_where(data, split)}: "
                            f"{len(powers)} readable files, {n_bad} skipped, none with "
                            f"{min(min_frames, seq_len)} frames or more after trimming silence")
        out[split] = ds
    return out


def load_utterances(data: PathLike | None = None, split: str = "test", *,
                    top_db: float = TRIM_TOP_DB, progress: bool = False,
                    trim_pad: str = "reflect") -> list[Utterance]:
    """Whole utterances of a split for evaluation (13.2.1): trimmed, peak-normalised waveform,
    power spectrogram and phase, variable length.  Not cached (the test split is small).
    ``trim_pad``: the padding of the trimming rule (:func:`~pyro_dvae.data.audio.trim_silence`)."""
    _, items = _sources(data, split)
    iterator = items
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(items, desc=f"utterances {split}", unit="file", leave=False)
    out = []
    for name, label, load in iterator:
        try:
            wave, power, phase = _features(load(), label, top_db, trim_pad)
        except AudioError as err:
            warnings.warn(f"skipping {err}", stacklevel=2)
            continue
        out.append(Utterance(name, wave, torch.from_numpy(power), torch.from_numpy(phase)))
    if not out:
        raise DataError(f"no usable audio in {_where(data, split)}: all {len(items)} files were "
                        f"skipped")
    return out
