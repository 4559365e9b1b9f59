"""Training: stochastic variational inference on the VLB (4.22/4.24) with Adam (13.2.2).

:func:`fit` maximises the variational lower bound with Pyro's ``Trace_ELBO`` (default) or
``TraceMeanField_ELBO`` (analytic KL per time step, as the paper computes it).  Each step is what
``pyro.infer.SVI(model.model, guide, pyro.optim.Adam(...), Trace_ELBO()).step(...)`` does -- the
ELBO's ``differentiable_loss``, backward, an Adam step over the model's and the guide's parameters
-- written out so that the optimiser is a plain ``torch.optim.Adam`` whose state is a tensors-only
``state_dict``: checkpoints load with ``torch.load(..., weights_only=True)`` and ``resume``
continues exactly.  The objective is the dataset-scaled loss divided by the constant N x T (N
sequences of T frames), the reference implementation's normalisation; Adam is invariant to a
constant factor (up to its eps), so the steps are SVI's.

What a run directory holds (all files written atomically: temporary file, then ``os.replace``):

- ``config.json``: model, guide, x_dim, z_dim, u_dim, likelihood, model options, training config
  and whatever the caller adds (``meta``; the CLI adds the data path and sequence length).
- ``history.json``: per-epoch train and validation loss (negative VLB per frame, nats), beta, time,
  best epoch, status; ``loss.png`` plots it.
- ``best.pt``: copies of the weights of the epoch with the lowest validation loss.
- ``last.pt``: everything needed to continue exactly: weights, optimiser state, epoch and batch
  position, best validation loss, patience counter, history, torch RNG state.

Early stopping (13.2.2): training stops when the validation loss has not improved for ``patience``
epochs (warm-up epochs do not count).  KL warm-up: the latent terms are weighted by a beta that
rises linearly, step by step, from 0 to 1 over the first ``kl_warmup`` epochs (:func:`kl_beta`);
the validation loss always uses beta = 1.

Ctrl-C during training finishes the current batch, saves ``last.pt`` and raises
:class:`TrainingInterrupted`; ``fit(..., resume=True)`` (``pyro-dvae fit --resume``) continues from
that batch and reaches the same parameters as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

import pyro
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from . import distributed

CHECKPOINT_FORMAT = 1
ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
#: training settings that change the optimisation trajectory; a resumed run must keep them
_TRAJECTORY_FIELDS = ("batch_size", "lr", "elbo", "kl_warmup", "clip_norm", "seed")


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message is one line."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`fit` after Ctrl-C, once ``last.pt`` is saved (``saved`` says whether the
    state could be saved; ``epoch``/``step`` say where training will continue)."""

    def __init__(self, run_dir: Path, epoch: int, step: int, saved: bool = True):
        super().__init__(f"training interrupted in epoch {epoch + 1}, after {step} batches")
        self.run_dir, self.epoch, self.step, self.saved = Path(run_dir), epoch, step, saved


