"""Padded, masked batches of sequences: the form every data source (audio, arrays) is turned into.

:class:`SequenceDataset` holds N sequences of T steps padded at the end, ``x`` (N, T, F), a ``mask``
(N, T) that is False on the padding and, in driven mode (4.1.1), the external input ``u``
(N, T, U).  :func:`make_sequences` cuts variable-length sequences (T_i, F) into such pieces of
``seq_len`` steps: ``[0, T), [T, 2T), ...``, each zero-padded at the end to T steps; a piece with
fewer than ``min_frames`` steps is left out and listed in ``dataset.dropped``.  With
``seq_len=None`` every sequence stays whole, padded to the longest.

Padding goes at the end so that, for causal generative models, the density of the real frames does
not depend on it (masked sites contribute nothing to the ELBO; see
:meth:`pyro_dvae.DVAE.prepare_inputs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch.utils.data import Dataset

#: shortest piece that make_sequences keeps by default (16 frames: a quarter of a second of speech)
MIN_FRAMES = 16

__all__ = ["MIN_FRAMES", "DataError", "SequenceDataset", "make_sequences"]


class DataError(ValueError):
    """Data that cannot give a data set: a bad folder or file (one-line message, for the CLI)."""


class SequenceDataset(Dataset):
    """Fixed-length sequences: ``x`` (N, T, F) float32, ``mask`` (N, T) bool (False on padded
    frames), ``names`` (source sequence of each piece), ``offsets`` (N,) first frame of each piece
    in its source, ``dropped`` the ``"name (k frames)"`` pieces left out for being too short, and
    ``u`` (N, T, U) or None, the external input of driven mode.  ``dataset[i]`` is
    ``(x[i], mask[i])``, or ``(x[i], mask[i], u[i])`` with an input."""

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, names: Sequence[str],
                 offsets: torch.Tensor | None = None, dropped: Sequence[str] = (),
                 u: Optional[torch.Tensor] = None):
        if x.dim() != 3 or mask.shape != x.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"SequenceDataset: x must be (N, T, F) and mask (N, T) bool, got "
                             f"{tuple(x.shape)} and {tuple(mask.shape)} {mask.dtype}")
        if len(names) != x.shape[0]:
            raise ValueError(f"SequenceDataset: {len(names)} names for {x.shape[0]} sequences")
        if u is not None and (u.dim() != 3 or u.shape[:2] != x.shape[:2]):
            raise ValueError(f"SequenceDataset: u must be (N, T, U) = ({x.shape[0]}, "
                             f"{x.shape[1]}, U), got {tuple(u.shape)}")
        self.x = x
        self.mask = mask
        self.u = u
        self.names = list(names)
        self.offsets = (torch.zeros(x.shape[0], dtype=torch.long) if offsets is None
                        else offsets)
        self.dropped = list(dropped)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        if self.u is None:
            return self.x[i], self.mask[i]
        return self.x[i], self.mask[i], self.u[i]

    @property
    def seq_len(self) -> int:
        return self.x.shape[1]

    @property
    def x_dim(self) -> int:
        return self.x.shape[2]

    @property
    def u_dim(self) -> int:
        """Features of the external input u (0: undriven)."""
        return 0 if self.u is None else self.u.shape[2]

    @property
    def num_frames(self) -> int:
        """Number of real (unmasked) frames."""
        return int(self.mask.sum())

    def __repr__(self) -> str:
        n = len(self)
        padded = n * self.seq_len - self.num_frames
        inputs = f", inputs u of {self.u_dim}" if self.u is not None else ""
        return (f"SequenceDataset({n} sequences x {self.seq_len} frames x {self.x_dim} bins"
                f"{inputs}, {self.num_frames} real frames, {padded} padded, "
                f"{len(set(self.names))} sources, {len(self.dropped)} short pieces left out)")


def make_sequences(powers: Iterable[torch.Tensor], names: Sequence[str],
                   seq_len: Optional[int] = 150, min_frames: int = MIN_FRAMES,
                   inputs: Optional[Iterable[torch.Tensor]] = None) -> SequenceDataset:
    """Cut sequences (T_i, F) into pieces of ``seq_len`` frames (rule in the module docstring).

    Pieces with fewer than ``min(min_frames, seq_len)`` frames are listed in ``.dropped``.
    ``seq_len=None``: every sequence whole, padded to the longest.  ``inputs``: the external
    input (T_i, U) of each sequence, cut the same way (``dataset.u``).
    """
    powers = list(powers)
    inputs = None if inputs is None else list(inputs)
    if inputs is not None and len(inputs) != len(powers):
        raise ValueError(f"make_sequences: {len(inputs)} inputs for {len(powers)} sequences")
    if seq_len is None:
        seq_len = max((p.shape[0] for p in powers), default=1)
    seq_len, min_frames = int(seq_len), int(min_frames)
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    keep = max(1, min(min_frames, seq_len))
    pieces, dropped = [], []
    for i, (power, name) in enumerate(zip(powers, names)):
        n = power.shape[0]
        for start in range(0, n, seq_len):
            length = min(seq_len, n - start)
            if length >= keep:
                pieces.append((i, name, start, length))
            else:
                dropped.append(f"{name} ({length} frames)" if start == 0
                               else f"{name} (last {length} of {n} frames)")
    F = powers[pieces[0][0]].shape[1] if pieces else (powers[0].shape[1] if powers else 0)
    x = torch.zeros(len(pieces), seq_len, F, dtype=torch.float32)
    mask = torch.zeros(len(pieces), seq_len, dtype=torch.bool)
    u = None
    if inputs is not None:
        U = inputs[0].shape[1] if inputs else 0
        u = torch.zeros(len(pieces), seq_len, U, dtype=torch.float32)
    for k, (i, _, start, length) in enumerate(pieces):
        x[k, :length] = powers[i][start:start + length]
        mask[k, :length] = True
        if u is not None:
            u[k, :length] = inputs[i][start:start + length]
    offsets = torch.tensor([p[2] for p in pieces], dtype=torch.long)
    return SequenceDataset(x, mask, [p[1] for p in pieces], offsets, dropped, u)
