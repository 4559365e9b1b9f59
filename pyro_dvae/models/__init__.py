"""Generative models p_theta, one per file (``models/<name>.py``), all subclasses of DVAE."""

from .base import DVAE, Guide, use_mean
from .dkf import DKF
from .srnn import SRNN
from .vae import VAE

__all__ = ["DVAE", "DKF", "Guide", "SRNN", "VAE", "use_mean"]