@dataclass
class TrainConfig:
    """Training settings (defaults from 13.2.2: Adam, lr 1e-4, batch 32, patience 20).

    The authors' released configurations used ``lr=1e-3``.  ``patience=0`` disables early stopping;
    ``kl_warmup=0`` means beta = 1 throughout; ``clip_norm=None`` no gradient clipping;
    ``threads=None`` leaves torch's thread count alone; ``num_workers`` > 0 loads batches in
    worker processes (a torch DataLoader).
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    patience: int = 20
    elbo: str = "trace"
    kl_warmup: int = 0
    clip_norm: Optional[float] = None
    seed: int = 0
    threads: Optional[int] = None
    num_workers: int = 0

    def __post_init__(self):
        checks = [
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}"),
            (self.patience >= 0,
             f"patience must be >= 0 (0 = no early stopping), got {self.patience}"),
            (self.elbo in ELBOS, f"elbo must be one of {', '.join(ELBOS)}, got {self.elbo!r}"),
            (self.kl_warmup >= 0, f"kl_warmup must be >= 0 epochs, got {self.kl_warmup}"),
            (self.clip_norm is None or self.clip_norm > 0,
             f"clip_norm must be positive, got {self.clip_norm}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.threads is None or self.threads >= 1,
             f"threads must be >= 1, got {self.threads}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def kl_beta(step: int, steps_per_epoch: int, kl_warmup: int) -> float:
    """Weight of the latent (KL) terms at 0-based optimisation ``step`` (counted over epochs):
    rises linearly from 0 (before the first step) to 1 at the last step of epoch ``kl_warmup``,
    then stays 1; ``kl_warmup=0``: always 1.  (Pyro refuses a scale of exactly 0, so the first
    step has beta = 1 / (kl_warmup x steps_per_epoch).)"""
    if kl_warmup <= 0:
        return 1.0
    return min(1.0, (step + 1) / (kl_warmup * steps_per_epoch))


# ---- files ---------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(obj: Dict[str, Any], path: Union[str, Path]) -> None:
    """``torch.save`` atomically (the file is either the old one or the complete new one)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_json(obj: Any, path: Union[str, Path]) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a checkpoint with ``torch.load(..., weights_only=True)`` (tensors and plain containers
    only, so a file cannot run code), on the CPU.  Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text:
            name = text.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in text else "?"
            raise CheckpointError(
                f"{path}: refused to load: it contains a pickled Python object ({name}); "
                "checkpoints are loaded with torch.load(weights_only=True) so that they cannot "
                "run code") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch file)") \
            from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") \
            from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path}: not a pyro-dvae checkpoint (no model weights in it)")
    return obj


def _copy_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state (never a reference to live parameters)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _load_state(module: nn.Module, state: Dict[str, torch.Tensor], what: str, path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            detail = (f"missing {', '.join(missing[:3])}" if missing else "") + \
                     ("; " if missing and extra else "") + \
                     (f"unexpected {', '.join(extra[:3])}" if extra else "")
        else:
            detail = "tensor shapes differ (" + str(e).split("size mismatch for ", 1)[-1] \
                .splitlines()[0].rstrip(".") + ")"
        raise CheckpointError(f"{path}: the {what} weights do not fit this {what}: {detail}") \
            from None


# ---- the run's description -----------------------------------------------------------------------
def run_config(model, guide, config: TrainConfig, meta: Optional[Dict[str, Any]] = None) -> dict:
    """The content of ``config.json``: what :func:`load_run` needs to rebuild model and guide."""
    cfg = {
        "model": model.name,
        "guide": guide.name,
        "x_dim": model.x_dim,
        "z_dim": model.z_dim,
        "u_dim": model.u_dim,
        "likelihood": getattr(model.likelihood, "name", None),
        "model_options": {},
        "train": asdict(config),
    }
    cfg.update(meta or {})
    from . import __version__

    cfg.setdefault("pyro_dvae_version", __version__)
    return cfg


def load_run(run_dir: Union[str, Path], which: str = "best"):
    """Rebuild the registered model and guide of a run directory and load its weights.

    ``which``: ``"best"`` (best validation loss) or ``"last"``.  Returns ``(model, guide, config)``
    with ``config`` the dict of ``config.json``; model and guide are in eval mode.  Raises
    :class:`CheckpointError` (one-line message) for a directory without ``config.json`` or weights,
    an unregistered model name, or weights of another model.
    """
    from .registry import REGISTRY, build

    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir}: no config.json, not a pyro-dvae run directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    name = config.get("model")
    if name not in REGISTRY:
        raise CheckpointError(f"{run_dir}: model {name!r} is not registered "
                              f"(registered: {', '.join(REGISTRY)})")
    ckpt_path = run_dir / f"{which}.pt"
    if not ckpt_path.is_file():
        raise CheckpointError(f"{run_dir}: no {which}.pt, no weights have been saved there yet")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("model_name") != name:
        raise CheckpointError(f"{ckpt_path}: holds weights of model {ckpt.get('model_name')!r}, "
                              f"but config.json says {name!r}")
    guide_name = config.get("guide") or REGISTRY[name].default_guide
    if guide_name not in REGISTRY[name].guides:
        raise CheckpointError(f"{run_dir}: guide {guide_name!r} is not registered for {name!r} "
                              f"(choose from {', '.join(REGISTRY[name].guides)})")
    kwargs = dict(x_dim=config["x_dim"], z_dim=config["z_dim"],
                  likelihood=config.get("likelihood") or "is", u_dim=config.get("u_dim", 0))
    kwargs.update(config.get("model_options") or {})
    model, guide = build(name, guide_name, **kwargs)
    _load_state(model, ckpt["model"], "model", ckpt_path)
    _load_state(guide, ckpt["guide"], "guide", ckpt_path)
    model.eval()
    guide.eval()
    return model, guide, config


