"""pyro-dvae: Dynamical Variational Autoencoders (Girin et al.) as Pyro models and guides."""

from .distributions import Gaussian, ItakuraSaito
from .models import DVAE, Guide
from .registry import REGISTRY, build, register

__version__ = "0.1.0"

__all__ = [
    "DVAE",
    "Gaussian",
    "Guide",
    "ItakuraSaito",
    "REGISTRY",
    "build",
    "register",
]
