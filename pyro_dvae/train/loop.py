"""The SVI loop: :func:`fit` and the :class:`TrainingRun` it drives, epoch by epoch, batch by batch.

Each step is what ``pyro.infer.SVI(model.model, guide, pyro.optim.Adam(...), Trace_ELBO()).step``
does -- the ELBO's ``differentiable_loss``, backward, an Adam step -- written out so that the
optimiser is a plain ``torch.optim.Adam`` whose state is a tensors-only ``state_dict``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

import pyro

from ..allocator import retain_freed_memory
from ..atomic import remove_orphans
from ..models.base import fused_sites
from ..precision import autocast
from . import distributed
from .batches import (check_data, device_of, epoch_permutation, frames, iterate_batches,
                      parameters, to_device)
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, best_checkpoint, check_resumable,
                         copy_state, load_checkpoint, load_state, run_config, save_checkpoint,
                         write_json)
from .config import ELBOS, TrainConfig, as_config, kl_beta
from .history import epoch_line, log, new_history, plot_history, progress_bar, record_epoch
from .interrupt import InterruptFlag, TrainingInterrupted
from .rundir import RunFolderLock, describe_holder
from .validation import evaluate_loss

_STATE_KEYS = ("epoch", "step", "partial_loss", "partial_frames", "best_val_loss", "bad_epochs")


def fit(model, guide, train_set, val_set, config: Union[TrainConfig, dict, None] = None,
        out_dir: Union[str, Path] = "run", resume: bool = False, progress: bool = True,
        meta: Optional[Dict[str, Any]] = None) -> dict:
    """Train ``model`` (a :class:`~pyro_dvae.models.base.DVAE`) and ``guide`` by SVI.

    While it runs, the run folder is locked (:class:`~pyro_dvae.train.rundir.RunFolderLock`; a
    second run there raises :class:`~pyro_dvae.train.rundir.RunFolderBusy`).  Ctrl-C and SIGTERM
    save ``last.pt`` at the position in the epoch and raise :class:`TrainingInterrupted`; a file
    that cannot be written (a full disk) raises :class:`CheckpointError`, leaving the previous
    ``last.pt`` in place.

    ``train_set`` / ``val_set``: data sets of (x, mask) items, x (T, F), mask (T,) bool (for example
    :class:`pyro_dvae.data.SequenceDataset`); ``val_set=None`` early-stops on the training loss.
    ``out_dir`` receives config.json, history.json, loss.png, best.pt, last.pt (:mod:`pyro_dvae.
    train`).  ``resume=True`` continues the run in ``out_dir`` from its ``last.pt`` (same model,
    guide and trajectory settings; ``epochs`` and ``patience`` may grow).  ``meta`` is merged into
    config.json.  Returns the history dict (as in history.json).  Launched by torchrun (``WORLD_SIZE`` > 1), or with a
    process group initialised, it trains data-parallel with DDP, ``batch_size`` per process
    (:mod:`pyro_dvae.train.distributed`; a lost process raises its ``DistributedError``).
    The process's malloc keeps freed memory for the next step (:mod:`pyro_dvae.allocator`).
    """
    config = as_config(config)
    if len(train_set) == 0:
        raise ValueError("fit: the training set is empty")
    for name, dataset in (("training", train_set), ("validation", val_set)):
        check_data(model, dataset, name)
    retain_freed_memory()
    if config.threads:
        torch.set_num_threads(config.threads)
    run = TrainingRun(model, guide, train_set, val_set, config, Path(out_dir), progress)
    with run.interrupt, run.folder_lock():
        if resume:
            run.resume()
        else:
            run.start(meta)
        run.prepare_loss(seed=None if resume else config.seed)
        if not resume:  # resumable from the first batch on (last.pt is never missing)
            run.save_last()
            run.publish()
        return run.train()


class TrainingRun:
    """One training run of :func:`fit`: model, guide, optimiser, and the state ``st`` (epoch,
    batch position, running loss sums, best loss, patience counter) and ``history`` that
    ``last.pt`` saves.  Under torchrun ``par`` is the :class:`~pyro_dvae.train.distributed.
    DataParallel` context (``None`` for one process); only the writer (rank 0) writes and prints.
    """

    def __init__(self, model, guide, train_set, val_set, config: TrainConfig, out: Path,
                 progress: bool):
        self.model, self.guide, self.train_set, self.val_set = model, guide, train_set, val_set
        self.config, self.out = config, out
        # torchrun (WORLD_SIZE > 1): data-parallel training, see .distributed; else None
        self.par = distributed.setup(model, guide)
        self.writer = self.par is None or self.par.is_writer  # only rank 0 writes and prints
        self.progress = progress and self.writer
        self.params = parameters(model, guide)
        self.device = device_of(self.params)
        self.optim = torch.optim.Adam(self.params, lr=config.lr)
        self.last_path, self.best_path = out / "last.pt", out / "best.pt"
        self.st: Dict[str, Any] = {}
        self.history: Dict[str, Any] = {}
        # where a hard interrupt may save from: the RNG state before the batch, or None while
        # Adam is updating the parameters (no consistent state to save)
        self.safe_rng: Optional[torch.Tensor] = None
        self.bar = None
        notice = None if self.par is None else (
            f"pyro-dvae: rank {self.par.rank} of {self.par.world_size}: {{signal}} received; "
            "stopping after this batch (torchrun sends SIGTERM to every process when one of "
            "them fails: see the first error)")
        self.interrupt = InterruptFlag(notice)
        self.checked_params = False
        self.saved_at: Optional[tuple] = None  # (epoch, step) of the last.pt on disk

    @property
    def world_size(self) -> int:
        return 1 if self.par is None else self.par.world_size

    # ---- the start ------------------------------------------------------------------------------
    def start(self, meta: Optional[Dict[str, Any]]) -> None:
        """A fresh run: seed, empty history, ``config.json``."""
        if self.last_path.exists():
            raise CheckpointError(f"{self.out}: already holds a run (last.pt); resume it or "
                                  "choose another output directory")
        pyro.set_rng_seed(self.config.seed)
        self.st = {"epoch": 0, "step": 0, "partial_loss": 0.0, "partial_frames": 0,
                   "best_val_loss": math.inf, "bad_epochs": 0}
        self.history = new_history(self.model, self.guide)
        if self.writer:
            meta = meta if self.par is None else {**(meta or {}), **self.par.meta(self.config)}
            with self.writing(self.out / "config.json"):
                write_json(run_config(self.model, self.guide, self.config, meta),
                           self.out / "config.json")

    def resume(self) -> None:
        """Continue from ``last.pt``: weights, optimiser, RNG, position and history."""
        if not self.last_path.is_file():
            raise CheckpointError(f"{self.out}: no last.pt to resume from")
        ckpt = load_checkpoint(self.last_path)
        check_resumable(ckpt, self.model, self.guide, self.config, self.world_size,
                        self.last_path)
        load_state(self.model, ckpt["model"], "model", self.last_path)
        load_state(self.guide, ckpt["guide"], "guide", self.last_path)
        self.optim.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_state"])
        if self.device.type == "cuda" and "cuda_rng_state" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng_state"], self.device)
        self.st = {k: ckpt[k] for k in _STATE_KEYS}
        self.saved_at = (self.st["epoch"], self.st["step"])
        self.history = ckpt["history"]
        self.history.pop("error", None)
        self.history["status"] = "running"
        if self.par is not None:
            self.par.resume(ckpt, self.st, self.last_path)  # this rank's RNG stream
        cfg_path = self.out / "config.json"
        if self.writer and cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            cfg["train"] = asdict(self.config)
            with self.writing(cfg_path):
                write_json(cfg, cfg_path)

    def prepare_loss(self, seed: Optional[int]) -> None:
        """The loss of a training step, ``step_loss(x, u, mask, num_sequences, beta)``; under
        torchrun Pyro's ELBO module of (model, guide) in DDP (gradients averaged across ranks),
        its RNG stream seeded from ``seed`` (``None``: resumed)."""
        elbo = ELBOS[self.config.elbo]()
        if self.par is None:
            model, guide = self.model, self.guide
            loss = lambda *args: elbo.differentiable_loss(model.model, guide, *args)  # noqa: E731
        else:
            loss = self.par.prepare(self.model, self.guide, elbo, self.train_set,
                                    self.config.batch_size, seed)
        precision, device = self.config.precision, self.device

        def step_loss(*args):
            # one site per family (same loss, fewer Pyro sites); the forward pass in `precision`
            with fused_sites(), autocast(precision, device):
                return loss(*args)

        self.step_loss = step_loss

    # ---- files ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def folder_lock(self):
        """The run folder's lock (the writer only), taken over from a dead holder if need be;
        then the temporary files dead processes left there are removed."""
        if not self.writer:
            yield
            return
        with RunFolderLock(self.out) as lock:
            removed = remove_orphans(self.out)
            if self.progress and (lock.previous or removed):
                log(f"{self.out}: " + (f"took over the lock of {describe_holder(lock.previous)}, "
                                       "which no longer runs" if lock.previous else "")
                    + ("; " if lock.previous and removed else "")
                    + (f"removed {len(removed)} temporary files it left" if removed else ""))
            yield

    @contextlib.contextmanager
    def writing(self, path: Path):
        """Writing a file of the run: a second Ctrl-C waits until it is complete, and a failed
        write (a full disk) becomes a one-line :class:`CheckpointError`."""
        with self.interrupt.deferred(final=self.history.get("status") == "interrupted"):
            try:
                yield
            except OSError as e:
                where = ("no last.pt was saved" if self.saved_at is None else
                         f"{self.last_path} keeps the state of epoch {self.saved_at[0] + 1} "
                         f"after {self.saved_at[1]} batches: free some space, then continue "
                         "with --resume")
                raise CheckpointError(f"cannot write {path}: {e.strerror or e}; {where}") \
                    from None

    def snapshot(self, rng_state: torch.Tensor) -> dict:
        """The content of ``last.pt``."""
        ck = {"format": CHECKPOINT_FORMAT, "model_name": self.model.name,
              "guide_name": self.guide.name, "model": copy_state(self.model),
              "guide": copy_state(self.guide), "optimizer": self.optim.state_dict(),
              "rng_state": rng_state, "train_config": asdict(self.config),
              "history": self.history}
        if self.device.type == "cuda":
            ck["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        ck.update(self.st)
        return ck

    def save_last(self, rng_state: Optional[torch.Tensor] = None) -> None:
        rng_state = torch.get_rng_state() if rng_state is None else rng_state
        extras = {} if self.par is None else self.par.checkpoint_extras(rng_state, self.st)
        if self.writer:  # (the extras are a collective: every rank takes part)
            with self.writing(self.last_path):
                save_checkpoint({**self.snapshot(rng_state), **extras}, self.last_path)
        self.saved_at = (self.st["epoch"], self.st["step"])

    def publish(self) -> None:
        """``history.json`` and ``loss.png``."""
        if not self.writer:
            return
        with self.writing(self.out / "history.json"):
            write_json(self.history, self.out / "history.json")
        if self.history["epoch"]:
            with self.writing(self.out / "loss.png"):
                plot_history(self.history, self.out / "loss.png")

    # ---- the loop -------------------------------------------------------------------------------
    def done(self) -> bool:
        return self.st["epoch"] >= self.config.epochs or (
            self.config.patience > 0 and self.st["bad_epochs"] >= self.config.patience)

    def final_status(self) -> str:
        return "finished" if self.st["epoch"] >= self.config.epochs else "early_stopped"

    def stop_requested(self) -> bool:
        """Whether Ctrl-C asked to stop (data-parallel: on some rank; all stop together)."""
        requested = self.interrupt.requested
        return requested if self.par is None else self.par.agree_to_stop(requested)

    def train(self) -> dict:
        """Train until done (epochs or early stopping); returns the history."""
        try:
            with pyro.validation_enabled(False), distributed.running(self.par, self.out, self.st):
                while not self.done():
                    self.train_epoch()
                if self.history["status"] == "running":  # resumed a run that had finished
                    self.history["status"] = self.final_status()
                    self.save_last()
                    self.publish()
                if self.par is not None:  # every rank returns once rank 0 has written all
                    self.par.barrier()
        except KeyboardInterrupt:
            self.interrupted()
        except BaseException as e:
            self.crashed(e)
            raise
        if self.par is not None:
            self.par.close()
        if self.progress and self.history["status"] == "early_stopped":
            log(f"early stopping: no improvement for {self.config.patience} epochs; best epoch "
                f"{self.history['best_epoch']} (val {self.history['best_val_loss']:.4f})")
        return self.history

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """This process's index lists of ``epoch`` (data-parallel: its share of each batch)."""
        n, b, seed = len(self.train_set), self.config.batch_size, self.config.seed
        if self.par is not None:
            return self.par.batches(n, b, seed, epoch)
        perm = epoch_permutation(n, seed, epoch).tolist()
        return [perm[i:i + b] for i in range(0, n, b)]

    def train_epoch(self) -> None:
        """The rest of the current epoch from ``st["step"]``, then its end (:meth:`end_epoch`)."""
        e = self.st["epoch"]
        frozen = _frozen(self.model, e) + _frozen(self.guide, e)
        batches = self.epoch_batches(e)
        self.model.train()
        self.guide.train()
        t0 = time.perf_counter()
        self.bar = progress_bar(self.progress, len(batches), self.st["step"], e,
                                self.config.epochs)
        for x, mask, u in iterate_batches(self.train_set, batches[self.st["step"]:],
                                          self.config.num_workers):
            self.train_step(x, mask, u, e, len(batches), frozen)
            if self.stop_requested():
                raise KeyboardInterrupt
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.end_epoch(e, len(batches), t0)
        if self.stop_requested():
            raise KeyboardInterrupt

    def train_step(self, x, mask, u, e: int, num_batches: int,
                   frozen: List[nn.Parameter]) -> None:
        """One SVI step on the batch (x, mask, u) of epoch ``e`` (``u`` None: undriven)."""
        st, config = self.st, self.config
        self.safe_rng = torch.get_rng_state()
        beta = kl_beta(e * num_batches + st["step"], num_batches, config.kl_warmup)
        x, mask, u = to_device(x, mask, u, self.device)
        # the plate scales the batch's loss to the data set: loss = N/b * sum; the objective
        # divides by N x T (per frame of a batch, as the reference does)
        n = len(self.train_set)
        scale = max(n, x.shape[0])
        self.optim.zero_grad(set_to_none=True)
        if not self.checked_params:
            loss = _checked_loss(self.step_loss, x, u, mask, n, beta, self.params)
            self.checked_params = True
        else:
            loss = self.step_loss(x, u, mask, n, beta)
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(
                f"non-finite loss ({float(loss.detach())}) in epoch {e + 1}, batch "
                f"{st['step'] + 1}; the weights were not updated with it")
        (loss / (scale * x.shape[1])).backward()
        for p in frozen:
            p.grad = None
        self.check_gradients(e, st["step"])
        if config.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, config.clip_norm)
        self.safe_rng = None
        self.optim.step()
        st["step"] += 1
        st["partial_loss"] += float(loss.detach()) * x.shape[0] / scale
        st["partial_frames"] += frames(x, mask)
        self.safe_rng = torch.get_rng_state()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{st['partial_loss'] / st['partial_frames']:.4f}")

    def check_gradients(self, e: int, step: int) -> None:
        """Raise FloatingPointError, before Adam updates anything, if a gradient is NaN or
        infinite (a finite loss can have them, e.g. through a degenerate decomposition)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        # element-wise (a norm of large finite gradients can overflow), one sync for all
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return
        named = [(f"{what}.{name}", p) for what, m in (("model", self.model), ("guide", self.guide))
                 for name, p in m.named_parameters()]
        bad = list(dict.fromkeys(name for name, p in named if p.grad is not None
                                 and not bool(torch.isfinite(p.grad).all())))
        raise FloatingPointError(
            f"non-finite gradient of {len(bad)} parameters ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}) with a finite loss in epoch {e + 1}, batch "
            f"{step + 1}; the weights were not updated with it")

    def validation_loss(self) -> Optional[float]:
        if self.val_set is None:
            return None
        c = self.config
        loss = evaluate_loss if self.par is None else self.par.evaluate_loss
        return loss(self.model, self.guide, self.val_set, c.elbo, c.batch_size, seed=c.seed,
                    num_workers=c.num_workers)

    def end_epoch(self, e: int, num_batches: int, t0: float) -> None:
        """Validation, best weights, early stopping, ``last.pt``, history and the log line."""
        st, history, config = self.st, self.history, self.config
        if self.par is not None:  # the epoch's sums over all ranks
            self.par.reduce_partials(st)
        train_loss = st["partial_loss"] / max(st["partial_frames"], 1)
        val_loss = self.validation_loss()  # (interruptible: nothing has changed yet)
        monitored = train_loss if val_loss is None else val_loss
        beta = kl_beta((e + 1) * num_batches - 1, num_batches, config.kl_warmup)
        with self.interrupt.deferred():  # the state moves to the next epoch as one step
            record_epoch(history, e + 1, train_loss, val_loss, beta, time.perf_counter() - t0)
            improved = self.update_best(e, monitored)
            if self.par is not None:  # rank 0 decides, every rank follows (and stops with it)
                improved = self.par.follow_rank0(st, history, improved)
            st.update(epoch=e + 1, step=0, partial_loss=0.0, partial_frames=0)
            if self.done():
                history["status"] = self.final_status()
            self.save_last()
            self.publish()
        if self.progress:
            log(epoch_line(history, improved, st["bad_epochs"], config.epochs, config.patience,
                           config.kl_warmup))

    def update_best(self, e: int, monitored: float) -> bool:
        """Keep the best weights (``best.pt``) and count epochs without improvement; warm-up
        epochs optimise a beta-weighted bound: they do not count for patience."""
        st = self.st
        if monitored < st["best_val_loss"]:
            st["best_val_loss"] = monitored
            st["bad_epochs"] = 0
            self.history["best_epoch"], self.history["best_val_loss"] = e + 1, monitored
            if self.writer:
                with self.writing(self.best_path):
                    save_checkpoint(best_checkpoint(self.model, self.guide, e + 1, monitored),
                                    self.best_path)
            return True
        if e >= self.config.kl_warmup:
            st["bad_epochs"] += 1
        return False

    def interrupted(self) -> None:
        """After Ctrl-C: save ``last.pt`` where that is consistent, raise
        :class:`TrainingInterrupted`."""
        if self.bar is not None:
            self.bar.close()
        self.history["status"] = "interrupted"
        # data-parallel: only a stop all ranks agreed on has a consistent state to save
        par = self.par
        saved = self.safe_rng is not None and (par is None or par.stopped_together)
        if saved:  # (a further Ctrl-C waits for the files: nothing is left half-written)
            self.save_last(self.safe_rng)
            self.publish()
        if par is not None and par.stopped_together:
            par.close()
        raise TrainingInterrupted(self.out, self.st["epoch"], self.st["step"], saved,
                                  self.interrupt.signum) from None

    def crashed(self, error: BaseException) -> None:
        """After an error: clear the progress bar's line (the error message gets a line of its
        own), and tell ``history.json`` that the run crashed and why (if it can be written)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.writer or not self.history:
            return
        text = str(error).strip()
        self.history["status"] = "crashed"
        self.history["error"] = text.splitlines()[0] if text else type(error).__name__
        try:
            with self.interrupt.deferred(final=True):
                write_json(self.history, self.out / "history.json")
        except (OSError, KeyboardInterrupt):
            pass


def _checked_loss(step_loss, x, u, mask, n, beta, params):
    """The first loss ``step_loss(x, u, mask, n, beta)``, traced to check that every Pyro
    parameter is a module parameter (the optimiser and the checkpoints only know those)."""
    with pyro.poutine.trace(param_only=True) as capture:
        loss = step_loss(x, u, mask, n, beta)
    known = {id(p) for p in params}
    stray = [name for name, site in capture.trace.nodes.items()
             if id(site["value"].unconstrained()) not in known]
    if stray:
        raise ValueError("fit: these Pyro parameters are not nn.Module parameters of the model "
                         f"or guide, so they would not be trained or saved: {', '.join(stray[:5])}")
    return loss


def _frozen(module, epoch: int) -> List[nn.Parameter]:
    hook = getattr(module, "frozen_parameters", None)
    if hook is None:
        return []
    names = set(hook(epoch) or ())
    named = dict(module.named_parameters())
    unknown = sorted(names - set(named))
    if unknown:
        raise ValueError(f"{type(module).__name__}.frozen_parameters({epoch}) names parameters "
                         f"that do not exist: {', '.join(unknown[:5])}")
    return [named[n] for n in sorted(names)]
