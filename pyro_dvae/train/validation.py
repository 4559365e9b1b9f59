"""The validation loss: negative VLB per frame with beta = 1 on a forked, seeded RNG."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

import pyro

from ..models.base import fused_sites
from .batches import device_of, frames, iterate_batches, parameters, to_device
from .config import ELBOS


@torch.no_grad()
def evaluate_loss(model, guide, dataset, elbo: str = "trace", batch_size: int = 32,
                  seed: int = 0, num_workers: int = 0) -> float:
    """Negative VLB per (unmasked) frame on ``dataset`` (beta = 1), one ELBO sample per sequence.

    Uses its own RNG stream seeded with ``seed`` (common random numbers across epochs, and the
    training RNG is left untouched).
    """
    n = len(dataset)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    total, count = loss_sums(model, guide, dataset, batches, elbo, num_workers, seed=seed)
    return total / max(count, 1)


def loss_sums(model, guide, dataset, batches: List[List[int]], elbo: str = "trace",
              num_workers: int = 0, seed: int = 0,
              batch_seeds: Optional[List[int]] = None) -> Tuple[float, int]:
    """(sum of the negative VLB, number of unmasked frames) over ``batches`` of ``dataset``, in eval
    mode, beta = 1, one ELBO sample per sequence, on a forked RNG (the caller's stream is left
    untouched): seeded once with ``seed``, or before each batch with ``batch_seeds``."""
    if len(dataset) == 0:
        raise ValueError("evaluate_loss: the data set is empty")
    device = device_of(parameters(model, guide))
    loss_fn = ELBOS[elbo]()
    cuda = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training, guide.training
    model.eval()
    guide.eval()
    total, count = 0.0, 0
    try:
        with torch.random.fork_rng(devices=cuda), pyro.validation_enabled(False):
            torch.manual_seed(seed)
            for i, (x, mask, u) in enumerate(iterate_batches(dataset, batches, num_workers)):
                if batch_seeds is not None:
                    torch.manual_seed(batch_seeds[i])
                x, mask, u = to_device(x, mask, u, device)
                with fused_sites():  # the per-step loss, one site per family (float32)
                    total += float(loss_fn.differentiable_loss(model.model, guide, x, u, mask,
                                                               None, 1.0))
                count += frames(x, mask)
    finally:
        model.train(was_training[0])
        guide.train(was_training[1])
    return total, count
