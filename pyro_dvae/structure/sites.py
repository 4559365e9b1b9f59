"""Running a model or guide with given latent values, and the sample sites of its trace."""

from __future__ import annotations

from typing import Dict, List

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


class SetLatents(Messenger):
    """Give every latent site the value in ``values``; record latent sites left without one."""

    def __init__(self, values: Dict[str, torch.Tensor]):
        super().__init__()
        self.values = values
        self.unset: List[str] = []
        self.observed: List[str] = []

    def _pyro_sample(self, msg):
        if type(msg["fn"]).__name__ == "_Subsample":
            return
        if msg["is_observed"]:
            self.observed.append(msg["name"])
            return
        if msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True
        else:
            self.unset.append(msg["name"])


def sample_sites(tr) -> List[dict]:
    return [s for s in tr.nodes.values()
            if s["type"] == "sample" and not site_is_subsample(s)
            and not s["infer"].get("is_auxiliary")]


def latent_names(tr) -> List[str]:
    return [s["name"] for s in sample_sites(tr) if not s["is_observed"]]
