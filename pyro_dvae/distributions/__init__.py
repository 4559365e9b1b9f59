"""Distributions: observation likelihoods, the per-step views of per-sequence densities, and the
Kalman filter / smoother / exact posterior of linear-Gaussian state-space models (kalman.py)."""

from .kalman import KalmanPosterior, KalmanStep, LinearGaussianSSM
from .likelihoods import LIKELIHOODS, Bernoulli, Gaussian, ItakuraSaito, Likelihood, get_likelihood
from .sequence import (NormalSequence, NormalStep, ObservationSequence, ObservationStep,
                       SequenceSite)

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "Gaussian",
    "ItakuraSaito",
    "KalmanPosterior",
    "KalmanStep",
    "Likelihood",
    "LinearGaussianSSM",
    "NormalSequence",
    "NormalStep",
    "ObservationSequence",
    "ObservationStep",
    "SequenceSite",
    "get_likelihood",
]
