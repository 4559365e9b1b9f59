"""Observation likelihoods p(x_t | .) parameterised by the decoder's linear output layer.

Each likelihood maps decoder outputs ``params`` (..., num_params(F)) to a density on x (..., F).

- :class:`ItakuraSaito`: x_{f,t} ~ Gamma(shape 1, scale sigma^2_{f,t}) (SPEC section 4, 13.2.1), the
  density of a power spectrogram |STFT|^2 under a zero-mean circular complex Gaussian STFT model.
  The decoder outputs log sigma^2 (F values).  ``log p = -log sigma^2 - x / sigma^2`` which is
  ``-d_IS(x | sigma^2) - log x - 1``: maximising it minimises the Itakura-Saito divergence.
- :class:`Gaussian`: diagonal Gaussian (the chapters' generic presentation); the decoder outputs the
  mean and log sigma^2 (2F values).
"""

from __future__ import annotations

import math

import torch
import pyro.distributions as dist


class Likelihood:
    """Base class: a family of densities on x indexed by the decoder output."""

    name = None

    def num_params(self, x_dim: int) -> int:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | params) summed over the feature dimension: (..., F) -> (...)."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distribution(self, params: torch.Tensor) -> dist.TorchDistribution:
        """The per-frame density as a Pyro distribution with event shape (F,)."""
        raise NotImplementedError

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        return self.distribution(params).sample()

    def __repr__(self):
        return f"{type(self).__name__}()"


class ItakuraSaito(Likelihood):
    """Gamma(1, scale sigma^2) per entry; decoder output is log sigma^2 (13.2.1)."""

    name = "is"

    def num_params(self, x_dim: int) -> int:
        return x_dim

    def log_prob(self, x, params):
        return -(params + x * torch.exp(-params)).sum(-1)

    def mean(self, params):
        return torch.exp(params)

    def distribution(self, params):
        return dist.Gamma(torch.ones_like(params), torch.exp(-params)).to_event(1)

    @staticmethod
    def divergence(x: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        """Itakura-Saito divergence d_IS(x | power) summed over the last dimension."""
        ratio = x / power
        return (ratio - torch.log(ratio) - 1).sum(-1)


class Gaussian(Likelihood):
    """Diagonal Gaussian; decoder output is [mean, log sigma^2]."""

    name = "gaussian"

    def num_params(self, x_dim: int) -> int:
        return 2 * x_dim

    def log_prob(self, x, params):
        loc, logvar = params.chunk(2, -1)
        return -0.5 * (logvar + (x - loc) ** 2 * torch.exp(-logvar) + math.log(2 * math.pi)).sum(-1)

    def mean(self, params):
        return params.chunk(2, -1)[0]

    def distribution(self, params):
        loc, logvar = params.chunk(2, -1)
        return dist.Normal(loc, torch.exp(0.5 * logvar)).to_event(1)


LIKELIHOODS = {cls.name: cls for cls in (ItakuraSaito, Gaussian)}


def get_likelihood(name_or_obj) -> Likelihood:
    if isinstance(name_or_obj, Likelihood):
        return name_or_obj
    if name_or_obj not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name_or_obj!r}; choose from {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name_or_obj]()
