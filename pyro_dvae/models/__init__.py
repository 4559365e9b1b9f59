"""Generative models p_theta, one per file (``models/<name>.py``), all subclasses of DVAE."""

from .base import DVAE, Guide, use_mean
from .dkf import DKF
from .dsae import DSAE
from .kvae import KVAE
from .rvae import RVAE, RVAECausal, RVAENonCausal
from .srnn import SRNN
from .storn import STORN
from .vae import VAE
from .vrnn import VRNN

__all__ = ["DVAE", "DKF", "DSAE", "Guide", "KVAE", "RVAE", "RVAECausal", "RVAENonCausal", "SRNN",
           "STORN", "VAE", "VRNN", "use_mean"]
