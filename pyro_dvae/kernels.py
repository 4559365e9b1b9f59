"""Faster CPU kernels for two computations of every speech model's training step: the decoder's
output layer and the Itakura-Saito likelihood.  Each computes the same function as the stock
PyTorch ops (up to float rounding) with less work, and falls back to the stock ops where it would
not help.

- :func:`linear`: an output layer of 257 frequency bins (or 514 parameters, and the like: 1 or 2
  above a multiple of 16) is computed with its weight padded by zero rows to the next multiple of
  16 (the product of (4800, 256) by (256, 257) runs at about half the rate of (256, 272) in MKL on
  this machine; the padded outputs are zeros and are sliced off, so neither the values nor the
  gradients change).
- :func:`itakura_saito_log_prob`: ``-(p + x exp(-p)).sum(-1)`` as one autograd node with its
  gradient ``x exp(-p) - 1`` written out, in place on two buffers (forward and backward at (32,
  150, 257): 4.1 ms against 7.5 ms for autograd's chain of elementwise kernels and temporaries).

The fast paths run on CPU for float32 and float64 (the padded layer outside autocast; the
likelihood, always computed in float32, also under bf16 autocast); elsewhere (CUDA, few rows) the
stock ops run.  :func:`stock` turns them off for a block: the plain-PyTorch baseline of
``benchmarks/step_speed.py`` computes inside it, with the stock ``nn.Linear`` and autograd
likelihood that the authors' implementation uses.  Tests: tests/test_kernels.py (values and
gradients against the stock ops, float64 gradcheck) and tests/test_fast_paths.py (the loss and
gradients of every registered model and guide against :func:`stock`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

_STOCK = [False]

#: the padded output layer is used for at least this many rows (frames) per call ...
MIN_PADDED_ROWS = 4096
#: ... and for output widths of at least this many, 1 or 2 above a multiple of 16
MIN_PADDED_OUT = 256


@contextlib.contextmanager
def stock():
    """Inside: every computation of this module runs the stock PyTorch ops."""
    before, _STOCK[0] = _STOCK[0], True
    try:
        yield
    finally:
        _STOCK[0] = before


def enabled(x: torch.Tensor, under_autocast: bool = False) -> bool:
    """Whether the fast kernels apply to ``x``: CPU, float32/float64, not inside :func:`stock`,
    and autocast off unless ``under_autocast`` (a kernel without matrix products, which autocast
    leaves in its inputs' dtype)."""
    return (not _STOCK[0] and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and (under_autocast or not torch.is_autocast_enabled("cpu")))


# ---- the output layer ---------------------------------------------------------------------------
def padded_width(out: int) -> int:
    """The width an output layer of ``out`` outputs is computed at: the next multiple of 16 for
    257 (bins) or 514 (two parameters per bin) and the like, else ``out``.  Measured with MKL on
    this machine (4800 rows, forward and backward): 1.08-1.18x for 257, 513 and 514 outputs;
    widths further from a multiple of 16 (88, 100, 129, 136, 264) lose 2-17 % padded."""
    if out >= MIN_PADDED_OUT and out % 16 in (1, 2):
        return out + (-out % 16)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with many rows and an output width that MKL handles badly
    (:func:`padded_width`), computed on the weight padded by zero rows and sliced back (a view)."""
    out = weight.shape[0]
    pad = padded_width(out) - out
    if not pad or not enabled(x) or x.numel() // max(x.shape[-1], 1) < MIN_PADDED_ROWS:
        return F.linear(x, weight, bias)
    weight = F.pad(weight, (0, 0, 0, pad))
    bias = None if bias is None else F.pad(bias, (0, pad))
    return F.linear(x, weight, bias)[..., :out]


# ---- the Itakura-Saito likelihood ---------------------------------------------------------------
class _ItakuraSaito(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, params):
        r = torch.neg(params).exp_().mul_(x)                     # x / sigma^2
        ctx.save_for_backward(x, params, r)
        return params.sum(-1).add_(r.sum(-1)).neg_()

    @staticmethod
    def backward(ctx, grad):
        x, params, r = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        if torch.is_grad_enabled():  # a double backward: the differentiable expression
            e = torch.exp(-params)
            return -g * e, g * (x * e - 1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.neg(params).exp_().mul_(g).neg_()
        dp = (r - 1).mul_(g) if ctx.needs_input_grad[1] else None
        return dx, dp


def itakura_saito_log_prob(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``-(params + x exp(-params)).sum(-1)``, log p(x | log sigma^2 = params) of the Gamma(1)
    model up to its constant (see :class:`~pyro_dvae.distributions.likelihoods.ItakuraSaito`)."""
    if (not enabled(params, under_autocast=True) or x.shape != params.shape
            or x.dtype != params.dtype):
        return -(params + x * torch.exp(-params)).sum(-1)
    return _ItakuraSaito.apply(x, params)

