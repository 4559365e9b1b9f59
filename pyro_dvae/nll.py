"""The importance-weighted bound on the test log-likelihood log p(x_{1:T}) (Burda et al. 2016).

For one sequence x and K draws z^(k) ~ q(z | x) of the guide, with the importance weights
w_k = p(x, z^(k)) / q(z^(k) | x),

    L_K(x) = log (1/K) sum_k w_k  <=  log p(x),

and E[L_K] does not decrease with K and tends to log p(x) (the bound of Burda et al. 2016, eq. 8
and theorem 1).  L_1 is a one-sample ELBO (the VLB, 4.22), so E[L_1] is the ELBO.  The DVAE papers
(DKF/DMM, STORN, VRNN, SRNN) report the test negative log-likelihood per time step,
-sum_i L_K(x_i) / sum_i T_i; :func:`evaluate_nll` computes it for any model and guide that follow
the :class:`~pyro_dvae.models.base.DVAE` calling convention ``fn(x, u, mask)`` with their sample
sites inside the batch plate ``"sequences"`` (every registered pair and a user's own DVAE).

How the weights are computed: the guide is traced, the model is replayed on the guide's values
(``poutine.replay``) and traced, and each trace's ``log_prob`` (Pyro's scale and mask applied) is
summed per sequence over all sample sites: log w = log p(x, z) - log q(z | x).  This is exactly what
``Trace_ELBO`` computes, per sequence (tested: L_1 equals ``Trace_ELBO`` with the same random
numbers for every registered pair).  Sequence-level latents (DSAE's v), the KVAE's a_t and its exact
Kalman posterior over z are ordinary sites and need nothing special.

Particles are vectorised by repetition: a batch of B sequences is repeated k times along the batch
dimension and run as one batch of k x B sequences (the per-step sites of this package are views of
one per-sequence computation, which a particle plate would have to expand).  The K particles of a
batch are processed in chunks of at most ``chunk_frames`` frames (copies x T) per pass, so memory
stays bounded for any K.

Padding: by default (``by_length=True``) every sequence is evaluated at its own length -- the
trailing padding marked by ``mask`` is cut off and sequences of equal length are batched together
-- so no model or guide ever sees a padded frame and L_K bounds the density of the real frames
under the model itself (also for non-causal models such as RVAE's bidirectional decoder, where a
padded latent would otherwise reach real frames).  ``by_length=False`` evaluates padded batches
with their masks instead (masked frames add nothing, as in training).  Either way the per-step
normaliser counts real frames only.

Monte-Carlo error: for each sequence the standard error of L_K is estimated from its K weights by
the delta method, SE = sd(w) / (sqrt(K) mean(w)), computed from the normalised weights in log space
(needs K >= 2); sequences are independent, so the standard error of the total is the root of the
summed squares.  It measures the sampling noise of the estimate, not the bias L_K - log p(x) (which
is >= 0 nats and shrinks with K); with heavy-tailed weights (a small effective sample size ``ess``)
the delta method underestimates the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import prune_subsample_sites

__all__ = ["NLLResult", "evaluate_nll", "log_weights"]

#: name of the batch plate (DVAE.plate)
PLATE = "sequences"


@dataclass
class NLLResult:
    """The importance-weighted bound of every sequence of a data set.

    Per sequence i (tensors of shape (N,), float64, in the order of the data): ``log_px`` the
    bound L_K(x_i) in nats, ``std_error`` its Monte-Carlo standard error (NaN for K = 1),
    ``elbo`` the mean of the K log weights (a K-sample estimate of the ELBO, <= ``log_px``),
    ``ess`` the effective sample size (sum w)^2 / sum w^2 of the K weights (between 1 and K; the
    delta-method standard error saturates near 1 nat when one weight dominates), ``frames`` the
    number of real frames T_i.
    """

    K: int
    log_px: torch.Tensor
    std_error: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor
    frames: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return int(self.log_px.numel())

    @property
    def num_frames(self) -> int:
        return int(self.frames.sum())

    @property
    def total(self) -> float:
        """sum_i L_K(x_i): the bound on the log-likelihood of the whole data set (nats)."""
        return float(self.log_px.sum())

    @property
    def total_std_error(self) -> float:
        return float(self.std_error.pow(2).sum().sqrt())

    @property
    def per_step(self) -> float:
        """Bound on the log-likelihood per time step: sum_i L_K(x_i) / sum_i T_i (nats)."""
        return self.total / self.num_frames

    @property
    def nll_per_step(self) -> float:
        """The test NLL per time step the DVAE papers report: -:attr:`per_step`."""
        return -self.per_step

    @property
    def std_error_per_step(self) -> float:
        return self.total_std_error / self.num_frames

    @property
    def per_sequence(self) -> float:
        """Mean bound per sequence: sum_i L_K(x_i) / N (nats)."""
        return self.total / self.num_sequences

    @property
    def std_error_per_sequence(self) -> float:
        return self.total_std_error / self.num_sequences

    @property
    def elbo_per_step(self) -> float:
        return float(self.elbo.sum()) / self.num_frames

    def summary(self) -> Dict[str, Any]:
        """The numbers of the data set as a JSON-ready dict (a NaN standard error is None)."""
        def num(v: float) -> Optional[float]:
            return None if math.isnan(v) else v

        return {"K": self.K, "num_sequences": self.num_sequences, "num_frames": self.num_frames,
                "nll_per_step": self.nll_per_step, "log_px_per_step": self.per_step,
                "std_error_per_step": num(self.std_error_per_step),
                "log_px_per_sequence": self.per_sequence,
                "std_error_per_sequence": num(self.std_error_per_sequence),
                "log_px_total": self.total, "std_error_total": num(self.total_std_error),
                "elbo_per_step": self.elbo_per_step,
                "ess_median": float(self.ess.median())}

    def to_dict(self) -> Dict[str, Any]:
        """:meth:`summary` plus the per-sequence values (lists)."""
        def values(t: torch.Tensor) -> List[Optional[float]]:
            return [None if math.isnan(v) else v for v in t.tolist()]

        return {**self.summary(), "per_sequence": {
            "log_px": values(self.log_px), "std_error": values(self.std_error),
            "elbo": values(self.elbo), "ess": values(self.ess), "frames": self.frames.tolist()}}

    def __str__(self) -> str:
        se = self.std_error_per_step
        pm = "" if math.isnan(se) else f" ± {se:.4f}"
        return (f"NLL per time step {self.nll_per_step:.4f}{pm} nats (K = {self.K}; "
                f"{self.num_sequences} sequences, {self.num_frames} frames; "
                f"log p(x) per sequence >= {self.per_sequence:.2f} nats; "
                f"ELBO per step {self.elbo_per_step:.4f})")


def _per_sequence(trace, batch: int, what: str) -> torch.Tensor:
    """Sum of every sample site's log_prob for each element of the batch plate: (batch,)."""
    total = None
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        scale = site["scale"]
        if not (isinstance(scale, (int, float)) and scale == 1):
            raise ValueError(f"evaluate_nll: {what} site {name!r} is scaled (beta or data-set "
                             "scaling); the bound needs unscaled densities")
        frame = next((f for f in site["cond_indep_stack"] if f.name == PLATE), None)
        if frame is None:
            raise ValueError(f"evaluate_nll: {what} site {name!r} is outside the plate "
                             f"{PLATE!r}; every site must belong to one sequence (use DVAE.plate)")
        lp = site["log_prob"]
        dim = frame.dim
        if lp.dim() < -dim or lp.shape[dim] != batch:
            raise ValueError(f"evaluate_nll: {what} site {name!r} has log_prob of shape "
                             f"{tuple(lp.shape)}; expected {batch} sequences at dim {dim}")
        lp = lp.movedim(dim, 0).reshape(batch, -1).sum(1).to(torch.float64)
        total = lp if total is None else total + lp
    if total is None:
        raise ValueError(f"evaluate_nll: the {what} has no sample site")
    return total


