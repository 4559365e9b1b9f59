"""Batches: the epoch's order of the training sequences, (x, mask, u) batches, devices, frames."""

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
        return (item[0], item[1] if len(item) > 1 else None, item[2] if len(item) > 2 else None)
    return item, None, None


def iterate_batches(dataset, index_batches: List[List[int]], num_workers: int = 0
                    ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor],
                                        Optional[torch.Tensor]]]:
    """(x, mask, u) for each list of indices (``u``, the input of driven mode, or None); in-memory
    datasets (``.x``, ``.mask``, optional ``.u``) are sliced directly, others go through a torch
    DataLoader (``num_workers`` processes) and give items (x, mask) or (x, mask, u)."""
    if num_workers == 0 and hasattr(dataset, "x") and hasattr(dataset, "mask"):
        u = getattr(dataset, "u", None)
        for idx in index_batches:
            idx = torch.as_tensor(idx, dtype=torch.long)
            yield (dataset.x[idx], None if dataset.mask is None else dataset.mask[idx],
                   None if u is None else u[idx])
        return
    if not index_batches:
        return
    # a generator of its own: the loader's worker seeds must not draw from the global RNG
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=index_batches,
                                         num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    for item in loader:
        yield _split_item(item)


def to_device(x, mask, u, device):
    """``x``, ``mask`` (bool) and ``u`` (or None) on ``device``; a mask without padded frames
    becomes ``None``."""
    x = x.to(device)
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.bool)
        if bool(mask.all()):
            mask = None  # no padded frame: skip the masking arithmetic (identical result)
    return x, mask, (None if u is None else u.to(device))


def check_data(model, dataset, name: str) -> None:
    """Raise ``ValueError`` unless ``model`` can train on ``dataset`` (in-memory data sets with
    ``.x``): as many features as ``model.x_dim``, an input u exactly when the model is driven
    (``u_dim``), and values in the support of the model's likelihood (binary for Bernoulli)."""
    x = getattr(dataset, "x", None)
    if not isinstance(x, torch.Tensor):
        return
    where = f"fit: the {name} set"
    if x.shape[-1] != getattr(model, "x_dim", x.shape[-1]):
        raise ValueError(f"{where} has {x.shape[-1]} features per frame, the model was built for "
                         f"{model.x_dim}")
    u, u_dim = getattr(dataset, "u", None), getattr(model, "u_dim", 0)
    if (0 if u is None else u.shape[-1]) != u_dim:
        raise ValueError(f"{where} has {'no' if u is None else u.shape[-1]} input features u, "
                         f"the model was built for u_dim={u_dim}")
    likelihood = getattr(model, "likelihood", None)
    if hasattr(likelihood, "check_data"):
        likelihood.check_data(x, where)


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
