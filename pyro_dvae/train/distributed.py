"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node N -m pyro_dvae.cli fit ...`` starts N processes (ranks) with the
environment variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`pyro_dvae.train.fit` sees ``WORLD_SIZE > 1`` (or a process group the caller
initialised) and trains one model with PyTorch's ``DistributedDataParallel`` (DDP).  Every hook it
uses lives here; with one process :func:`setup` returns ``None`` and ``fit`` runs exactly as before.

What a data-parallel run does (the pattern of Pyro's Lightning and Horovod examples):

- Process group: backend ``nccl`` when the model is on a CUDA device (each rank then uses
  ``cuda:LOCAL_RANK``), ``gloo`` on the CPU.  Every collective has a timeout
  (``$PYRO_DVAE_DIST_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT`): a rank that dies or hangs
  makes the others stop with a one-line :class:`DistributedError` instead of waiting forever.
- The ELBO as an ``nn.Module``: ``Trace_ELBO()(model, guide)`` (Pyro's ``ELBOModule``) wrapped in
  DDP, so the loss of every step goes through DDP's forward and the gradients are averaged across
  ranks during ``backward``; the torch ``Adam`` of :func:`fit` steps the module parameters, which
  are the ones DDP synchronises and the checkpoints save (``module_local_params=True`` is set while
  training, so a ``PyroModule`` part would keep its parameters local as well).  DDP broadcasts rank
  0's initial weights, so every rank starts from the same parameters and, given bit-identical
  averaged gradients, stays identical.
- Data: one shuffle per epoch, ``epoch_permutation(n, seed, epoch)`` -- seeded by the epoch, the
  same order a single-process run uses -- cut into global batches of ``batch_size x world_size``
  sequences; rank r takes every world_size-th sequence of each global batch
  (:class:`DistributedBatchSampler`, the rule of ``torch.utils.data.DistributedSampler``, which also
  pads the epoch with its first few sequences to a multiple of the world size).  ``batch_size`` is
  the per-rank batch; the effective batch is ``batch_size x world_size``.
- ELBO scale: each rank's batch plate is its own batch, given explicitly (``subsample=arange(b)``;
  Pyro's own subsampling would draw the same indices on every rank) inside a plate of size N (the
  data-set size), so each rank's loss is an unbiased estimate (N / b) sum_b of the whole data
  set's negative ELBO.  DDP averages the ranks' gradients, which gives exactly the gradient of
  (N / B) sum_B over the global batch B = b x world_size: the objective -- and with it the
  meaning of the learning rate -- is the one a single process with batch B optimises.
- Noise: every rank draws the guide's samples from its own RNG stream (:func:`rank_seed`); the
  checkpoint keeps all ranks' RNG states, so ``--resume`` continues each stream exactly.
- Validation: the validation set's batches (``batch_size`` sequences each, in order) are dealt
  round-robin to the ranks; batch k is evaluated with its own seed (:func:`batch_seed`), so the
  summed loss and frame count (reduced across ranks) do not depend on the world size.
- Decisions: the training loss sums are reduced across ranks; rank 0 decides best epoch, patience
  and early stopping, and broadcasts them (every rank stops after the same epoch); a Ctrl-C stops
  all ranks after the same batch (one small all-reduce per step).
- Files: only rank 0 writes (config.json, history.json, loss.png, best.pt, last.pt) and prints.
  ``--resume``: every rank loads the same ``last.pt`` (the run directory must be visible to all
  ranks, for example on a shared file system), which must come from a run with the same number of
  processes; the sampler continues at the saved epoch and batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import pyro

from .batches import epoch_permutation, iterate_batches, parameters, to_device
from .checkpoint import CheckpointError
from .validation import loss_sums

#: environment variable with the collective timeout in seconds
TIMEOUT_ENV = "PYRO_DVAE_DIST_TIMEOUT"
#: default timeout of every collective (seconds): how long a rank waits for a dead or hung peer
DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """A data-parallel run cannot go on (a rank died or hung, or the launch is inconsistent);
    the message is one line."""


# ---- seeds ---------------------------------------------------------------------------------------
def _derive(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint32)[0])


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s RNG stream (the guide's noise) in a run with seed ``seed``."""
    return _derive(seed, rank, 0x5EED)


def batch_seed(seed: int, k: int) -> int:
    """Seed of the validation batch ``k`` (0-based) in a data-parallel run."""
    return _derive(seed, k, 0xE7A1)


# ---- environment ---------------------------------------------------------------------------------
def _env_int(name: str, default: Optional[int] = None) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") \
            from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by torchrun), 1 when unset."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """``RANK`` from the environment (set by torchrun), 0 when unset: the CLI prints on rank 0
    only, before the process group exists."""
    return _env_int("RANK", 0)


def exit_now(message: str, code: int = 1) -> None:
    """Print ``message`` to stderr and end the process at once (``os._exit``): after a failed
    collective the process group's destructor may wait for, or abort on, a hung peer."""
    import sys

    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def timeout_seconds() -> float:
    """The collective timeout: ``$PYRO_DVAE_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT`."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise DistributedError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes of the process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes files and prints: rank 0 (or the only process)."""
    return rank() == 0


# ---- the sampler ---------------------------------------------------------------------------------
class DistributedBatchSampler(torch.utils.data.Sampler):
    """Rank ``rank``'s share of every global batch of an epoch (a batch sampler of index lists).

    The epoch's order is ``epoch_permutation(n, seed, epoch)`` (:func:`pyro_dvae.train.
    epoch_permutation`, seeded by the epoch; call :meth:`set_epoch` before each epoch), padded as
    ``torch.utils.data.DistributedSampler`` pads (with its first sequences, to a multiple of
    ``world_size``) and cut into global batches of ``batch_size x world_size``; rank r takes
    positions r, r + world_size, ... of each, so all ranks' batches of a step have the same size
    and together form the global batch.  ``len()`` is the number of steps of an epoch.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int = 0):
        if n < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"DistributedBatchSampler: bad arguments n={n}, "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.rank, self.world_size, self.seed = \
            n, batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_batches(self) -> List[List[int]]:
        """The epoch's global batches (every rank's sequences of each step, padded order)."""
        order = epoch_permutation(self.n, self.seed, self.epoch).tolist()
        total = -(-self.n // self.world_size) * self.world_size
        while len(order) < total:  # pad like DistributedSampler (wraps if n < world_size)
            order += order[:total - len(order)]
        gb = self.global_batch_size
        return [order[i:i + gb] for i in range(0, total, gb)]

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.global_batches():
            yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        total = -(-self.n // self.world_size) * self.world_size
        return -(-total // self.global_batch_size)


# ---- validation ----------------------------------------------------------------------------------
@torch.no_grad()
def sharded_loss_sums(model, guide, dataset, elbo: str = "trace", batch_size: int = 32,
                      seed: int = 0, num_workers: int = 0, rank: int = 0,
                      world_size: int = 1) -> Tuple[float, int]:
    """(sum of the negative VLB, number of unmasked frames) over this rank's validation batches.

    The batches are ``batch_size`` consecutive sequences; rank r evaluates batches r,
    r + world_size, ..., batch k with the RNG seeded by :func:`batch_seed` (seed, k) (beta = 1, one
    ELBO sample per sequence).  Summed over the ranks, the result does not depend on
    ``world_size``; the training RNG is left untouched.
    """
    n = len(dataset)
    ks = list(range(rank, -(-n // batch_size), world_size))
    batches = [list(range(k * batch_size, min((k + 1) * batch_size, n))) for k in ks]
    return loss_sums(model, guide, dataset, batches, elbo, num_workers,
                     batch_seeds=[batch_seed(seed, k) for k in ks])


# ---- the data-parallel context -------------------------------------------------------------------
class DataParallel:
    """The state of one rank of a data-parallel run and the collectives :func:`fit` needs.

    Made by :func:`setup`; ``rank``, ``world_size``, ``local_rank``, ``backend``, ``device``.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, backend: str,
                 device: torch.device, owns_group: bool):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend, self.device, self.owns_group = backend, device, owns_group
        self.stopped_together = False
        self.ddp: Optional[nn.Module] = None

    def __repr__(self):
        return (f"DataParallel(rank={self.rank}, world_size={self.world_size}, "
                f"backend={self.backend!r}, device={self.device})")

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- collectives (all ranks call them in the same order) --
    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(values, dtype=dtype, device=device)

    def sum(self, *values: float) -> List[float]:
        """Sums over the ranks (float64)."""
        t = self._tensor(list(values))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank."""
        t = self._tensor([int(bool(flag))], torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, *values: float) -> List[float]:
        """Rank 0's ``values`` on every rank (float64)."""
        t = self._tensor(list(values))
        dist.broadcast(t, src=0)
        return t.tolist()

    def barrier(self) -> None:
        self.sum(0.0)  # an all-reduce: a barrier that honours the process group's timeout

    # -- the hooks of fit --
    def prepare(self, model: nn.Module, guide: nn.Module, elbo, train_set, batch_size: int,
                seed: Optional[int]):
        """Wrap Pyro's ELBO module of (model, guide) in DDP (broadcasting rank 0's weights) and
        return the loss function ``loss(x, u, mask, num_sequences, beta)`` of a training step.
        ``seed`` (fresh runs): seed this rank's RNG stream with :func:`rank_seed`; ``None``
        (resumed runs) keeps the state :meth:`resume` restored."""
        from torch.nn.parallel import DistributedDataParallel

        module = elbo(model, guide)  # pyro.infer.elbo.ELBOModule: forward = differentiable_loss
        # DDP fails at the second step if a parameter gets no gradient; find out (any rank) and
        # let DDP look for unused parameters only then (it costs a graph traversal per step)
        params = [p for p in parameters(model, guide) if p.requires_grad]
        first = list(range(min(batch_size, len(train_set))))
        x, mask, u = to_device(*next(iterate_batches(train_set, [first])), self.device)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), pyro.validation_enabled(False), \
                pyro.settings.context(module_local_params=True):
            loss = module(x, u, mask, len(train_set), 1.0)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        unused = self.any(any(g is None for g in grads))
        self.ddp = DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=unused)
        if seed is not None:
            pyro.set_rng_seed(rank_seed(seed, self.rank))
        return self.loss

    def loss(self, *args) -> torch.Tensor:
        """The ELBO loss of this rank's batch through DDP's forward (:meth:`prepare`)."""
        return self.ddp(*args)

    def batches(self, n: int, batch_size: int, seed: int, epoch: int) -> List[List[int]]:
        """This rank's index lists of ``epoch`` (:class:`DistributedBatchSampler`)."""
        sampler = DistributedBatchSampler(n, batch_size, self.rank, self.world_size, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    def evaluate_loss(self, model, guide, dataset, elbo: str = "trace", batch_size: int = 32,
                      seed: int = 0, num_workers: int = 0) -> float:
        """Negative VLB per frame on ``dataset``, each rank evaluating its share of the batches
        (:func:`sharded_loss_sums`), reduced across ranks."""
        total, frames = self.sum(*sharded_loss_sums(model, guide, dataset, elbo, batch_size,
                                                    seed, num_workers, self.rank,
                                                    self.world_size))
        return total / max(frames, 1)

    def reduce_partials(self, st: Dict[str, Any]) -> None:
        """Replace this rank's running training-loss sums in ``st`` by the sums over all ranks."""
        loss, frames = self.sum(st["partial_loss"], st["partial_frames"])
        st["partial_loss"], st["partial_frames"] = loss, int(round(frames))

    def follow_rank0(self, st: Dict[str, Any], history: Dict[str, Any], improved: bool) -> bool:
        """Rank 0's early-stopping state (best loss, patience counter, best epoch) on every rank;
        returns rank 0's ``improved``."""
        best_epoch = history["best_epoch"]
        best, bad, best_epoch, improved = self.broadcast(
            st["best_val_loss"], st["bad_epochs"], -1 if best_epoch is None else best_epoch,
            float(improved))
        st["best_val_loss"], st["bad_epochs"] = best, int(bad)
        history["best_epoch"] = None if best_epoch < 0 else int(best_epoch)
        history["best_val_loss"] = None if best_epoch < 0 else best
        return bool(improved)

    def agree_to_stop(self, requested: bool) -> bool:
        """Whether some rank was asked to stop (Ctrl-C); all ranks then stop at the same batch."""
        if self.any(requested):
            self.stopped_together = True
            return True
        return False

    def checkpoint_extras(self, rng_state: torch.Tensor, st: Dict[str, Any]) -> Dict[str, Any]:
        """What ``last.pt`` needs beyond rank 0's state: every rank's RNG state, the world size and
        the running training-loss sums over all ranks (a collective)."""
        cuda = self.device.type == "cuda"
        mine = [rng_state, torch.cuda.get_rng_state(self.device) if cuda else None]
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        loss, frames = self.sum(st["partial_loss"], st["partial_frames"])
        extras = {"world_size": self.world_size, "rng_states": [g[0] for g in gathered],
                  "partial_loss": loss, "partial_frames": int(round(frames))}
        if cuda:
            extras["cuda_rng_states"] = [g[1] for g in gathered]
        return extras

    def resume(self, ckpt: Dict[str, Any], st: Dict[str, Any], path) -> None:
        """Continue this rank's RNG stream from ``ckpt``; the running training-loss sums of the
        checkpoint (over all ranks) stay with rank 0 only."""
        states = ckpt.get("rng_states")
        if not isinstance(states, list) or len(states) != self.world_size:
            raise CheckpointError(f"{path}: no RNG states of the {self.world_size} processes "
                                  "(not saved by a data-parallel run)")
        torch.set_rng_state(states[self.rank])
        if self.device.type == "cuda" and ckpt.get("cuda_rng_states"):
            torch.cuda.set_rng_state(ckpt["cuda_rng_states"][self.rank], self.device)
        if self.rank != 0:
            st["partial_loss"], st["partial_frames"] = 0.0, 0

    def meta(self, config) -> Dict[str, Any]:
        """What config.json records about the data-parallel run."""
        return {"distributed": {"world_size": self.world_size, "backend": self.backend,
                                "batch_size_per_rank": config.batch_size,
                                "global_batch_size": config.batch_size * self.world_size}}

    @contextlib.contextmanager
    def running(self, out_dir, st: Dict[str, Any]):
        """The training loop's context: ``module_local_params``, and a failed collective (a dead
        or hung rank) turned into a one-line :class:`DistributedError`."""
        try:
            with pyro.settings.context(module_local_params=True):
                yield self
        except DistributedError:
            raise
        except RuntimeError as e:
            if not is_communication_error(e):
                raise
            epoch = st.get("epoch", 0)
            where = (f"continue with --resume (last.pt in {out_dir} holds the state after epoch "
                     f"{epoch})" if epoch else "no checkpoint was saved yet")
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: lost contact with the other training "
                f"processes in epoch {epoch + 1} ({_short(e)}); another process exited or hung "
                f"(see its own error); {where}") from None

    def close(self) -> None:
        """Release DDP and destroy the process group if :func:`setup` created it (after a run
        that ended on all ranks together; also at exit, see :func:`setup`).  DDP goes first: a
        gloo group still referenced at interpreter exit can abort the process ("terminate called
        without an active exception")."""
        import gc

        self.ddp = None
        gc.collect()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


