"""The one list of registered DVAEs: model name -> model class, its guide classes, the default guide.

The CLI (``pyro-dvae models``, ``fit --model``) and the registry-driven tests read this list; adding a
model means adding one :func:`register` call here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type

from .guides import dkf as dkf_guides
from .guides import dsae as dsae_guides
from .guides import kvae as kvae_guides
from .guides import rvae as rvae_guides
from .guides import srnn as srnn_guides
from .guides import storn as storn_guides
from .guides import vrnn as vrnn_guides
from .guides.vae import VAEGuide
from .models.base import DVAE, Guide
from .models.dkf import DKF
from .models.dsae import DSAE
from .models.kvae import KVAE
from .models.rvae import RVAECausal, RVAENonCausal
from .models.srnn import SRNN
from .models.storn import STORN
from .models.vae import VAE
from .models.vrnn import VRNN


@dataclass
class Entry:
    name: str
    model: Type[DVAE]
    guides: Dict[str, Type[Guide]]
    default_guide: str
    description: str = ""
    #: keyword arguments of the model class that the CLI may set (beyond x_dim, z_dim, likelihood)
    options: Dict[str, object] = field(default_factory=dict)


REGISTRY: Dict[str, Entry] = {}


def register(name: str, model: Type[DVAE], guides: Dict[str, Type[Guide]], default_guide: str,
             description: str = "", **options) -> Entry:
    if default_guide not in guides:
        raise ValueError(f"default guide {default_guide!r} of {name!r} is not among {list(guides)}")
    REGISTRY[name] = Entry(name, model, dict(guides), default_guide, description, options)
    return REGISTRY[name]


def get_entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build(name: str, guide: Optional[str] = None, **kwargs) -> Tuple[DVAE, Guide]:
    """Build a registered model and one of its guides: ``model, guide = build("srnn", x_dim=257)``.

    Keyword arguments go to the model class (``x_dim``, ``z_dim``, ``likelihood``, ``u_dim``, ...).
    """
    entry = get_entry(name)
    variant = entry.default_guide if guide is None else guide
    if variant not in entry.guides:
        raise KeyError(f"unknown guide {variant!r} for model {name!r}; "
                       f"choose from {', '.join(entry.guides)}")
    model = entry.model(**kwargs)
    return model, entry.guides[variant](model)


register("vae", VAE, {"frame": VAEGuide}, "frame", "frame-wise VAE baseline (chapter 2)")
register("dkf", DKF, dkf_guides.GUIDES, "dks", "deep Kalman filter / DMM (chapter 5, 13.1.1)")
register("kvae", KVAE, kvae_guides.GUIDES, "kalman",
         "Kalman VAE: VAE over a switching LG-LDS, exact Kalman smoother (chapter 6, 13.1.2)")
register("srnn", SRNN, srnn_guides.GUIDES, "smoothing",
         "stochastic recurrent neural network (chapter 9, 13.1.5)")
register("storn", STORN, storn_guides.GUIDES, "filtering",
         "stochastic recurrent networks (chapter 7, 13.1.3)")
register("vrnn", VRNN, vrnn_guides.GUIDES, "filtering",
         "variational recurrent neural network (chapter 8, 13.1.4)")
register("rvae-causal", RVAECausal, rvae_guides.CAUSAL_GUIDES, "backward",
         "recurrent VAE, causal decoder (chapter 10, 13.1.6)")
register("rvae-noncausal", RVAENonCausal, rvae_guides.NONCAUSAL_GUIDES, "bidirectional",
         "recurrent VAE, non-causal decoder (chapter 10, 13.1.6)")
register("dsae", DSAE, dsae_guides.GUIDES, "full",
         "disentangled sequential autoencoder (chapter 11, 13.1.7)")
