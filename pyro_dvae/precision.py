"""Where and how models compute: the device (:func:`resolve_device`: cpu, cuda or auto) and the
precision of training, ``fp32`` (default) or ``bf16`` mixed precision.

``bf16`` runs the forward pass under ``torch.autocast`` (CPU or CUDA) with bfloat16: matrix products
and LSTMs run in bfloat16, while the parameters, their gradients and the optimiser state stay in
float32 (autocast casts a copy per run; nothing is stored in bfloat16).  The numerically sensitive
parts are computed in float32 from their (possibly bfloat16) inputs: the Gaussian log-densities and
KL divergences and the likelihood sums of :mod:`pyro_dvae.distributions.sequence` (through
:func:`fp32`), every region that opts out with :func:`full_precision`, and the functions decorated
with :func:`exact`, which run in the dtype of their inputs (the Kalman filter, smoother, sampler and
densities of :mod:`pyro_dvae.distributions.kalman` and KVAE's mixing of the LDS matrices, in
float64 by default or float32 with ``-o kalman_dtype=float32``).

The loss of a bf16 run differs from the fp32 loss of the same weights, seed and batch by the
rounding of the network outputs to 8 significant bits: tests/test_fast_paths.py bounds it at 2 % of
the loss (measured: a few tenths of a per cent at initialisation), and
benchmarks/precision_training.py shows that training curves and test metrics agree within
run-to-run noise.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Union

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


def exact(fn: Callable) -> Callable:
    """Decorator: ``fn`` runs with autocast off on every device type where it is on, so its
    products keep the dtype of their inputs (float32 or float64) even inside a ``bf16`` forward
    pass (the Kalman algebra of :mod:`pyro_dvae.distributions.kalman`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 if it is a lower-precision float (bf16 / fp16); other tensors unchanged."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.float()
    return t


DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` (the current CUDA device; a ValueError with one line if torch sees
    none) or ``"auto"`` (CUDA when torch sees a GPU, else the CPU)."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                         "False); use --device cpu or auto")
    return torch.device(name)
