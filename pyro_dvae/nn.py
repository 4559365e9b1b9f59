"""Shared network blocks in the paper's notation (13.1).

``MLP(y, n1, f1, ..., nL, fL)`` is an L-layer perceptron whose l-th layer has ``n_l`` outputs and
activation ``f_l``; ``mlp(in_dim, 256, "tanh")`` builds ``MLP(y, 256, Tanh)``.  Layers that output
distribution parameters are plain ``nn.Linear`` (13.1: "always linearly activated").

The RNN wrappers run over a whole (batch, time, features) sequence at once, forward or backward in
time, and can also be stepped one frame at a time with an explicit state, so a model and its guide
can share one set of weights between vectorised and sequential use.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from . import kernels
from .precision import fp32

ACTIVATIONS = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "linear": nn.Identity,
    "identity": nn.Identity,
}


class MLP(nn.Sequential):
    """``MLP(y, n1, f1, ..., nL, fL)`` of 13.1: ``MLP(in_dim, 256, "tanh", 128, "tanh")``.

    With no layers given it is the identity map (``out_dim == in_dim``).
    """

    def __init__(self, in_dim: int, *spec):
        if len(spec) % 2:
            raise ValueError(f"MLP spec must alternate sizes and activations, got {spec!r}")
        layers = []
        dim = in_dim
        for n, f in zip(spec[::2], spec[1::2]):
            if f.lower() not in ACTIVATIONS:
                raise ValueError(f"unknown activation {f!r}; choose from {sorted(ACTIVATIONS)}")
            layers += [nn.Linear(dim, int(n)), ACTIVATIONS[f.lower()]()]
            dim = int(n)
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = dim


def mlp(in_dim: int, sizes: Sequence[int], activation: str = "tanh") -> MLP:
    """``MLP(in_dim, n1, f, ..., nL, f)``: hidden layers of the widths ``sizes``, all with one
    activation (the form of the authors' ``dense_*`` fields); ``sizes=()`` is the identity."""
    spec = []
    for n in sizes:
        spec += [n, activation]
    return MLP(in_dim, *spec)


# ---- architecture options ------------------------------------------------------------------------
#: the activations an architecture's ``activation`` option may name
HIDDEN_ACTIVATIONS = ("tanh", "relu", "sigmoid", "softplus")


class ArchitectureError(ValueError):
    """An architecture option that is unknown or has an invalid value (one-line message)."""


def layer_sizes(value: Any, key: str) -> Tuple[int, ...]:
    """The widths of a ``dense_*`` option: ``256``, ``(256, 128)``, ``[256, 128]``, ``"256,128"``
    or ``""`` / ``()`` (no hidden layer: the identity) -> a tuple of positive ints."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")] if value.strip() else []
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise ArchitectureError(f"{key}={value!r}: not a comma-separated list of layer "
                                    "widths (for example 256,128)") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise ArchitectureError(f"{key}={value!r}: layer widths must be integers "
                                "(for example 256,128)")
    if any(n < 1 for n in value):
        raise ArchitectureError(f"{key}={value!r}: layer widths must be >= 1")
    return tuple(value)


def _option_value(key: str, value: Any, default: Any) -> Any:
    if key.startswith("dense_"):
        return None if value is None and default is None else layer_sizes(value, key)
    if key.startswith(("dim_rnn", "num_rnn")):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ArchitectureError(f"{key}={value!r}: must be an integer >= 1")
        return value
    if key.startswith("bidir_"):
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise ArchitectureError(f"{key}={value!r}: must be True or False")
        return value
    if key == "activation":
        if not isinstance(value, str) or value.lower() not in HIDDEN_ACTIVATIONS:
            raise ArchitectureError(f"activation={value!r}: choose from "
                                    f"{', '.join(HIDDEN_ACTIVATIONS)}")
        return value.lower()
    raise AssertionError(f"architecture option {key!r} has no known kind")


def architecture_json(arch: Dict[str, Any]) -> Dict[str, Any]:
    """Resolved architecture options as JSON values (layer widths as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}


def resolve_architecture(owner: str, defaults: Dict[str, Any],
                         given: Dict[str, Any]) -> Dict[str, Any]:
    """Validate the architecture options ``given`` against ``defaults`` and return the complete,
    normalised set (layer widths as tuples).

    Keys are the authors' config.ini field names, case-insensitive (``dim_RNN_h`` = ``dim_rnn_h``):
    ``dense_*`` hidden-layer widths, ``dim_rnn_*`` LSTM sizes, ``num_rnn_*`` LSTM layers,
    ``bidir_*`` directions and ``activation``.  Raises :class:`ArchitectureError` naming the first
    bad option.
    """
    arch = dict(defaults)
    for key, value in given.items():
        name = key.lower()
        if name not in defaults:
            raise ArchitectureError(f"unknown option {key!r} for {owner}; options: "
                                    f"{', '.join(defaults) or 'none'}")
        arch[name] = _option_value(name, value, defaults[name])
    return {k: (_option_value(k, v, defaults[k]) if v is not None else None)
            for k, v in arch.items()}


class OutputLinear(nn.Linear):
    """``nn.Linear`` for the decoder's output layer (the likelihood's parameters, one per
    frequency bin): the same parameters and function, computed by :func:`pyro_dvae.kernels.linear`
    (faster for 257 outputs)."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return kernels.linear(y, self.weight, self.bias)


class GaussianHead(nn.Module):
    """Linear output layer giving the mean and standard deviation of a diagonal Gaussian.

    The variance is log-parameterised (13.1): the layer outputs ``log sigma^2``.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.loc = nn.Linear(in_dim, out_dim)
        self.logvar = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), torch.exp(0.5 * self.logvar(h))


