"""Observation likelihoods p(x_t | .) parameterised by the decoder's linear output layer.

Each likelihood maps decoder outputs ``params`` (..., num_params(F)) to a density on x (..., F).

- :class:`ItakuraSaito`: x_{f,t} ~ Gamma(shape 1, scale sigma^2_{f,t}) (SPEC section 4, 13.2.1), the
  density of a power spectrogram |STFT|^2 under a zero-mean circular complex Gaussian STFT model.
  The decoder outputs log sigma^2 (F values).  ``log p = -log sigma^2 - x / sigma^2`` which is
  ``-d_IS(x | sigma^2) - log x - 1``: maximising it minimises the Itakura-Saito divergence.
- :class:`Gaussian`: diagonal Gaussian (the chapters' generic presentation); the decoder outputs the
  mean and log sigma^2 (2F values).
- :class:`Bernoulli`: independent binary entries (piano rolls, as in the DKF/DMM, STORN and VRNN
  papers' polyphonic-music experiments); the decoder outputs the logits (F values).
  ``log p = x l - softplus(l)``; its mean is the probability sigmoid(l).

:meth:`Likelihood.check_data` says whether data lie in a likelihood's support (binary for Bernoulli,
non-negative for Itakura-Saito, finite for all), so that a wrong choice stops with one line before
training instead of giving a meaningless loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import pyro.distributions as dist

from ..kernels import itakura_saito_log_prob


class Likelihood:
    """Base class: a family of densities on x indexed by the decoder output."""

    name = None
    #: for messages: the family's name and what to do when data are outside its support
    label = ""
    hint = ""

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

    def data_problem(self, x: torch.Tensor) -> Optional[str]:
        """Why finite ``x`` (real frames only) is outside this likelihood's support, or None."""
        return None

    def check_data(self, x: torch.Tensor, where: str = "the data") -> None:
        """Raise ``ValueError`` (one line naming ``where``) if ``x`` holds NaN or infinite values
        or is outside the support."""
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{where} holds {bad} NaN or infinite values")
        problem = self.data_problem(x)
        if problem is not None:
            raise ValueError(f"{where} {problem}: the {self.label} likelihood "
                             f"({self.name!r}) cannot model it; {self.hint}")

    def __repr__(self):
        return f"{type(self).__name__}()"


class ItakuraSaito(Likelihood):
    """Gamma(1, scale sigma^2) per entry; decoder output is log sigma^2 (13.2.1)."""

    name = "is"
    label = "Itakura-Saito"
    hint = ("it is meant for power spectrograms (x >= 0); choose 'gaussian' for real-valued data "
            "or 'bernoulli' for binary data")

    def num_params(self, x_dim: int) -> int:
        return x_dim

    def log_prob(self, x, params):
        return itakura_saito_log_prob(x, params)

    def mean(self, params):
        return torch.exp(params)

    def distribution(self, params):
        return dist.Gamma(torch.ones_like(params), torch.exp(-params)).to_event(1)

    @staticmethod
    def divergence(x: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        """Itakura-Saito divergence d_IS(x | power) summed over the last dimension."""
        ratio = x / power
        return (ratio - torch.log(ratio) - 1).sum(-1)

    def data_problem(self, x):
        if x.numel() and float(x.min()) < 0:
            return f"holds negative values (min {float(x.min()):.4g})"
        return None


class Gaussian(Likelihood):
    """Diagonal Gaussian; decoder output is [mean, log sigma^2]."""

    name = "gaussian"
    label = "Gaussian"

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


class Bernoulli(Likelihood):
    """Independent Bernoulli entries; decoder output is the logits l (x in {0, 1})."""

    name = "bernoulli"
    label = "Bernoulli"
    hint = ("it is meant for binary data such as piano rolls (every value 0 or 1); choose "
            "'gaussian' for real-valued data")

    def num_params(self, x_dim: int) -> int:
        return x_dim

    def log_prob(self, x, params):
        # x l - log(1 + e^l), stable for any l (the negative binary cross-entropy with logits)
        return (x * params - F.softplus(params)).sum(-1)

    def mean(self, params):
        return torch.sigmoid(params)

    def distribution(self, params):
        return dist.Bernoulli(logits=params).to_event(1)

    def data_problem(self, x):
        bad = (x != 0) & (x != 1)
        if bool(bad.any()):
            return (f"is not binary ({int(bad.sum())} values other than 0 and 1, for example "
                    f"{float(x[bad][0]):.4g})")
        return None


LIKELIHOODS = {cls.name: cls for cls in (ItakuraSaito, Gaussian, Bernoulli)}


def get_likelihood(name_or_obj) -> Likelihood:
    """The likelihood of a name ("is", "gaussian", "bernoulli"), or the given instance."""
    if isinstance(name_or_obj, Likelihood):
        return name_or_obj
    if name_or_obj not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name_or_obj!r}; choose from {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name_or_obj]()