# ---- batches -------------------------------------------------------------------------------------
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


def _to_device(x, mask, device):
    x = x.to(device)
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.bool)
        if bool(mask.all()):
            mask = None  # no padded frame: skip the masking arithmetic (identical result)
    return x, mask


def _frames(x, mask) -> int:
    return int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1]


def _parameters(*modules: nn.Module) -> List[nn.Parameter]:
    seen, params = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _device(params) -> torch.device:
    return params[0].device if params else torch.device("cpu")


@torch.no_grad()
def evaluate_loss(model, guide, dataset, elbo: str = "trace", batch_size: int = 32,
                  seed: int = 0, num_workers: int = 0) -> float:
    """Negative VLB per (unmasked) frame on ``dataset`` (beta = 1), one ELBO sample per sequence.

    Uses its own RNG stream seeded with ``seed`` (common random numbers across epochs, and the
    training RNG is left untouched).
    """
    n = len(dataset)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    total, frames = loss_sums(model, guide, dataset, batches, elbo, num_workers, seed=seed)
    return total / max(frames, 1)


def loss_sums(model, guide, dataset, batches: List[List[int]], elbo: str = "trace",
              num_workers: int = 0, seed: int = 0,
              batch_seeds: Optional[List[int]] = None) -> Tuple[float, int]:
    """(sum of the negative VLB, number of unmasked frames) over ``batches`` of ``dataset``, in eval
    mode, beta = 1, one ELBO sample per sequence, on a forked RNG (the caller's stream is left
    untouched): seeded once with ``seed``, or before each batch with ``batch_seeds``."""
    if len(dataset) == 0:
        raise ValueError("evaluate_loss: the data set is empty")
    device = _device(_parameters(model, guide))
    loss_fn = ELBOS[elbo]()
    cuda = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training, guide.training
    model.eval()
    guide.eval()
    total, frames = 0.0, 0
    try:
        with torch.random.fork_rng(devices=cuda), pyro.validation_enabled(False):
            torch.manual_seed(seed)
            for i, (x, mask) in enumerate(iterate_batches(dataset, batches, num_workers)):
                if batch_seeds is not None:
                    torch.manual_seed(batch_seeds[i])
                x, mask = _to_device(x, mask, device)
                total += float(loss_fn.differentiable_loss(model.model, guide, x, None, mask,
                                                           None, 1.0))
                frames += _frames(x, mask)
    finally:
        model.train(was_training[0])
        guide.train(was_training[1])
    return total, frames


# ---- plotting ------------------------------------------------------------------------------------
def plot_history(history: dict, path: Union[str, Path]) -> None:
    """Train and validation loss per epoch to a PNG (an Agg canvas: pyplot's backend is left
    alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ep = history["epoch"]
    warmup = any(b < 1 for b in history.get("beta", []))
    ax.plot(ep, history["train_loss"], "o-", ms=3,
            label="train (beta-weighted in warm-up)" if warmup else "train")
    if any(v is not None for v in history["val_loss"]):
        ax.plot(ep, [math.nan if v is None else v for v in history["val_loss"]], "o-", ms=3,
                label="validation")
    if history.get("best_epoch"):
        ax.axvline(history["best_epoch"], color="gray", ls=":", label="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative VLB per frame (nats)")
    ax.set_title(history.get("title", ""))
    ax.legend()
    fig.tight_layout()
    _atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))


# ---- Ctrl-C --------------------------------------------------------------------------------------
class _InterruptFlag:
    """While active (main thread only), the first Ctrl-C sets ``requested`` so training stops at
    the end of the current batch; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ---- the training loop ---------------------------------------------------------------------------
def _new_history(model, guide) -> dict:
    return {"epoch": [], "train_loss": [], "val_loss": [], "beta": [], "seconds": [],
            "best_epoch": None, "best_val_loss": None, "status": "running",
            "loss": "negative VLB per frame (nats)",
            "title": f"{model.name} / {guide.name}"}


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