_COMM_PATTERNS = re.compile(r"gloo|nccl|connection (reset|closed|refused)|timed out|"
                            r"processgroup|broken pipe|socket", re.IGNORECASE)


def is_communication_error(e: BaseException) -> bool:
    """Whether ``e`` comes from a failed collective (a peer died, hung or cannot be reached)."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and bool(_COMM_PATTERNS.search(str(e)))


def _short(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/transport/tcp/pair.cc:537] "
    text = text.split(". This is typically", 1)[0]
    return text[:200].rstrip(". ")


# ---- setup ---------------------------------------------------------------------------------------
def setup(model: Optional[nn.Module] = None, guide: Optional[nn.Module] = None,
          timeout: Optional[float] = None) -> Optional[DataParallel]:
    """Join (or create) the process group of a data-parallel run; ``None`` for a single process.

    With a process group already initialised by the caller, that group is used.  Otherwise, when
    ``WORLD_SIZE`` > 1 (torchrun), the group is created from the environment (``env://``) with
    backend ``nccl`` if ``model`` is on a CUDA device (``model`` and ``guide`` then move to
    ``cuda:LOCAL_RANK``), else ``gloo``, and the collective timeout ``timeout`` seconds
    (default :func:`timeout_seconds`).  Raises :class:`DistributedError` (one line).
    """
    params = parameters(*(m for m in (model, guide) if m is not None))
    on_cuda = bool(params) and params[0].device.type == "cuda"
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        backend = str(dist.get_backend())
        local_rank = _env_int("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)
                              if on_cuda else 0)
        owns = False
    else:
        world = env_world_size()
        if world <= 1:
            return None
        if not dist.is_available():
            raise DistributedError(f"WORLD_SIZE={world}, but this torch has no torch.distributed")
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world}, but {', '.join(missing)} not set: "
                                   "launch data-parallel training with torchrun")
        local_rank = _env_int("LOCAL_RANK", 0)
        backend = "nccl" if on_cuda else "gloo"
        if backend == "nccl":
            if not dist.is_nccl_available():
                raise DistributedError("the model is on a CUDA device, but this torch has no NCCL")
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(f"LOCAL_RANK={local_rank}, but only "
                                       f"{torch.cuda.device_count()} CUDA devices are visible")
            torch.cuda.set_device(local_rank)
        seconds = timeout_seconds() if timeout is None else float(timeout)
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot join the process group of {world} processes at "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                                   f"({_short(e)})") from None
        owns = True
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
        for m in (model, guide):
            if m is not None:
                m.to(device)
    par = DataParallel(dist.get_rank(), dist.get_world_size(), local_rank, backend, device, owns)
    if owns:  # e.g. a CheckpointError after setup: still tear the group down before exit
        import atexit

        atexit.register(par.close)
    return par


def running(par: Optional[DataParallel], out_dir, st: Dict[str, Any]):
    """:meth:`DataParallel.running`, or nothing for a single process."""
    return contextlib.nullcontext() if par is None else par.running(out_dir, st)

