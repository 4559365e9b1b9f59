"""The posterior check for a model of the registry, built at small sizes."""

from __future__ import annotations

from typing import Optional

import torch

from .report import PosteriorReport, check_posterior

#: sizes used for the check: structure does not depend on them, only the run time does
X_DIM, Z_DIM, STEPS, BATCH = 4, 2, 7, 2


def check_registered(name: str, guide: Optional[str] = None, steps: int = STEPS,
                     batch: int = BATCH, seed: int = 0) -> PosteriorReport:
    """Build ``name`` with guide variant ``guide`` (the default when None) with x_dim = 4,
    z_dim = 2 and check it on a random positive sequence of ``steps`` frames."""
    from ..registry import REGISTRY, build

    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    variant = entry.default_guide if guide is None else guide
    if variant not in entry.guides:
        raise KeyError(f"unknown guide {variant!r} for model {name!r}; "
                       f"choose from {', '.join(entry.guides)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: devices are not used here
        model, q = build(name, variant, x_dim=X_DIM, z_dim=Z_DIM)
        # positive frames: in the support of every likelihood (Itakura-Saito needs x > 0)
        x = torch.exp(torch.randn(batch, steps, X_DIM, generator=gen))
        report = check_posterior(model.model, q, x)
    report.model, report.guide = name, variant
    return report