RNN_TYPES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RNN(nn.Module):
    """A single-direction recurrent layer over time, batch first.

    ``RNN(in_dim, hidden, cell="lstm", reverse=False)``: ``forward(y)`` maps (batch, T, in_dim) to
    (batch, T, hidden); with ``reverse=True`` it runs from t = T down to 1 (a backward RNN, output at
    t summarising y_{t:T}).  ``step(y_t, state)`` advances one frame for sequential use.
    An optional ``mask`` (batch, T) makes a backward RNN start at each sequence's own last frame.
    """

    def __init__(self, in_dim: int, hidden: int, cell: str = "lstm", reverse: bool = False,
                 num_layers: int = 1):
        super().__init__()
        if cell not in RNN_TYPES:
            raise ValueError(f"unknown RNN cell {cell!r}; choose from {sorted(RNN_TYPES)}")
        self.rnn = RNN_TYPES[cell](in_dim, hidden, num_layers=num_layers, batch_first=True)
        self.cell, self.reverse, self.hidden = cell, reverse, hidden
        self.in_dim = in_dim

    def forward(self, y: torch.Tensor, mask: Optional[torch.Tensor] = None,
                state=None) -> torch.Tensor:
        if not self.reverse:
            out, _ = self.rnn(y, state)
            return out
        if mask is None:
            out, _ = self.rnn(y.flip(1), state)
            return out.flip(1)
        # Padded sequences: reverse each sequence within its own length so that the backward
        # recursion starts at its last real frame (padding stays at the end).
        idx = _reverse_index(mask)
        out, _ = self.rnn(_gather_time(y, idx), state)
        return _gather_time(out, idx)

    def step(self, y_t: torch.Tensor, state=None):
        """One step: y_t (batch, in_dim) -> (output (batch, hidden), new state)."""
        out, state = self.rnn(y_t.unsqueeze(1), state)
        return out.squeeze(1), state


class BiRNN(nn.Module):
    """Forward and backward RNNs over the same input, outputs concatenated (batch, T, 2*hidden)."""

    def __init__(self, in_dim: int, hidden: int, cell: str = "lstm", num_layers: int = 1):
        super().__init__()
        self.fwd = RNN(in_dim, hidden, cell, num_layers=num_layers)
        self.bwd = RNN(in_dim, hidden, cell, reverse=True, num_layers=num_layers)
        self.out_dim = 2 * hidden

    def forward(self, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.cat([self.fwd(y), self.bwd(y, mask)], -1)


def _reverse_index(mask: torch.Tensor) -> torch.Tensor:
    """Index (batch, T) that reverses each sequence inside its valid length."""
    lengths = mask.sum(1, keepdim=True).long()
    t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(t < lengths, lengths - 1 - t, t)


def _gather_time(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return y.gather(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]))


