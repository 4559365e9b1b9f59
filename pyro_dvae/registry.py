"""The one list of registered DVAEs: model name -> model class, its guide classes, the default guide.

The CLI (``pyro-dvae models``, ``fit --model``) and the registry-driven tests read this list; adding a
model means adding one :func:`register` call here.  Classes are named by where they live and imported
on first use, so reading the list (``pyro-dvae models``) imports neither torch nor pyro.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Type, Union

if TYPE_CHECKING:
    from .models.base import DVAE, Guide

#: a class, or where it lives as ``"package.module:attribute"`` (imported on first use, so that
#: ``pyro-dvae models`` and ``--help`` need neither torch nor pyro)
Spec = Union[str, object]


def _resolve(spec: Spec):
    if not isinstance(spec, str):
        return spec
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Entry:
    """One registered model.  ``model`` and ``guides`` are imported on first access; ``guide_names``
    is known without importing anything."""

    name: str
    model_spec: Spec
    guides_spec: Union[Spec, Dict[str, Spec]]
    guide_names: Tuple[str, ...]
    default_guide: str
    description: str = ""
    #: keyword arguments of the model class that the CLI may set (beyond x_dim, z_dim, likelihood)
    options: Dict[str, object] = field(default_factory=dict)

    @property
    def model(self) -> Type["DVAE"]:
        return _resolve(self.model_spec)

    @property
    def guides(self) -> Dict[str, Type["Guide"]]:
        spec = self.guides_spec
        guides = ({k: _resolve(v) for k, v in spec.items()} if isinstance(spec, dict)
                  else dict(_resolve(spec)))
        if tuple(guides) != self.guide_names:
            raise RuntimeError(f"registry entry {self.name!r} names guides {self.guide_names}, "
                               f"but {spec!r} holds {tuple(guides)}")
        return guides


REGISTRY: Dict[str, Entry] = {}


def register(name: str, model: Spec, guides: Union[Spec, Dict[str, Spec]], default_guide: str,
             description: str = "", guide_names: Optional[Tuple[str, ...]] = None,
             **options) -> Entry:
    """Register a model: ``register("mydkf", MyDKF, {"mine": MyGuide}, "mine")``.

    ``model`` and the guides may be classes or ``"module:attribute"`` strings (imported lazily);
    ``guides`` is a dict name -> guide, or a spec of such a dict, in which case ``guide_names``
    must list its keys (so the CLI can list guides without importing them).
    """
    if guide_names is None:
        if not isinstance(guides, dict):
            raise ValueError(f"register {name!r}: a lazily imported guide dict needs guide_names")
        guide_names = tuple(guides)
    guide_names = tuple(guide_names)
    if default_guide not in guide_names:
        raise ValueError(f"default guide {default_guide!r} of {name!r} is not among "
                         f"{list(guide_names)}")
    guides = dict(guides) if isinstance(guides, dict) else guides
    REGISTRY[name] = Entry(name, model, guides, guide_names, default_guide, description, options)
    return REGISTRY[name]


def get_entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build(name: str, guide: Optional[str] = None, **kwargs) -> Tuple["DVAE", "Guide"]:
    """Build a registered model and one of its guides: ``model, guide = build("srnn", x_dim=257)``.

    Keyword arguments go to the model class (``x_dim``, ``z_dim``, ``likelihood``, ``u_dim``, ...).
    """
    entry = get_entry(name)
    variant = entry.default_guide if guide is None else guide
    if variant not in entry.guide_names:
        raise KeyError(f"unknown guide {variant!r} for model {name!r}; "
                       f"choose from {', '.join(entry.guide_names)}")
    model = entry.model(**kwargs)
    return model, entry.guides[variant](model)


_M, _G = "pyro_dvae.models.", "pyro_dvae.guides."
register("vae", _M + "vae:VAE", {"frame": _G + "vae:VAEGuide"}, "frame",
         "frame-wise VAE baseline (chapter 2)")
register("dkf", _M + "dkf:DKF", _G + "dkf:GUIDES", "dks",
         "deep Kalman filter / DMM (chapter 5, 13.1.1)",
         guide_names=("dks", "st-l", "st-lr", "mf-t", "mf-local", "mf-l", "mf-lr"))
register("kvae", _M + "kvae:KVAE", _G + "kvae:GUIDES", "kalman",
         "Kalman VAE: VAE over a switching LG-LDS, exact Kalman smoother (chapter 6, 13.1.2)",
         guide_names=("kalman",))
register("srnn", _M + "srnn:SRNN", _G + "srnn:GUIDES", "smoothing",
         "stochastic recurrent neural network (chapter 9, 13.1.5)",
         guide_names=("smoothing", "filtering"))
register("storn", _M + "storn:STORN", _G + "storn:GUIDES", "filtering",
         "stochastic recurrent networks (chapter 7, 13.1.3)",
         guide_names=("filtering", "consistent"))
register("vrnn", _M + "vrnn:VRNN", _G + "vrnn:GUIDES", "filtering",
         "variational recurrent neural network (chapter 8, 13.1.4)",
         guide_names=("filtering", "backward"))
register("rvae-causal", _M + "rvae:RVAECausal", _G + "rvae:CAUSAL_GUIDES", "backward",
         "recurrent VAE, causal decoder (chapter 10, 13.1.6)", guide_names=("backward",))
register("rvae-noncausal", _M + "rvae:RVAENonCausal", _G + "rvae:NONCAUSAL_GUIDES",
         "bidirectional", "recurrent VAE, non-causal decoder (chapter 10, 13.1.6)",
         guide_names=("bidirectional",))
register("dsae", _M + "dsae:DSAE", _G + "dsae:GUIDES", "full",
         "disentangled sequential autoencoder (chapter 11, 13.1.7)",
         guide_names=("full", "factorized"))
