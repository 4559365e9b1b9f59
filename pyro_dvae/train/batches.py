"""Batches: the epoch's order of the training sequences, (x, mask) batches, devices and frames."""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training sequences in ``epoch``: a function of (seed, epoch) only, so it
    does not depend on how much of the global RNG earlier epochs (or an interruption) consumed."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randperm(n, generator=g)


def _split_item(item):
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def iterate_batches(dataset, index_batches: List[List[int]], num_workers: int = 0
                    ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(x, mask) for each list of indices; in-memory datasets (``.x``, ``.mask``) are sliced
    directly, others go through a torch DataLoader (``num_workers`` processes)."""
    if num_workers == 0 and hasattr(dataset, "x") and hasattr(dataset, "mask"):
        for idx in index_batches:
            idx = torch.as_tensor(idx, dtype=torch.long)
            yield dataset.x[idx], (None if dataset.mask is None else dataset.mask[idx])
        return
    if not index_batches:
        return
    # a generator of its own: the loader's worker seeds must not draw from the global RNG
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=index_batches,
                                         num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    for item in loader:
        yield _split_item(item)


def to_device(x, mask, device):
    """``x`` and ``mask`` (bool) on ``device``; a mask without padded frames becomes ``None``."""
    x = x.to(device)
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.bool)
        if bool(mask.all()):
            mask = None  # no padded frame: skip the masking arithmetic (identical result)
    return x, mask


def frames(x, mask) -> int:
    """Number of unmasked frames of a batch."""
    return int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1]


def parameters(*modules: nn.Module) -> List[nn.Parameter]:
    """The parameters of ``modules``, each once, in order."""
    seen, params = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def device_of(params) -> torch.device:
    """The device of the first parameter (the CPU without parameters)."""
    return params[0].device if params else torch.device("cpu")