def fit(model, guide, train_set, val_set, config: Union[TrainConfig, dict, None] = None,
        out_dir: Union[str, Path] = "run", resume: bool = False, progress: bool = True,
        meta: Optional[Dict[str, Any]] = None) -> dict:
    """Train ``model`` (a :class:`~pyro_dvae.models.base.DVAE`) and ``guide`` by SVI.

    ``train_set`` / ``val_set``: data sets of (x, mask) items, x (T, F), mask (T,) bool (for example
    :class:`pyro_dvae.data.SequenceDataset`); ``val_set=None`` early-stops on the training loss.
    ``out_dir`` receives config.json, history.json, loss.png, best.pt, last.pt (module docstring).
    ``resume=True`` continues the run in ``out_dir`` from its ``last.pt`` (same model, guide and
    trajectory settings; ``epochs`` and ``patience`` may grow).  ``meta`` is merged into
    config.json.  Returns the history dict (as in history.json).  Ctrl-C saves ``last.pt`` and
    raises :class:`TrainingInterrupted`.  Launched by torchrun (``WORLD_SIZE`` > 1), or with a
    process group initialised, it trains data-parallel with DDP, ``batch_size`` per process
    (:mod:`pyro_dvae.distributed`; a lost process raises its ``DistributedError``).
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    out = Path(out_dir)
    if len(train_set) == 0:
        raise ValueError("fit: the training set is empty")
    if config.threads:
        torch.set_num_threads(config.threads)
    # torchrun (WORLD_SIZE > 1): data-parallel training, see pyro_dvae.distributed; else None
    par = distributed.setup(model, guide)
    writer = par is None or par.is_writer  # only rank 0 writes files and prints
    progress = progress and writer
    params = _parameters(model, guide)
    device = _device(params)
    optim = torch.optim.Adam(params, lr=config.lr)
    last_path, best_path = out / "last.pt", out / "best.pt"

    if resume:
        ckpt = load_checkpoint(last_path) if last_path.is_file() else None
        if ckpt is None:
            raise CheckpointError(f"{out}: no last.pt to resume from")
        if (ckpt.get("model_name"), ckpt.get("guide_name")) != (model.name, guide.name):
            raise CheckpointError(
                f"{last_path}: checkpoint of model {ckpt.get('model_name')!r} with guide "
                f"{ckpt.get('guide_name')!r}, not {model.name!r} with {guide.name!r}")
        saved = ckpt.get("train_config", {})
        changed = [f"{k} ({saved.get(k)!r} -> {getattr(config, k)!r})"
                   for k in _TRAJECTORY_FIELDS if saved.get(k) != getattr(config, k)]
        procs = 1 if par is None else par.world_size
        if ckpt.get("world_size", 1) != procs:
            changed.append(f"number of processes ({ckpt.get('world_size', 1)} -> {procs})")
        if changed:
            raise CheckpointError(f"{last_path}: resuming needs the run's own settings; changed: "
                                  + ", ".join(changed))
        _load_state(model, ckpt["model"], "model", last_path)
        _load_state(guide, ckpt["guide"], "guide", last_path)
        optim.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_state"])
        if device.type == "cuda" and "cuda_rng_state" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng_state"], device)
        st = {k: ckpt[k] for k in ("epoch", "step", "partial_loss", "partial_frames",
                                   "best_val_loss", "bad_epochs")}
        history = ckpt["history"]
        if par is not None:
            par.resume(ckpt, st, last_path)  # this rank's RNG stream
        cfg_path = out / "config.json"
        if writer and cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            cfg["train"] = asdict(config)
            write_json(cfg, cfg_path)
    else:
        if last_path.exists():
            raise CheckpointError(f"{out}: already holds a run (last.pt); resume it or choose "
                                  "another output directory")
        if writer:
            out.mkdir(parents=True, exist_ok=True)
        pyro.set_rng_seed(config.seed)
        st = {"epoch": 0, "step": 0, "partial_loss": 0.0, "partial_frames": 0,
              "best_val_loss": math.inf, "bad_epochs": 0}
        history = _new_history(model, guide)
        if writer:
            write_json(run_config(model, guide, config, meta if par is None else
                                  {**(meta or {}), **par.meta(config)}), out / "config.json")

    elbo = ELBOS[config.elbo]()
    if par is None:
        def step_loss(*args):
            return elbo.differentiable_loss(model.model, guide, *args)
    else:  # Pyro's ELBO module of (model, guide) in DDP: gradients averaged across ranks
        step_loss = par.prepare(model, guide, elbo, train_set, config.batch_size,
                                None if resume else config.seed)
    n = len(train_set)
    checked_params = False

    def snapshot(rng_state) -> dict:
        ck = {"format": CHECKPOINT_FORMAT, "model_name": model.name, "guide_name": guide.name,
              "model": _copy_state(model), "guide": _copy_state(guide),
              "optimizer": optim.state_dict(), "rng_state": rng_state,
              "train_config": asdict(config), "history": history}
        if device.type == "cuda":
            ck["cuda_rng_state"] = torch.cuda.get_rng_state(device)
        ck.update(st)
        return ck

    def save_last(rng_state=None):
        rng_state = torch.get_rng_state() if rng_state is None else rng_state
        extras = {} if par is None else par.checkpoint_extras(rng_state, st)  # all ranks
        if writer:
            save_checkpoint({**snapshot(rng_state), **extras}, last_path)

    def publish():
        if not writer:
            return
        write_json(history, out / "history.json")
        if history["epoch"]:
            plot_history(history, out / "loss.png")

    def done() -> bool:
        return st["epoch"] >= config.epochs or (
            config.patience > 0 and st["bad_epochs"] >= config.patience)

    # where a hard interrupt may save from: (rng state before the batch) or None while Adam
    # is updating the parameters (no consistent state to save)
    safe_rng: List[Optional[torch.Tensor]] = [None]
    bar = None
    try:
        with _InterruptFlag() as interrupt, pyro.validation_enabled(False), \
                distributed.running(par, out, st):
            while not done():
                e = st["epoch"]
                frozen = _frozen(model, e) + _frozen(guide, e)
                perm = epoch_permutation(n, config.seed, e).tolist()
                batches = [perm[i:i + config.batch_size] for i in range(0, n, config.batch_size)]
                if par is not None:  # this rank's share of each global batch
                    batches = par.batches(n, config.batch_size, config.seed, e)
                model.train()
                guide.train()
                t0 = time.perf_counter()
                bar = _progress(progress, len(batches), st["step"], e, config.epochs)
                for x, mask in iterate_batches(train_set, batches[st["step"]:],
                                               config.num_workers):
                    safe_rng[0] = torch.get_rng_state()
                    beta = kl_beta(e * len(batches) + st["step"], len(batches), config.kl_warmup)
                    x, mask = _to_device(x, mask, device)
                    # the plate scales the batch's loss to the data set: loss = N/b * sum; the
                    # objective divides by N x T (per frame of a batch, as the reference does)
                    scale = max(n, x.shape[0])
                    optim.zero_grad(set_to_none=True)
                    if not checked_params:
                        loss = _checked_loss(step_loss, x, mask, n, beta, params)
                        checked_params = True
                    else:
                        loss = step_loss(x, None, mask, n, beta)
                    if not bool(torch.isfinite(loss.detach())):
                        raise FloatingPointError(
                            f"non-finite loss ({float(loss.detach())}) in epoch {e + 1}, batch "
                            f"{st['step'] + 1}; the weights were not updated with it")
                    (loss / (scale * x.shape[1])).backward()
                    for p in frozen:
                        p.grad = None
                    if config.clip_norm:
                        torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                    safe_rng[0] = None
                    optim.step()
                    st["step"] += 1
                    st["partial_loss"] += float(loss.detach()) * x.shape[0] / scale
                    st["partial_frames"] += _frames(x, mask)
                    safe_rng[0] = torch.get_rng_state()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{st['partial_loss'] / st['partial_frames']:.4f}")
                    if (interrupt.requested if par is None
                            else par.agree_to_stop(interrupt.requested)):
                        raise KeyboardInterrupt
                if bar is not None:
                    bar.close()
                    bar = None
                # ---- end of epoch: validation, best weights, early stopping, checkpoint
                if par is not None:  # the epoch's sums over all ranks
                    par.reduce_partials(st)
                train_loss = st["partial_loss"] / max(st["partial_frames"], 1)
                if val_set is not None:
                    val_loss = (evaluate_loss if par is None else par.evaluate_loss)(
                        model, guide, val_set, config.elbo, config.batch_size, seed=config.seed,
                        num_workers=config.num_workers)
                else:
                    val_loss = None
                monitored = train_loss if val_loss is None else val_loss
                beta = kl_beta((e + 1) * len(batches) - 1, len(batches), config.kl_warmup)
                record = {"epoch": e + 1, "train_loss": train_loss, "val_loss": val_loss,
                          "beta": beta, "seconds": time.perf_counter() - t0}
                for key, value in record.items():
                    history[key].append(value)
                # warm-up epochs optimise a beta-weighted bound: they do not count for patience
                if monitored < st["best_val_loss"]:
                    st["best_val_loss"] = monitored
                    st["bad_epochs"] = 0
                    history["best_epoch"], history["best_val_loss"] = e + 1, monitored
                    if writer:
                        save_checkpoint({"format": CHECKPOINT_FORMAT, "model_name": model.name,
                                         "guide_name": guide.name, "model": _copy_state(model),
                                         "guide": _copy_state(guide), "epoch": e + 1,
                                         "val_loss": monitored}, best_path)
                    improved = True
                else:
                    if e >= config.kl_warmup:
                        st["bad_epochs"] += 1
                    improved = False
                if par is not None:  # rank 0 decides, every rank follows (and stops with it)
                    improved = par.follow_rank0(st, history, improved)
                st.update(epoch=e + 1, step=0, partial_loss=0.0, partial_frames=0)
                if done():
                    history["status"] = ("finished" if st["epoch"] >= config.epochs
                                         else "early_stopped")
                save_last()
                publish()
                if progress:
                    _log(f"epoch {e + 1}/{config.epochs}  train {train_loss:.4f}  "
                         + ("" if val_loss is None else f"val {val_loss:.4f}  ")
                         + ("(best)  " if improved else f"(no improvement {st['bad_epochs']}"
                            f"/{config.patience})  ")
                         + (f"beta {beta:.2f}  " if config.kl_warmup else "")
                         + f"{history['seconds'][-1]:.1f} s")
                if (interrupt.requested if par is None
                        else par.agree_to_stop(interrupt.requested)):
                    raise KeyboardInterrupt
            if history["status"] == "running":   # resumed a run that had already finished
                history["status"] = ("finished" if st["epoch"] >= config.epochs
                                     else "early_stopped")
                save_last()
                publish()
            if par is not None:  # every rank returns once rank 0 has written everything
                par.barrier()
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        history["status"] = "interrupted"
        # data-parallel: only a stop all ranks agreed on has a consistent state to save
        saved = safe_rng[0] is not None and (par is None or par.stopped_together)
        if saved:
            save_last(safe_rng[0])
            publish()
        if par is not None and par.stopped_together:
            par.close()
        raise TrainingInterrupted(out, st["epoch"], st["step"], saved) from None
    if par is not None:
        par.close()
    if progress and history["status"] == "early_stopped":
        _log(f"early stopping: no improvement for {config.patience} epochs; best epoch "
             f"{history['best_epoch']} (val {history['best_val_loss']:.4f})")
    return history


def _checked_loss(step_loss, x, mask, n, beta, params):
    """The first loss ``step_loss(x, None, mask, n, beta)``, traced to check that every Pyro
    parameter is a module parameter (the optimiser and the checkpoints only know those)."""
    with pyro.poutine.trace(param_only=True) as capture:
        loss = step_loss(x, None, mask, n, beta)
    known = {id(p) for p in params}
    stray = [name for name, site in capture.trace.nodes.items()
             if id(site["value"].unconstrained()) not in known]
    if stray:
        raise ValueError("fit: these Pyro parameters are not nn.Module parameters of the model "
                         f"or guide, so they would not be trained or saved: {', '.join(stray[:5])}")
    return loss


def _progress(enabled: bool, total: int, initial: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                leave=False, dynamic_ncols=True)


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message)
