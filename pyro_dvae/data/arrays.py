"""Any sequence data as arrays: one ``.npz`` file with a train, a validation and a test split.

The format (``numpy.savez``; read with ``allow_pickle=False``, so it holds numbers only):

- ``train``, ``val``, ``test``: the observations x of each split, either

  * (N, T, F): N sequences of T steps with F features each, or
  * (sum_i T_i, F) with ``<split>_lengths`` (N,) integers: N variable-length sequences
    concatenated along time (sequence i is the next T_i rows), or
  * (N, T, F) with ``<split>_lengths``: padded sequences, sequence i being its first T_i steps
    (the steps after them are ignored, whatever they hold).

- ``<split>_u`` (optional, driven mode 4.1.1): the external input u_t, laid out like ``<split>``
  with U features instead of F; given for every split or for none.
- ``<split>_names`` (optional): (N,) strings naming the sequences (default ``"<split>[i]"``).

Any numeric dtype is accepted (bool, integers, floats) and stored as float32.  Every split must
have the same F (and U); a bad file stops with one :class:`~pyro_dvae.data.sequences.DataError`
line that names the array: a missing split, an unknown array, a wrong rank, mismatched features
between splits, NaN or infinite values in a real step, an empty split, or lengths that do not
fit.  Writing such a file::

    np.savez("mydata.npz", train=x_train, val=x_val, test=x_test)                 # (N, T, F) each
    np.savez("mydata.npz", train=np.concatenate(seqs), train_lengths=[len(s) for s in seqs], ...)

Training and validation sequences are cut into pieces of ``seq_len`` steps as audio is
(:func:`~pyro_dvae.data.sequences.make_sequences`), but every piece is kept, however short: each
step is data.  ``seq_len=None`` keeps every sequence whole.  :func:`load_array_sequences` gives
the whole sequences of a split (for evaluation).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .sequences import DataError, SequenceDataset, make_sequences

PathLike = str | os.PathLike

SPLITS = ("train", "val", "test")
SUFFIXES = ("lengths", "u", "names")
ARRAY_SUFFIX = ".npz"

__all__ = ["ArraySplit", "is_array_file", "load_array_sequences", "load_array_splits",
           "read_arrays"]


@dataclass
class ArraySplit:
    """The sequences of one split: ``x`` [(T_i, F)] float32 tensors, ``u`` [(T_i, U)] or None,
    ``names``."""

    x: list
    u: Optional[list]
    names: list

    @property
    def x_dim(self) -> int:
        return int(self.x[0].shape[1])

    @property
    def u_dim(self) -> int:
        return 0 if self.u is None else int(self.u[0].shape[1])


def is_array_file(data: Optional[PathLike]) -> bool:
    """Whether ``data`` names an array file (``.npz``) rather than an audio folder."""
    return data is not None and str(data).lower().endswith(ARRAY_SUFFIX)


def _where(path: Path, name: str) -> str:
    return f"{path}: array {name!r}"


def _numeric(path: Path, name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise DataError(f"{_where(path, name)} has dtype {a.dtype}; it must hold numbers "
                        "(bool, int or float)")
    return a


def _lengths(path: Path, name: str, a: np.ndarray, x: np.ndarray, x_name: str) -> np.ndarray:
    """The validated lengths of the sequences in ``x``."""
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise DataError(f"{_where(path, name)} must be a 1-d array of integers (one length per "
                        f"sequence), got shape {a.shape} dtype {a.dtype}")
    if a.size == 0:
        raise DataError(f"{_where(path, name)} is empty: the split {x_name!r} has no sequence")
    if (a < 1).any():
        i = int(np.argmax(a < 1))
        raise DataError(f"{_where(path, name)}: sequence {i} has length {int(a[i])}; every "
                        "length must be at least 1")
    if x.ndim == 2 and int(a.sum()) != x.shape[0]:
        raise DataError(f"{_where(path, name)} sums to {int(a.sum())} steps but {x_name!r} has "
                        f"{x.shape[0]} rows (concatenated sequences)")
    if x.ndim == 3:
        if a.size != x.shape[0]:
            raise DataError(f"{_where(path, name)} has {a.size} lengths but {x_name!r} holds "
                            f"{x.shape[0]} sequences")
        if int(a.max()) > x.shape[1]:
            i = int(np.argmax(a > x.shape[1]))
            raise DataError(f"{_where(path, name)}: sequence {i} has length {int(a[i])}, more "
                            f"than the {x.shape[1]} steps of {x_name!r}")
    return a.astype(np.int64)


def _split_sequences(path: Path, name: str, a: np.ndarray, lengths: Optional[np.ndarray],
                     what: str) -> list:
    """(T_i, D) float32 tensors of one array (x or u), checked for rank, size and finiteness."""
    a = _numeric(path, name, a)
    if a.ndim == 2 and lengths is None:
        raise DataError(f"{_where(path, name)} has shape {a.shape}: a 2-d array holds "
                        f"concatenated sequences and needs {name}_lengths; one sequence of T "
                        f"steps is (1, T, {what})")
    if a.ndim not in (2, 3):
        raise DataError(f"{_where(path, name)} has shape {a.shape}: it must be (N, T, {what}) "
                        f"or (sum of lengths, {what}) with lengths")
    if a.size == 0 or a.shape[-1] == 0:
        raise DataError(f"{_where(path, name)} is empty (shape {a.shape})")
    if a.ndim == 3:
        n, T = a.shape[:2]
        lens = np.full(n, T, dtype=np.int64) if lengths is None else lengths
        seqs = [a[i, :lens[i]] for i in range(n)]
    else:
        ends = np.cumsum(lengths)
        seqs = [a[e - k:e] for e, k in zip(ends, lengths)]
    for i, s in enumerate(seqs):
        bad = ~np.isfinite(s) if s.dtype.kind == "f" else None
        if bad is not None and bad.any():
            count = int(sum(int((~np.isfinite(q)).sum()) for q in seqs))
            step = int(np.argwhere(bad)[0][0])
            raise DataError(f"{_where(path, name)} holds {count} NaN or infinite values (the "
                            f"first in sequence {i}, step {step})")
    return [torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)) for s in seqs]


def read_arrays(path: PathLike) -> dict[str, ArraySplit]:
    """Every split of an array file, validated (module docstring); raises :class:`DataError`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} is not a readable .npz file ({type(err).__name__}: "
                        f"{' '.join(str(err).split()) or 'unreadable'})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive of named arrays "
                        "(train, val, test)")
    with npz:
        names = list(npz.files)
        known = set(SPLITS) | {f"{s}_{k}" for s in SPLITS for k in SUFFIXES}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(f"{path}: unknown array {unknown[0]!r}; an array file holds train, "
                            "val, test and, for each, optional <split>_lengths, <split>_u, "
                            "<split>_names")
        orphans = [n for n in names if "_" in n and n.split("_")[0] not in names]
        if orphans:
            raise DataError(f"{path}: array {orphans[0]!r} has no split "
                            f"{orphans[0].split('_')[0]!r} beside it")
        present = [s for s in SPLITS if s in names]
        if not present:
            raise DataError(f"{path} holds no split: it needs arrays train, val (and test)")
        with_u = [s for s in present if f"{s}_u" in names]
        if with_u and len(with_u) != len(present):
            missing = next(s for s in present if s not in with_u)
            raise DataError(f"{path}: array '{with_u[0]}_u' is given but '{missing}_u' is "
                            "missing (driven data needs u for every split)")

        def load(name):
            try:
                return npz[name]
            except ValueError as err:  # object arrays (pickles) are refused
                raise DataError(f"{_where(path, name)} cannot be read without pickle "
                                f"({' '.join(str(err).split())}); store numbers, and "
                                f"variable-length sequences concatenated with lengths") from None

        out = {}
        for split in present:
            x = load(split)
            lengths = None
            if f"{split}_lengths" in names:
                lengths = _lengths(path, f"{split}_lengths", load(f"{split}_lengths"), x, split)
            seqs = _split_sequences(path, split, x, lengths, "F")
            u = None
            if f"{split}_u" in names:
                ua = load(f"{split}_u")
                lead = x.shape[:-1]
                if ua.ndim != x.ndim or ua.shape[:-1] != lead:
                    raise DataError(f"{_where(path, split + '_u')} has shape {ua.shape}; it must "
                                    f"be laid out like {split!r} {x.shape}: "
                                    f"({', '.join(map(str, lead))}, U)")
                u = _split_sequences(path, f"{split}_u", ua, lengths, "U")
            seq_names = [f"{split}[{i}]" for i in range(len(seqs))]
            if f"{split}_names" in names:
                na = load(f"{split}_names")
                if na.ndim != 1 or na.dtype.kind not in "US" or na.size != len(seqs):
                    raise DataError(f"{_where(path, split + '_names')} must be {len(seqs)} "
                                    f"strings (one per sequence), got shape {na.shape} dtype "
                                    f"{na.dtype}")
                seq_names = [str(v.decode() if isinstance(v, bytes) else v) for v in na]
            out[split] = ArraySplit(seqs, u, seq_names)
    first = present[0]
    for split in present[1:]:
        for what, dim, suffix in (("features per step", "x_dim", ""), ("inputs per step",
                                                                        "u_dim", "_u")):
            a, b = getattr(out[first], dim), getattr(out[split], dim)
            if a != b:
                raise DataError(f"{_where(path, split + suffix)} has {b} {what}, "
                                f"{first + suffix!r} has {a}")
    return out


def _get(arrays: dict, path: PathLike, split: str) -> ArraySplit:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if split not in arrays:
        raise DataError(f"{path} has no array {split!r} (it holds "
                        f"{', '.join(s for s in SPLITS if s in arrays)})")
    return arrays[split]


def load_array_splits(path: PathLike, seq_len: Optional[int] = 150,
                      splits: str | Sequence[str] = ("train", "val")
                      ) -> dict[str, SequenceDataset]:
    """The splits of an array file as :class:`SequenceDataset` s of pieces of ``seq_len`` steps
    (every piece kept; ``None``: whole sequences)."""
    arrays = read_arrays(path)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    out = {}
    for split in splits:
        s = _get(arrays, path, split)
        out[split] = make_sequences(s.x, s.names, seq_len, min_frames=1, inputs=s.u)
    return out


def load_array_sequences(path: PathLike, split: str = "test") -> SequenceDataset:
    """The whole sequences of one split, padded to the longest (for evaluation)."""
    return load_array_splits(path, None, split)[split]