def log_weights(model: Callable, guide: Callable, x: torch.Tensor,
                u: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """log w = log p(x, z) - log q(z | x) for one draw z ~ q per sequence: (batch,), float64.

    ``model`` is a DVAE (its ``model`` method is used) or a Pyro model, ``guide`` a Pyro guide, both
    called as ``fn(x, u, mask)``.  The same computation as ``Trace_ELBO`` (guide trace, model
    replayed on it), summed per sequence instead of over the batch.
    """
    model_fn = getattr(model, "model", model)
    batch = x.shape[0]
    guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(x, u, mask))
    model_trace = prune_subsample_sites(
        poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(x, u, mask))
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return _per_sequence(model_trace, batch, "model") - _per_sequence(guide_trace, batch, "guide")


def _as_sequences(data, mask, u, by_length: bool
                  ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]],
                             List[Optional[torch.Tensor]], List[int]]:
    """Data (a tensor, a data set with ``.x``/``.mask``, or a list of (T_i, F) tensors) as lists of
    per-sequence x (T, F), mask (T,) or None, u (T, U) or None, and real frame counts."""
    if hasattr(data, "x") and not isinstance(data, torch.Tensor):
        mask = getattr(data, "mask", None) if mask is None else mask
        u = getattr(data, "u", None) if u is None else u
        data = data.x
    if isinstance(data, torch.Tensor):
        if data.dim() != 3:
            raise ValueError(f"evaluate_nll: x must be (N, T, F), got shape {tuple(data.shape)}")
        xs = list(data.unbind(0))
        if mask is not None:
            if mask.shape != data.shape[:2]:
                raise ValueError(f"evaluate_nll: mask must be (N, T) = {tuple(data.shape[:2])}, "
                                 f"got {tuple(mask.shape)}")
            masks = list(mask.bool().unbind(0))
        else:
            masks = [None] * len(xs)
        us = [None] * len(xs) if u is None else list(u.unbind(0))
    else:
        xs = [torch.as_tensor(s) for s in data]
        if any(s.dim() != 2 for s in xs):
            raise ValueError("evaluate_nll: a list of sequences must hold (T_i, F) tensors")
        if mask is not None:
            raise ValueError("evaluate_nll: a list of sequences takes no mask (each is whole)")
        masks = [None] * len(xs)
        us = [None] * len(xs) if u is None else [torch.as_tensor(s) for s in u]
    if not xs:
        raise ValueError("evaluate_nll: the data set is empty")
    if len(us) != len(xs):
        raise ValueError(f"evaluate_nll: {len(us)} inputs u for {len(xs)} sequences")
    frames = []
    for i, m in enumerate(masks):
        n = xs[i].shape[0] if m is None else int(m.sum())
        if n == 0:
            raise ValueError(f"evaluate_nll: sequence {i} has no real frame")
        if by_length and m is not None:
            if not bool(m[:n].all()):
                raise ValueError(f"evaluate_nll: the mask of sequence {i} is not a prefix (real "
                                 "frames then padding); evaluate it with by_length=False")
            xs[i] = xs[i][:n]
            us[i] = None if us[i] is None else us[i][:n]
            masks[i] = None
        frames.append(n)
    return xs, masks, us, frames


