"""pyro-dvae: Dynamical Variational Autoencoders (Girin et al.) as Pyro models and guides."""

from .distributions import Gaussian, ItakuraSaito
from .models import DVAE, Guide
from .registry import REGISTRY, build, register
from .structure import PosteriorReport, check_posterior
from .train import TrainConfig, fit, load_run

__version__ = "0.1.0"

__all__ = [
    "DVAE",
    "Gaussian",
    "Guide",
    "ItakuraSaito",
    "PosteriorReport",
    "REGISTRY",
    "TrainConfig",
    "build",
    "check_posterior",
    "fit",
    "load_run",
    "register",
]
