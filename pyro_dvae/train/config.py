"""The training settings (:class:`TrainConfig`), the ELBOs and the KL warm-up schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ..precision import PRECISIONS

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
#: training settings that change the optimisation trajectory; a resumed run must keep them
TRAJECTORY_FIELDS = ("batch_size", "lr", "elbo", "kl_warmup", "clip_norm", "seed", "precision")


@dataclass
class TrainConfig:
    """Training settings (defaults from 13.2.2: Adam, lr 1e-4, batch 32, patience 20).

    The authors' released configurations used ``lr=1e-3``.  ``patience=0`` disables early stopping;
    ``kl_warmup=0`` means beta = 1 throughout; ``clip_norm=None`` no gradient clipping;
    ``threads=None`` leaves torch's thread count alone; ``num_workers`` > 0 loads batches in
    worker processes (a torch DataLoader).  ``precision``: ``"fp32"`` or ``"bf16"`` (mixed
    precision, :mod:`pyro_dvae.precision`: bfloat16 autocast of the training forward pass, float32
    weights, gradients, optimiser state and density sums; validation stays float32).
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
    precision: str = "fp32"

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
            (self.precision in PRECISIONS,
             f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default value of field ``name`` (what a checkpoint without it was trained with)."""
        return {f.name: f.default for f in fields(cls)}[name]

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def as_config(config) -> TrainConfig:
    """``config`` as a :class:`TrainConfig` (``None``: the defaults; a dict: its known keys)."""
    if config is None:
        return TrainConfig()
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    return config


def kl_beta(step: int, steps_per_epoch: int, kl_warmup: int) -> float:
    """Weight of the latent (KL) terms at 0-based optimisation ``step`` (counted over epochs):
    rises linearly from 0 (before the first step) to 1 at the last step of epoch ``kl_warmup``,
    then stays 1; ``kl_warmup=0``: always 1.  (Pyro refuses a scale of exactly 0, so the first
    step has beta = 1 / (kl_warmup x steps_per_epoch).)"""
    if kl_warmup <= 0:
        return 1.0
    return min(1.0, (step + 1) / (kl_warmup * steps_per_epoch))