def shift_right(y: torch.Tensor, first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y_{t-1} aligned with t: (batch, T, D) -> (batch, T, D), with ``first`` (default 0) at t = 1."""
    if first is None:
        first = y.new_zeros(y.shape[0], 1, y.shape[-1])
    elif first.dim() == 2:
        first = first.unsqueeze(1)
    return torch.cat([first, y[:, :-1]], 1)


# ---- sequential recursions: the per-sequence parts computed once, outside the time loop ---------
def _input_projection(weight: torch.Tensor, bias: Optional[torch.Tensor],
                      parts: Sequence[Optional[torch.Tensor]]):
    """Split the input columns of ``weight`` along ``parts``, the pieces of a concatenated input
    in order: exactly one ``None`` (the input known only inside the loop) and tensors
    (batch, T, d) known for all steps.  Returns (per-step float32 projections of the known pieces
    plus the bias, a list of T (batch, out) tensors; the transposed weight of the step input)."""
    if sum(p is None for p in parts) != 1:
        raise ValueError("parts must hold exactly one None (the step input)")
    known = sum(p.shape[-1] for p in parts if p is not None)
    step_dim = weight.shape[1] - known
    if step_dim <= 0:
        raise ValueError(f"the known parts have {known} columns, the layer only {weight.shape[1]}")
    pre, start, w_step = None, 0, None
    for p in parts:
        d = step_dim if p is None else p.shape[-1]
        w = weight[:, start:start + d]
        start += d
        if p is None:
            w_step = w.t()
        else:
            proj = torch.nn.functional.linear(p, w)
            pre = proj if pre is None else pre + proj
    if bias is not None:
        pre = pre + bias
    # one (bfloat16 under autocast) product per sequence; the loop runs in float32
    return fp32(pre).unbind(1), w_step


def _concat_step(parts: Sequence[Optional[torch.Tensor]], t: int, y_t: torch.Tensor) -> torch.Tensor:
    return torch.cat([y_t if p is None else fp32(p[:, t]) for p in parts], -1)


def stepwise(mlp: MLP, parts: Sequence[Optional[torch.Tensor]]):
    """``mlp(cat(parts_t))`` one step t at a time, where ``parts`` lists the pieces of the input in
    order: ``None`` for the input y_t given at each step and tensors (batch, T, d) known for all
    steps (``stepwise(e_z, [g, None])`` is ``e_z(cat([g_t, y_t]))``).  The share of the known
    pieces in the first linear layer is computed once for all t (one product per sequence
    instead of one per step, no concatenation per step).  Returns ``at(t, y_t)``; the same
    function as the MLP on the concatenation, up to float rounding."""
    layers = list(mlp)
    if not layers or not isinstance(layers[0], nn.Linear):  # (an identity MLP): on the concat
        return lambda t, y_t: mlp(_concat_step(parts, t, y_t))
    first = layers[0]
    pre, w_step = _input_projection(first.weight, first.bias, parts)
    rest = layers[1:]

    def at(t: int, y_t: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(pre[t], y_t, w_step)
        for layer in rest:
            out = layer(out)
        return out

    return at


def gaussian_head_step(head: GaussianHead):
    """:class:`GaussianHead` for use inside a time loop: both output layers as one matrix product
    per step (their weights concatenated once per sequence).  Returns ``f(h) -> (loc, scale)``."""
    weight = torch.cat([head.loc.weight, head.logvar.weight]).t()
    bias = torch.cat([head.loc.bias, head.logvar.bias])
    n = head.loc.out_features

    def f(h: torch.Tensor):
        out = torch.addmm(bias, h, weight)
        return out[..., :n], torch.exp(0.5 * out[..., n:])

    return f


def lstm_step(rnn: RNN, parts: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """One-frame steps of the LSTM ``rnn`` with written-out gate arithmetic.  The input at step t
    is y_t alone (``parts=None``) or the concatenation of ``parts`` as in :func:`stepwise`
    (``None`` for y_t; the share of the known pieces in W_ih [.] + b_ih + b_hh computed once for
    all t).  Returns ``step(t, y_t, state) -> (h_t, state)``, ``state`` None at the start (zero h
    and c); the same function as ``rnn.step`` up to float rounding, without the per-call cost of
    a one-frame ``nn.LSTM``.  Other cells and stacked LSTMs step the module on the
    concatenation (same function, no saving)."""
    lstm = rnn.rnn
    if rnn.reverse:
        raise ValueError("lstm_step() needs a forward RNN")
    if rnn.cell != "lstm" or lstm.num_layers != 1:  # other cells, stacked LSTMs: module steps
        return lambda t, y_t, state=None: rnn.step(
            y_t if parts is None else _concat_step(parts, t, y_t), state)
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    if parts is None:
        pre, w_step = None, w_ih.t()
    else:
        pre, w_step = _input_projection(w_ih, bias, parts)
    w_hh_t = w_hh.t()
    H = lstm.hidden_size

    def step(t: int, y_t: torch.Tensor, state=None):
        gates = torch.addmm(bias if pre is None else pre[t], y_t, w_step)
        if state is not None:
            gates = torch.addmm(gates, state[0], w_hh_t)
        sig = torch.sigmoid(gates)
        i, f, o = sig[:, :H], sig[:, H:2 * H], sig[:, 3 * H:]
        g = torch.tanh(gates[:, 2 * H:3 * H])
        c = i * g if state is None else torch.addcmul(i * g, f, state[1])
        h = o * torch.tanh(c)
        return h, (h, c)

    return step
