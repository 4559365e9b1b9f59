"""Distributions: observation likelihoods and the per-step views of per-sequence densities."""

from .likelihoods import Gaussian, ItakuraSaito, Likelihood, get_likelihood
from .sequence import NormalSequence, NormalStep, ObservationSequence, ObservationStep

__all__ = [
    "Gaussian",
    "ItakuraSaito",
    "Likelihood",
    "NormalSequence",
    "NormalStep",
    "ObservationSequence",
    "ObservationStep",
    "get_likelihood",
]
