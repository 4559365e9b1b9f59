"""Checkpoint files and the run's description: ``last.pt`` / ``best.pt`` (tensors only, loaded with
``weights_only=True``), ``config.json``, and :func:`load_run` to rebuild a trained model."""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..atomic import atomic_write
from .config import TRAJECTORY_FIELDS, TrainConfig

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message is one line."""


def save_checkpoint(obj: Dict[str, Any], path: Union[str, Path]) -> None:
    """``torch.save`` atomically (the file is either the old one or the complete new one)."""
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_json(obj: Any, path: Union[str, Path]) -> None:
    """``obj`` as indented JSON, written atomically."""
    atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


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
        # torch words it "Unsupported global: GLOBAL x.Y" or "unsupported GLOBAL posix.system"
        if "unsupported global" in text.lower():
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


def copy_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state (never a reference to live parameters)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def load_state(module: nn.Module, state: Dict[str, torch.Tensor], what: str, path) -> None:
    """``module.load_state_dict(state)``; weights that do not fit raise :class:`CheckpointError`
    naming the missing, unexpected or mis-shaped tensors."""
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


def best_checkpoint(model, guide, epoch: int, val_loss: float) -> Dict[str, Any]:
    """The content of ``best.pt``: copies of the weights of ``epoch`` and its monitored loss."""
    return {"format": CHECKPOINT_FORMAT, "model_name": model.name, "guide_name": guide.name,
            "model": copy_state(model), "guide": copy_state(guide), "epoch": epoch,
            "val_loss": val_loss}


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
    if getattr(model, "arch", None):  # the resolved architecture options, defaults included
        from ..nn import architecture_json

        cfg["architecture"] = architecture_json(model.arch)
    cfg.update(meta or {})
    from .. import __version__

    cfg.setdefault("pyro_dvae_version", __version__)
    return cfg


def _read_config(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir}: no config.json, not a pyro-dvae run directory")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


#: models whose first-step conventions or concatenation orders became the authors' (DVAE-speech)
#: in the "conventions" change; runs written before it have no "architecture" in config.json
CONVENTIONS_CHANGED = ("srnn", "storn", "vrnn", "rvae-causal", "rvae-noncausal")


def load_run(run_dir: Union[str, Path], which: str = "best",
             device: Union[str, torch.device] = "cpu"):
    """Rebuild the registered model and guide of a run directory and load its weights.

    ``which``: ``"best"`` (best validation loss) or ``"last"``.  Returns ``(model, guide, config)``
    with ``config`` the dict of ``config.json``; model and guide are in eval mode, on ``device``.
    Raises :class:`CheckpointError` (one-line message) for a directory without ``config.json`` or
    weights, an unregistered model name, or weights of another model.
    """
    from ..registry import REGISTRY, build

    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    config = _read_config(run_dir)
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
    if name in CONVENTIONS_CHANGED and "architecture" not in config:
        warnings.warn(f"{run_dir} was written before pyro-dvae's {name} took the authors' "
                      "first-step conventions and concatenation orders: its weights load, but "
                      "the model they now define is not the one that was trained; retrain it",
                      stacklevel=2)
    guide_name = config.get("guide") or REGISTRY[name].default_guide
    if guide_name not in REGISTRY[name].guides:
        raise CheckpointError(f"{run_dir}: guide {guide_name!r} is not registered for {name!r} "
                              f"(choose from {', '.join(REGISTRY[name].guides)})")
    kwargs = dict(x_dim=config["x_dim"], z_dim=config["z_dim"],
                  likelihood=config.get("likelihood") or "is", u_dim=config.get("u_dim", 0))
    kwargs.update(config.get("model_options") or {})
    try:
        model, guide = build(name, guide_name, **kwargs)
    except (TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{run_dir}: config.json does not describe a buildable {name} "
                              f"({first})") from None
    load_state(model, ckpt["model"], "model", ckpt_path)
    load_state(guide, ckpt["guide"], "guide", ckpt_path)
    model.to(device)
    guide.to(device)
    model.eval()
    guide.eval()
    return model, guide, config


def check_resumable(ckpt: Dict[str, Any], model, guide, config: TrainConfig, world_size: int,
                    path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``last.pt`` content ``ckpt`` comes from a run of the
    same model and guide with the same trajectory settings and number of processes."""
    if (ckpt.get("model_name"), ckpt.get("guide_name")) != (model.name, guide.name):
        raise CheckpointError(
            f"{path}: checkpoint of model {ckpt.get('model_name')!r} with guide "
            f"{ckpt.get('guide_name')!r}, not {model.name!r} with {guide.name!r}")
    saved = ckpt.get("train_config", {})
    old = {k: saved.get(k, TrainConfig.default(k)) for k in TRAJECTORY_FIELDS}
    changed = [f"{k} ({old[k]!r} -> {getattr(config, k)!r})"
               for k in TRAJECTORY_FIELDS if old[k] != getattr(config, k)]
    if ckpt.get("world_size", 1) != world_size:
        changed.append(f"number of processes ({ckpt.get('world_size', 1)} -> {world_size})")
    if changed:
        raise CheckpointError(f"{path}: resuming needs the run's own settings; changed: "
                              + ", ".join(changed))
