"""Per-step sample sites as thin views of one per-sequence computation (SPEC section 5).

A DVAE has one sample site per time step (``z_1 ... z_T``, ``x_1 ... x_T``) so that Pyro, the
mean-field ELBO and the D-separation checker all see the per-step structure.  Computing each step's
density separately is slow (recomputed RNN states, hundreds of tiny ops).  Here a *sequence* object
owns the densities of a whole site family; each site's distribution is a view ``seq.step(t)`` that
records the value Pyro hands back and defers its log-density.  The first time Pyro asks any step for
its log-density (after the model has run), the sequence stacks the recorded values and computes all
steps in one vectorised pass; later steps read slices.  The result is numerically the per-step
computation: a step's parameters may only depend on values of earlier steps (the ``compute``
function must be causal in that sense), and the per-step path (``log_prob`` on any other value, or
sampling without recorded values) evaluates the same function on the prefix.

- :class:`NormalSequence` / :class:`NormalStep`: diagonal Gaussian latents, parameters either
  computed from the recorded values (a model's prior) or given step by step / all at once (a guide).
- :class:`ObservationSequence` / :class:`ObservationStep`: observed frames under a
  :class:`~pyro_dvae.distributions.likelihoods.Likelihood`.
- ``kl_divergence`` between a guide step and a prior step is registered and vectorised, so
  ``TraceMeanField_ELBO`` uses the analytic per-step KL.
- :class:`SequenceSite`: the fused view, one site for a whole family (event shape (T, dim)) whose
  log-density and KL are the sums of the per-step ones; training uses it (fewer Pyro sites, the same
  loss), see :func:`pyro_dvae.models.base.fused_sites`.

Masks (batch, T) zero the log-densities and KLs of padded frames.  They select (``torch.where``)
rather than multiply, so a non-finite value computed at a padded frame cannot reach the sum
(0 * inf is NaN); :meth:`pyro_dvae.DVAE.prepare_inputs` also zeroes the padded frames of x and u
before any network reads them, which keeps the gradients finite too.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch.distributions import constraints, kl_divergence, register_kl

import pyro.distributions as dist
from pyro.distributions import TorchDistribution

from ..precision import fp32


def _normal_log_prob(value, loc, scale):
    # in float32 whatever the precision of the networks (pyro_dvae.precision)
    value, loc, scale = fp32(value), fp32(loc), fp32(scale)
    return dist.Normal(loc, scale, validate_args=False).log_prob(value).sum(-1)


def _normal_kl(q_loc, q_scale, p_loc, p_scale):
    q_loc, q_scale, p_loc, p_scale = fp32(q_loc), fp32(q_scale), fp32(p_loc), fp32(p_scale)
    var_ratio = (q_scale / p_scale) ** 2
    t1 = ((q_loc - p_loc) / p_scale) ** 2
    return 0.5 * (var_ratio + t1 - 1 - torch.log(var_ratio)).sum(-1)


class _Sequence:
    """Shared bookkeeping: T recorded values and a mask."""

    def __init__(self, batch: int, T: int, dim: int, like: torch.Tensor,
                 mask: Optional[torch.Tensor] = None):
        self.batch, self.T, self.dim = batch, T, dim
        self.dtype, self.device = like.dtype, like.device
        self.mask = None if mask is None else mask.to(device=like.device, dtype=torch.bool)
        self._values: Optional[List[Optional[torch.Tensor]]] = [None] * T
        self._num_recorded = 0
        self._stacked = None
        self._log_prob = None
        self._log_prob_steps = None

    @property
    def values(self) -> List[Optional[torch.Tensor]]:
        """The recorded value of each step (None where not yet recorded); after
        :meth:`record_all`, views of the recorded tensor, made when first asked for."""
        if self._values is None:
            self._values = list(self._stacked.unbind(1))
        return self._values

    def record(self, t: int, value: torch.Tensor) -> torch.Tensor:
        values = self.values
        self._num_recorded += values[t] is None
        values[t] = value
        self._stacked = None
        self._log_prob = None
        return value

    def record_all(self, value: torch.Tensor) -> torch.Tensor:
        """Record the values of all steps at once, ``value`` (batch, T, dim) (a fused site)."""
        if value is self._stacked and self.complete():
            return value
        self._values = None
        self._num_recorded = self.T
        self._stacked = value
        self._log_prob = None
        return value

    def complete(self) -> bool:
        return self._num_recorded == self.T

    def stacked(self) -> torch.Tensor:
        """The recorded values as one (batch, T, dim) tensor."""
        if self._stacked is None:
            if not self.complete():
                missing = [t + 1 for t, v in enumerate(self.values) if v is None]
                raise RuntimeError(f"values of steps {missing[:5]} were never recorded")
            self._stacked = torch.stack(self.values, 1)
        return self._stacked

    def log_prob_steps(self):
        """log_prob() split into T tensors (batch,) by one ``unbind``: handing out per-step
        values this way adds a single autograd node for all steps, not one per step."""
        if self._log_prob_steps is None or self._log_prob_steps[0] is not self.log_prob():
            self._log_prob_steps = (self.log_prob(), self.log_prob().unbind(1))
        return self._log_prob_steps[1]

    def _masked(self, lp: torch.Tensor, t=None) -> torch.Tensor:
        """``lp`` where the frame is real, 0 on padded frames (selection, not multiplication)."""
        if self.mask is None:
            return lp
        return torch.where(self.mask if t is None else self.mask[:, t], lp, lp.new_zeros(()))


class NormalSequence(_Sequence):
    """Diagonal Gaussian densities for a latent family z_1..z_T of shape (batch, T, dim).

    Give exactly one of: ``compute(values) -> (loc, scale)`` evaluated on the recorded values
    (step t may only use values[:, :t]); ``loc``/``scale`` for all steps at once; or nothing, and
    the per-step parameters through :meth:`step`.
    """

    def __init__(self, batch, T, dim, like, mask=None,
                 compute: Optional[Callable] = None, loc=None, scale=None):
        super().__init__(batch, T, dim, like, mask)
        self._compute = compute
        self._params = None if loc is None else (loc, scale)
        self._draw = None
        self._step_params: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * T
        self._kl = {}

    def step(self, t: int, loc=None, scale=None) -> "NormalStep":
        if loc is not None:
            self._step_params[t] = (loc, scale)
        return NormalStep(self, t)

    def record(self, t, value):
        self._params = self._params if self._compute is None else None
        self._kl = {}
        return super().record(t, value)

    def record_all(self, value):
        if value is not self._stacked:
            self._params = self._params if self._compute is None else None
            self._kl = {}
        return super().record_all(value)

    def sample_all(self) -> torch.Tensor:
        """A reparameterised draw of all steps (batch, T, dim) in step order, recorded.

        All parameters given: one vectorised draw (the per-step sites' :meth:`draw_all`);
        parameters computed from the values (a model's prior run without a guide): step by step
        on the prefix."""
        if self.given_params():  # the draw of draw_all(), not split into steps
            loc, scale = self._params
            return self.record_all(loc + scale * torch.randn_like(loc))
        for t in range(self.T):
            loc, scale = self.step_params(t)
            self.record(t, loc + scale * torch.randn_like(loc))
        return self.stacked()

    def given_params(self) -> bool:
        """Whether the parameters of all steps were given at once (no recursion on z)."""
        return self._compute is None and self._params is not None

    def draw_all(self):
        """With all parameters given: one reparameterised draw of every step, vectorised, split
        into T tensors (batch, dim) by one ``unbind``; step t's ``rsample`` hands out entry t."""
        if self._draw is None:
            loc, scale = self._params
            self._draw = (loc + scale * torch.randn_like(loc)).unbind(1)
        return self._draw

    def params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale), each (batch, T, dim), for all steps."""
        if self._params is None:
            if self._compute is not None:
                self._params = self._compute(self.stacked())
            else:
                self._params = tuple(torch.stack(p, 1) for p in zip(*self._step_params))
        return self._params

    def step_params(self, t: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._params is not None or (self._compute is not None and self.complete()):
            loc, scale = self.params()
            return loc[:, t], scale[:, t]
        if self._step_params[t] is not None:
            return self._step_params[t]
        if self._compute is None:
            raise RuntimeError(f"no parameters were given for step {t + 1}")
        # Per-step path: evaluate the causal computation with the values of steps >= t (not yet
        # known, and unused by step t) replaced by zeros.
        filler = torch.zeros(self.batch, self.dim, dtype=self.dtype, device=self.device)
        values = [v if (v is not None and s < t) else filler for s, v in enumerate(self.values)]
        loc, scale = self._compute(torch.stack(values, 1))
        return loc[:, t], scale[:, t]

    def log_prob(self) -> torch.Tensor:
        """log q or log p of every recorded value, (batch, T), masked."""
        if self._log_prob is None:
            loc, scale = self.params()
            self._log_prob = self._masked(_normal_log_prob(self.stacked(), loc, scale))
        return self._log_prob

    def kl(self, prior: "NormalSequence") -> torch.Tensor:
        """KL(self_t || prior_t) for all t, (batch, T), masked; cached per prior."""
        key = id(prior)
        if key not in self._kl:
            q_loc, q_scale = self.params()
            p_loc, p_scale = prior.params()
            kl = self._masked(_normal_kl(q_loc, q_scale, p_loc, p_scale))
            self._kl[key] = [prior, kl, None]
        return self._kl[key][1]

    def kl_steps(self, prior: "NormalSequence"):
        """:meth:`kl` split into T tensors (batch,) by one ``unbind`` (made when first asked for:
        a fused site needs only the sum)."""
        entry = self._kl[id(prior)] if id(prior) in self._kl else None
        if entry is None:
            self.kl(prior)
            entry = self._kl[id(prior)]
        if entry[2] is None:
            entry[2] = entry[1].unbind(1)
        return entry[2]


class _StepView(TorchDistribution):
    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, seq: _Sequence, t: int):
        self.seq, self.t = seq, t
        super().__init__(torch.Size([seq.batch]), torch.Size([seq.dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) == tuple(self.batch_shape):
            return self  # keeps register_kl matching inside pyro.plate (SPEC section 5)
        raise NotImplementedError(
            f"{type(self).__name__} cannot be expanded from {tuple(self.batch_shape)} to "
            f"{tuple(batch_shape)} (vectorised particles are not supported)")

    def _is_recorded(self, value) -> bool:
        return self.seq.values[self.t] is value and self.seq.complete()


class NormalStep(_StepView):
    """Step t of a :class:`NormalSequence`: a diagonal Normal with event shape (dim,)."""

    has_rsample = True

    @property
    def loc(self):
        return self.seq.step_params(self.t)[0]

    @property
    def scale(self):
        return self.seq.step_params(self.t)[1]

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        return self.scale ** 2

    def rsample(self, sample_shape=torch.Size()):
        if not sample_shape and self.seq.given_params():
            return self.seq.draw_all()[self.t]
        loc, scale = self.seq.step_params(self.t)
        shape = torch.Size(sample_shape) + loc.shape
        return loc + scale * torch.randn(shape, dtype=loc.dtype, device=loc.device)

    def log_prob(self, value):
        if self._is_recorded(value):
            return self.seq.log_prob_steps()[self.t]
        loc, scale = self.seq.step_params(self.t)
        return self.seq._masked(_normal_log_prob(value, loc, scale), self.t)


class ObservationSequence(_Sequence):
    """Observed frames x_1..x_T under ``likelihood`` with decoder outputs ``compute() -> params``.

    ``compute`` is called once, after the model has run, and returns (batch, T, num_params).
    """

    def __init__(self, batch, T, dim, like, likelihood, compute: Callable, mask=None):
        super().__init__(batch, T, dim, like, mask)
        self.likelihood = likelihood
        self._compute = compute
        self._params = None

    def step(self, t: int) -> "ObservationStep":
        return ObservationStep(self, t)

    def params(self) -> torch.Tensor:
        if self._params is None:
            self._params = self._compute()
        return self._params

    def log_prob(self) -> torch.Tensor:
        if self._log_prob is None:
            self._log_prob = self._masked(
                self.likelihood.log_prob(fp32(self.stacked()), fp32(self.params())))
        return self._log_prob


class ObservationStep(_StepView):
    """Step t of an :class:`ObservationSequence` (observed; event shape (F,))."""

    def log_prob(self, value):
        if self._is_recorded(value):
            return self.seq.log_prob_steps()[self.t]
        params = fp32(self.seq.params()[:, self.t])
        return self.seq._masked(self.seq.likelihood.log_prob(fp32(value), params), self.t)

    @property
    def mean(self):
        return self.seq.likelihood.mean(self.seq.params()[:, self.t])

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "observations are sampled with DVAE.generate(); the Pyro model needs observed x")


class SequenceSite(TorchDistribution):
    """All steps of a :class:`NormalSequence` or :class:`ObservationSequence` as one site: batch
    shape (batch,), event shape (T, dim); ``log_prob`` is the masked sum over t of the per-step
    log-densities and the registered KL the sum of the per-step KLs, so an ELBO over fused sites
    has the value of the per-step one.  A value that is not the sequence's recorded one is
    recorded first (a model replaying its guide's draw)."""

    arg_constraints = {}
    support = constraints.independent(constraints.real_vector, 1)

    def __init__(self, seq: _Sequence):
        self.seq = seq
        super().__init__(torch.Size([seq.batch]), torch.Size([seq.T, seq.dim]),
                         validate_args=False)

    @property
    def has_rsample(self):
        return isinstance(self.seq, NormalSequence)

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) == tuple(self.batch_shape):
            return self
        raise NotImplementedError(
            f"{type(self).__name__} cannot be expanded from {tuple(self.batch_shape)} to "
            f"{tuple(batch_shape)} (vectorised particles are not supported)")

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise NotImplementedError("a fused sequence site draws one sample per sequence")
        if not isinstance(self.seq, NormalSequence):
            raise NotImplementedError(
                "observations are sampled with DVAE.generate(); the Pyro model needs observed x")
        if self.seq.complete():  # a guide's recursion has drawn (and recorded) every step
            return self.seq.stacked()
        return self.seq.sample_all()

    def log_prob(self, value):
        self.seq.record_all(value)
        return self.seq.log_prob().sum(-1)

    @property
    def mean(self):
        if isinstance(self.seq, NormalSequence):
            return self.seq.params()[0]
        return self.seq.likelihood.mean(self.seq.params())


@register_kl(SequenceSite, SequenceSite)
def _kl_sequence_sequence(q: SequenceSite, p: SequenceSite):
    if not (isinstance(q.seq, NormalSequence) and isinstance(p.seq, NormalSequence)):
        raise NotImplementedError
    return q.seq.kl(p.seq).sum(-1)


@register_kl(NormalStep, NormalStep)
def _kl_step_step(q: NormalStep, p: NormalStep):
    if q.seq.complete() and p.seq.complete() and q.seq.T == p.seq.T:
        return q.seq.kl_steps(p.seq)[q.t]
    q_loc, q_scale = q.seq.step_params(q.t)
    p_loc, p_scale = p.seq.step_params(p.t)
    return q.seq._masked(_normal_kl(q_loc, q_scale, p_loc, p_scale), q.t)


@register_kl(dist.Independent, NormalStep)
def _kl_independent_step(q, p: NormalStep):
    p_loc, p_scale = p.seq.step_params(p.t)
    prior = dist.Normal(p_loc, p_scale).to_event(1)
    return p.seq._masked(kl_divergence(q, prior), p.t)


@register_kl(NormalStep, dist.Independent)
def _kl_step_independent(q: NormalStep, p):
    q_loc, q_scale = q.seq.step_params(q.t)
    return q.seq._masked(kl_divergence(dist.Normal(q_loc, q_scale).to_event(1), p), q.t)
