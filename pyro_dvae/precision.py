"""Mixed precision for training and evaluation: ``fp32`` (default) or ``bf16``.

``bf16`` runs the forward pass under ``torch.autocast`` (CPU or CUDA) with bfloat16: matrix products
and LSTMs run in bfloat16, while the parameters, their gradients and the optimiser state stay in
float32 (autocast casts a copy per run; nothing is stored in bfloat16).  The numerically sensitive
parts are computed in float32 from their (possibly bfloat16) inputs: the Gaussian log-densities and
KL divergences and the likelihood sums of :mod:`pyro_dvae.distributions.sequence` (through
:func:`fp32`), and every region that opts out with :func:`full_precision` (the Kalman algebra).

The loss of a bf16 run differs from the fp32 loss of the same weights, seed and batch by the
rounding of the network outputs to 8 significant bits: tests/test_precision.py bounds it at 2 % of
the loss (measured: a few tenths of a per cent at initialisation), and
benchmarks/precision_training.py shows that training curves and test metrics agree within
run-to-run noise.
"""

from __future__ import annotations

import contextlib
from typing import Union

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: Union[str, torch.device] = "cpu"):
    """The context of a forward pass in ``precision`` on ``device`` (no handler for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def full_precision(like: torch.Tensor):
    """Inside an autocast region: compute in float32 (autocast off for ``like``'s device)."""
    if not torch.is_autocast_enabled(like.device.type):
        return contextlib.nullcontext()
    return torch.autocast(like.device.type, enabled=False)


def fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 if it is a lower-precision float (bf16 / fp16); other tensors unchanged."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.float()
    return t
