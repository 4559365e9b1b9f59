"""pyro-dvae: Dynamical Variational Autoencoders (Girin et al.) as Pyro models and guides.

The public names below are imported on first use (PEP 562), so that ``import pyro_dvae`` and the
command line's ``--help`` do not pay for importing torch and pyro.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "Bernoulli": "distributions",
    "DVAE": "models",
    "Gaussian": "distributions",
    "Guide": "models",
    "ItakuraSaito": "distributions",
    "NLLResult": "nll",
    "PosteriorReport": "structure",
    "REGISTRY": "registry",
    "TrainConfig": "train",
    "build": "registry",
    "check_posterior": "structure",
    "evaluate_nll": "nll",
    "fit": "train",
    "load_run": "train",
    "register": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyro_dvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for static analysis and IDEs
    from .distributions import Bernoulli, Gaussian, ItakuraSaito
    from .models import DVAE, Guide
    from .nll import NLLResult, evaluate_nll
    from .registry import REGISTRY, build, register
    from .structure import PosteriorReport, check_posterior
    from .train import TrainConfig, fit, load_run