def _batches(lengths: Sequence[int], K: int, chunk_frames: int, by_length: bool
             ) -> List[List[int]]:
    """Index batches of the sequences of (stored) ``lengths``: equal lengths together
    (sorted by length with ``by_length``, else in order); a batch holds one sequence, or as many
    sequences of one length as fit with all K particles in ``chunk_frames`` frames."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if by_length else \
        list(range(len(lengths)))
    batches: List[List[int]] = []
    for i in order:
        if batches:
            last = batches[-1]
            if lengths[last[0]] == lengths[i] and (len(last) + 1) * K * lengths[i] <= chunk_frames:
                last.append(i)
                continue
        batches.append([i])
    return batches


def _module_of(fn) -> Optional[torch.nn.Module]:
    """The module behind a model or guide (a module, or a bound method such as ``dvae.model``)."""
    if isinstance(fn, torch.nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _stack(items: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    if items[0] is None:
        return None
    if any(it is None for it in items):
        raise ValueError("evaluate_nll: u was given for some sequences only")
    return torch.stack(items, 0)


@torch.no_grad()
def evaluate_nll(model: Callable, guide: Callable, data: Union[torch.Tensor, Any,
                                                               Sequence[torch.Tensor]],
                 K: int = 100, *, mask: Optional[torch.Tensor] = None,
                 u: Optional[torch.Tensor] = None, chunk_frames: int = 32768, seed: int = 0,
                 by_length: bool = True, progress: bool = False) -> NLLResult:
    """The importance-weighted bound L_K on log p(x_i) of every sequence of ``data`` (module
    docstring), with K guide draws per sequence.

    ``model``: a :class:`~pyro_dvae.DVAE` (or a Pyro model called as ``model(x, u, mask)``);
    ``guide``: its guide.  ``data``: a tensor (N, T, F) with an optional ``mask`` (N, T) (False on
    trailing padding) and ``u`` (N, T, U); a data set with attributes ``x`` and ``mask`` (such as
    :class:`pyro_dvae.data.SequenceDataset`); or a list of whole (T_i, F) sequences (``u`` then a
    list of (T_i, U)).  ``chunk_frames``: at most this many frames (sequence copies x T) per
    forward pass.  Random numbers come from a stream of their own seeded with ``seed`` (the
    caller's RNG state is left untouched); model and guide run in eval mode.  Returns an
    :class:`NLLResult` (``result.nll_per_step``, ``result.std_error_per_step``, ...).
    """
    K = int(K)
    if K < 1:
        raise ValueError(f"evaluate_nll: K must be >= 1, got {K}")
    if chunk_frames < 1:
        raise ValueError(f"evaluate_nll: chunk_frames must be >= 1, got {chunk_frames}")
    xs, masks, us, frames = _as_sequences(data, mask, u, by_length)
    likelihood = getattr(_module_of(model), "likelihood", None)
    if hasattr(likelihood, "check_data"):  # the real frames lie in the likelihood's support
        real = [x if m is None else x[m] for x, m in zip(xs, masks)]
        likelihood.check_data(torch.cat(real, 0), "evaluate_nll: the data")
    modules = [m for m in map(_module_of, (model, guide)) if m is not None]
    params = [p for m in modules for p in m.parameters()]
    device = params[0].device if params else xs[0].device
    batches = _batches([x.shape[0] for x in xs], K, chunk_frames, by_length)
    N = len(xs)
    log_w = torch.empty(N, K, dtype=torch.float64)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    iterator = batches
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(batches, desc=f"IW bound (K = {K})", unit="batch", leave=False)
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), pyro.validation_enabled(False):
            torch.manual_seed(seed)
            for idx in iterator:
                T = xs[idx[0]].shape[0]
                x = torch.stack([xs[i] for i in idx], 0).to(device)
                m = None if masks[idx[0]] is None else torch.stack([masks[i] for i in idx],
                                                                  0).to(device)
                uu = _stack([us[i] for i in idx])
                uu = None if uu is None else uu.to(device)
                B = len(idx)
                per_pass = max(1, min(K, chunk_frames // (B * T)))
                done = 0
                while done < K:
                    k = min(per_pass, K - done)
                    lw = log_weights(model, guide, x.repeat(k, 1, 1),
                                     None if uu is None else uu.repeat(k, 1, 1),
                                     None if m is None else m.repeat(k, 1))
                    log_w[idx, done:done + k] = lw.view(k, B).T.cpu()
                    done += k
    finally:
        for mod, was in zip(modules, was_training):
            mod.train(was)
    bad = (torch.isnan(log_w) | (log_w == math.inf)).any(1)
    if bad.any():
        raise FloatingPointError(f"evaluate_nll: a NaN or +inf log weight for sequence "
                                 f"{int(bad.nonzero()[0])}")
    return _summarise(log_w, torch.tensor(frames))


def _summarise(log_w: torch.Tensor, frames: torch.Tensor) -> NLLResult:
    """Bound, delta-method standard error, ELBO and ESS from the (N, K) log weights."""
    N, K = log_w.shape
    lse = torch.logsumexp(log_w, 1)
    log_px = lse - math.log(K)
    r = torch.exp(log_w - log_px.unsqueeze(1))          # w_k / mean(w), mean 1
    if K > 1:
        rel_var = (r - 1).pow(2).sum(1) / (K - 1)        # sample variance of w / mean(w)^2
        std_error = (rel_var / K).sqrt()
    else:
        std_error = torch.full((N,), float("nan"), dtype=torch.float64)
    ess = K / r.pow(2).mean(1)
    return NLLResult(K, log_px, std_error, log_w.mean(1), ess, frames.long())


# ---- a run directory: pyro-dvae evaluate --nll ---------------------------------------------------
def evaluate_run_nll(run_dir, data=None, split: str = "test", K: int = 100,
                     out=None, which: str = "best", seed: int = 0,
                     chunk_frames: int = 32768, progress: bool = False,
                     device="cpu") -> Dict[str, Any]:
    """``pyro-dvae evaluate --nll``: the bound of :func:`evaluate_nll` on every whole sequence of
    ``split`` of ``data`` (default: the data the run was trained on, from its config.json) for the
    ``which`` weights of ``run_dir``: the whole sequences of an array file
    (:func:`pyro_dvae.data.load_array_sequences`, with their inputs u in driven mode), or one
    sequence per utterance of audio data (silence trimmed, as
    :func:`pyro_dvae.data.load_utterances`).  Writes the summary and the per-sequence values to
    ``out`` (default ``RUN_DIR/nll_<split>.json``, atomically) and returns them with ``json`` added.
    The model runs on ``device``.
    """
    from pathlib import Path

    from .data import is_array_file, load_array_sequences, load_utterances
    from .train import load_run, write_json

    run_dir = Path(run_dir)
    model, guide, config = load_run(run_dir, which, device)
    if data is None:
        data = config.get("data")
    if is_array_file(data):
        sequences = load_array_sequences(data, split)
        names, x_dim = list(sequences.names), sequences.x.shape[-1]
    else:
        utterances = load_utterances(data, split, progress=progress)
        names = [u.name for u in utterances]
        sequences = [u.power for u in utterances]
        x_dim = sequences[0].shape[-1]
    if x_dim != model.x_dim:
        raise ValueError(f"{split} data has {x_dim} features per frame, the run's model was "
                         f"trained on {model.x_dim}")
    result = evaluate_nll(model, guide, sequences, K, seed=seed, chunk_frames=chunk_frames,
                          progress=progress)
    record = {"run": str(run_dir), "model": config.get("model"), "guide": config.get("guide"),
              "checkpoint": f"{which}.pt", "data": None if data is None else str(data),
              "split": split, "seed": seed, "names": names, **result.to_dict()}
    out = run_dir / f"nll_{split}.json" if out is None else Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, out)
    record["json"] = str(out)
    return record
