"""The DVAE base class (chapter 4) and the base class of its guides.

A DVAE is a generative model p(x_{1:T}, z_{1:T} | u_{1:T}) (4.4) written as a Pyro ``model`` and one or
more Pyro guides q(z_{1:T} | x_{1:T}, u_{1:T}) (4.2).  Both take the same arguments::

    model(x, u=None, mask=None, num_sequences=None, beta=1.0)
    guide(x, u=None, mask=None, num_sequences=None, beta=1.0)

- ``x``: (batch, T, F) observed sequence (a power spectrogram for speech), batch first.
- ``u``: optional (batch, T, U) external input (driven mode, 4.1.1).
- ``mask``: optional (batch, T) bool, False on padded frames of variable-length sequences.  What
  a padded frame of x or u holds never matters, NaN and inf included: :meth:`DVAE.prepare_inputs`
  replaces it by zeros (by selection) before any network reads it.
- ``num_sequences``: size of the data set the batch was drawn from; the batch plate is subsampled
  with it so the ELBO is on the scale of the whole data set.
- ``beta``: weight of the latent terms (KL warm-up); 1 gives the VLB.

Sites are named ``NAME_t`` with t = 1..T as in the paper: ``z_1 ... z_T`` (latent) and ``x_1 ... x_T``
(observed), inside ``pyro.markov`` and a ``pyro.plate("sequences")`` over the batch.  Their
distributions are views of per-sequence computations (:mod:`pyro_dvae.distributions.sequence`), so
a subclass writes its networks once, vectorised over time:

- :meth:`DVAE.context` (optional): deterministic states that depend on observed inputs only (for
  example SRNN's h_t(x_{1:t-1})), computed once per sequence and shared with the guide.
- :meth:`DVAE.prior`: (loc, scale) of p(z_t | ...) for all t from the whole z (batch, T, L), using
  only z_{1:t-1} at step t.
- :meth:`DVAE.emission`: decoder outputs for p(x_t | ...) for all t, from z and the context.

Inside :func:`fused_sites` (the training loop and the validation loss) each family is one site per
sequence instead (``z`` and ``x``, event shape (T, dim), :class:`~pyro_dvae.distributions.SequenceSite`):
the same densities, KLs and random draws, so the same loss, with three sites per model run instead
of 3 T.  Everything else (check-posterior, reconstruction, the per-step tests) sees the per-step
sites.

Models whose structure does not fit (a sequence-level latent, a Kalman smoother) override
:meth:`DVAE.model` and use the same helpers.  Generation (:meth:`DVAE.generate`) samples from the
prior step by step by evaluating these causal functions on the growing prefix; reconstruction
(:meth:`DVAE.reconstruct`) encodes with a guide and decodes.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch import nn

import pyro
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger

from ..distributions import NormalSequence, ObservationSequence, SequenceSite, get_likelihood
from ..nn import MLP, OutputLinear, mlp, resolve_architecture
from ..precision import full_precision

_instance_counter = itertools.count()


_FUSED = [False]


@contextlib.contextmanager
def fused_sites(enabled: bool = True):
    """Within this context, models with ``fused_sites = True`` and their guides write each site
    family (``z_1 .. z_T``, ``x_1 .. x_T``) as one site per sequence (``z``, ``x``) whose
    log-density and KL are the sums of the per-step ones: the ELBO keeps its value (same weights,
    seed and batch) with a fraction of Pyro's per-site cost.  Training and validation losses run
    in it; analyses that read per-step sites (check-posterior, ``TraceMeanField_ELBO`` per step,
    reconstruction) run outside it."""
    old, _FUSED[0] = _FUSED[0], bool(enabled)
    try:
        yield
    finally:
        _FUSED[0] = old


def _unique_pyro_name(prefix: str) -> str:
    # Each instance registers its parameters under its own name: a second model built under an
    # existing name would silently keep the old parameters in Pyro's global param store.
    return f"{prefix}_{next(_instance_counter)}"


class DVAE(nn.Module):
    """Base class of every DVAE model (p_theta).  Subclasses set ``name`` and implement
    :meth:`prior` and :meth:`emission` (and :meth:`context` when they have deterministic states
    driven by observed inputs)."""

    name: Optional[str] = None
    #: the paper's predictive mode (x_{t-1} feeds time t); used by generation and reports
    predictive = False
    #: whether x_t depends only on z_{1:t} (and x_{1:t-1}); prefix generation needs it
    causal_generation = True
    #: architecture options with this model's defaults (13.1): the layer-size fields of the
    #: authors' config.ini, lower case (``dense_*`` hidden-layer widths, ``dim_rnn_*`` LSTM sizes,
    #: ``num_rnn_*`` LSTM layers, ``bidir_*``, ``activation`` of the hidden layers); the model and
    #: its guides read the resolved values from ``self.arch``
    architecture: Dict[str, object] = {}
    #: whether the model and its guides may write fused sites (:func:`fused_sites`): true when
    #: every per-step site family goes through the helpers below
    fused_sites = True

    def __init__(self, x_dim: int = 257, z_dim: int = 16, likelihood="is", u_dim: int = 0,
                 **architecture):
        super().__init__()
        #: the resolved architecture options (:attr:`architecture` updated with the given ones)
        self.arch = resolve_architecture(self.name or type(self).__name__, self.architecture,
                                         architecture)
        self.x_dim, self.z_dim, self.u_dim = int(x_dim), int(z_dim), int(u_dim)
        self.likelihood = get_likelihood(likelihood)
        self.num_params = self.likelihood.num_params(self.x_dim)
        self.pyro_name = _unique_pyro_name(self.name or type(self).__name__.lower())
        self._context_cache = None
        self._input_cache = None

    def mlp(self, in_dim: int, key: str) -> MLP:
        """The hidden layers of architecture option ``key`` (``dense_*``) on ``in_dim`` inputs,
        with the architecture's activation."""
        return mlp(in_dim, self.arch[key], self.arch.get("activation", "tanh"))

    def output_layer(self, in_dim: int) -> OutputLinear:
        """The decoder's linear output layer (13.1): ``in_dim`` -> the likelihood's parameters."""
        return OutputLinear(in_dim, self.num_params)

    # ---- subclass hooks -------------------------------------------------------------------
    def context(self, x: torch.Tensor, u: Optional[torch.Tensor],
                mask: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Deterministic quantities that depend on observed inputs only (vectorised)."""
        return {}

    def prior(self, z: torch.Tensor, ctx: dict, x: torch.Tensor,
              u: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of p(z_t | ...) for all t, each (batch, T, z_dim).  Default N(0, I)."""
        return torch.zeros_like(z), torch.ones_like(z)

    def emission(self, z: torch.Tensor, ctx: dict, x: torch.Tensor,
                 u: Optional[torch.Tensor]) -> torch.Tensor:
        """Decoder outputs (batch, T, num_params) of p(x_t | ...) for all t."""
        raise NotImplementedError

    def frozen_parameters(self, epoch: int) -> Set[str]:
        """Names (as in ``self.named_parameters()``) that training must not change during
        ``epoch`` (0-based index of the epoch about to run).

        :func:`pyro_dvae.train.fit` calls it before every epoch and drops the gradients of these
        parameters before each optimiser step, so Adam leaves them (and their moment estimates)
        untouched.  For multi-phase schedules such as KVAE's (13.1.2); default: nothing frozen.
        """
        return set()

    # ---- the Pyro model ---------------------------------------------------------------------
    def model(self, x: torch.Tensor, u: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, num_sequences: Optional[int] = None,
              beta: float = 1.0) -> None:
        """p(x_{1:T}, z_{1:T} | u_{1:T}): z_t sites, then x_t sites, per time step."""
        x, u = self.prepare_inputs(x, u, mask)
        pyro.module(self.pyro_name, self)
        with self.plate(x, num_sequences):
            ctx = self.shared_context(x, u, mask, store=False)
            with kl_weight(beta):
                z = self.sample_latents(
                    "z", x, mask, compute=lambda z_: self.prior(z_, ctx, x, u))
            self.observe("x", x, mask, lambda: self.emission(z.stacked(), ctx, x, u))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ---- helpers shared by models and guides -------------------------------------------------
    def check_inputs(self, x, u=None, mask=None) -> None:
        assert x.dim() == 3, f"{self.name}: x must be (batch, T, F), got shape {tuple(x.shape)}"
        assert x.shape[-1] == self.x_dim, (
            f"{self.name}: x has {x.shape[-1]} features, the model was built for {self.x_dim}")
        if u is not None:
            assert self.u_dim, f"{self.name}: an input u was given to an undriven model (u_dim=0)"
            assert u.shape[:2] == x.shape[:2] and u.shape[-1] == self.u_dim, (
                f"{self.name}: u must be (batch, T, {self.u_dim}), got {tuple(u.shape)}")
        if mask is not None:
            assert mask.shape == x.shape[:2], (
                f"{self.name}: mask must be (batch, T) = {tuple(x.shape[:2])}, "
                f"got {tuple(mask.shape)}")

    def prepare_inputs(self, x: torch.Tensor, u: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`check_inputs`, then (x, u) with every padded frame (mask False) set to zero.

        By selection (``torch.where``), so a NaN or inf in a padded frame reaches neither the
        networks nor, through 0 * inf = NaN, the loss or its gradients.  Every model and guide
        entry point calls it first.  The guide and then the model of one ELBO evaluation get the
        same tensors back (remembered by identity), so :meth:`shared_context` still matches.
        """
        self.check_inputs(x, u, mask)
        if mask is None:
            return x, u
        versions = (x._version, None if u is None else u._version)
        c = self._input_cache
        if c is not None and c[0] is x and c[1] is u and c[2] is mask and c[3] == versions:
            return c[4]
        keep = mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1)
        out = (torch.where(keep, x, x.new_zeros(())),
               None if u is None else torch.where(keep, u, u.new_zeros(())))
        self._input_cache = (x, u, mask, versions, out)
        return out

    @staticmethod
    def plate(x: torch.Tensor, num_sequences: Optional[int] = None):
        """The batch plate, subsampled from a data set of ``num_sequences`` sequences."""
        batch = x.shape[0]
        size = batch if num_sequences is None else max(int(num_sequences), batch)
        return pyro.plate("sequences", size, subsample=torch.arange(batch, device=x.device))

    def shared_context(self, x, u=None, mask=None, store: bool = True) -> dict:
        """:meth:`context`, computed once when the guide and then the model see the same x.

        A guide calls it with ``store=True`` (the default) and leaves the result for the next
        model call with the same inputs and unchanged parameters, which takes it (``store=False``;
        SPEC section 5: share deterministic states between model and guide).  A model run on its
        own computes a fresh context and stores nothing, so a later model-only run never reuses a
        graph that ``backward`` has already freed.
        """
        key = self._context_key(x, u, mask)
        cache, self._context_cache = self._context_cache, None
        if cache is not None and cache[0] == key and cache[1] is x:
            return cache[2]
        ctx = self.context(x, u, mask)
        if store:
            self._context_cache = (key, x, ctx)
        return ctx

    def __getstate__(self):
        # run caches hold non-leaf tensors of the last run, which deepcopy / pickle refuse
        state = dict(self.__dict__)
        state["_context_cache"] = None
        state["_input_cache"] = None
        return state

    def _context_key(self, x, u, mask):
        versions = tuple(p._version for p in self.parameters())
        return (id(x), id(u), id(mask), x.dtype, torch.is_grad_enabled(), versions)

    def fused(self) -> bool:
        """Whether this run writes fused sites (inside :func:`fused_sites`, if the model allows)."""
        return _FUSED[0] and self.fused_sites

    def sample_latents(self, name: str, x: torch.Tensor, mask=None, compute: Callable = None,
                       dim: Optional[int] = None) -> NormalSequence:
        """Sample sites ``name_1 .. name_T`` from a prior computed by ``compute(z) -> (loc, scale)``."""
        batch, T = x.shape[:2]
        seq = NormalSequence(batch, T, dim or self.z_dim, x, mask, compute=compute)
        if self.fused():
            seq.record_all(pyro.sample(name, SequenceSite(seq)))
            return seq
        for t in pyro.markov(range(T)):
            seq.record(t, pyro.sample(f"{name}_{t + 1}", seq.step(t)))
        return seq

    def observe(self, name: str, x: torch.Tensor, mask, compute: Callable) -> ObservationSequence:
        """Observed sites ``name_1 .. name_T`` with decoder outputs ``compute()`` (batch, T, P)."""
        batch, T, F = x.shape
        seq = ObservationSequence(batch, T, F, x, self.likelihood, compute, mask)
        if self.fused():
            seq.record_all(pyro.sample(name, SequenceSite(seq), obs=x))
            return seq
        for t in pyro.markov(range(T)):
            seq.record(t, pyro.sample(f"{name}_{t + 1}", seq.step(t), obs=x[:, t]))
        return seq

    # ---- generation and reconstruction ---------------------------------------------------------
    @torch.no_grad()
    def generate(self, T: int, n: int = 1, u: Optional[torch.Tensor] = None,
                 feedback: str = "sample") -> Dict[str, torch.Tensor]:
        """Sample n sequences of T frames from the prior p(x_{1:T}, z_{1:T} | u).

        Step by step: z_t from p(z_t | past), then x_t from p(x_t | past, z_t); a predictive model
        feeds its own x_t back (``feedback="sample"``, ancestral sampling, or ``"mean"``, the
        expected frame).  Returns ``x`` (samples), ``mean`` (E[x_t | ...], for speech the power
        spectrogram sigma^2) and ``z``, each (n, T, .).
        """
        if not self.causal_generation:
            raise NotImplementedError(f"{type(self).__name__} must override generate()")
        p = next(self.parameters())
        x = torch.zeros(n, T, self.x_dim, dtype=p.dtype, device=p.device)
        mean = torch.zeros_like(x)
        z = torch.zeros(n, T, self.z_dim, dtype=p.dtype, device=p.device)
        for t in range(T):
            xp, zp = x[:, :t + 1], z[:, :t + 1]
            up = None if u is None else u[:, :t + 1]
            ctx = self.context(xp, up, None)
            loc, scale = self.prior(zp, ctx, xp, up)
            z[:, t] = loc[:, t] + scale[:, t] * torch.randn_like(loc[:, t])
            params = self.emission(z[:, :t + 1], ctx, xp, up)[:, t]
            mean[:, t] = self.likelihood.mean(params)
            x[:, t] = self.likelihood.sample(params) if feedback == "sample" else mean[:, t]
        return {"x": x, "mean": mean, "z": z}

    @torch.no_grad()
    def reconstruct(self, guide: Callable, x: torch.Tensor, u: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None, sample: bool = False) -> torch.Tensor:
        """Encode x with ``guide`` and decode: E[x_t | z, ...] for every t, (batch, T, F).

        With ``sample=False`` each latent takes its guide mean (fed forward through the guide's
        recursion); with ``sample=True`` a draw from the guide.
        """
        guide_fn = guide if sample else use_mean(guide)
        guide_trace = poutine.trace(guide_fn).get_trace(x, u, mask)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(
            x, u, mask)
        for site in model_trace.nodes.values():
            fn = site.get("fn")
            if site.get("type") == "sample" and isinstance(getattr(fn, "seq", None),
                                                           ObservationSequence):
                return self.likelihood.mean(fn.seq.params())
        raise RuntimeError(f"{type(self).__name__}.model has no observation sequence")


def kl_weight(beta: float):
    """Scale the latent sites by beta (KL warm-up); no handler at all when beta == 1."""
    if isinstance(beta, (int, float)) and beta == 1:
        return contextlib.nullcontext()
    return poutine.scale(scale=beta)


class _UseMean(Messenger):
    def _pyro_sample(self, msg):
        if not msg["is_observed"] and msg["value"] is None:
            msg["value"] = msg["fn"].mean


def use_mean(fn: Callable) -> Callable:
    """Run ``fn`` with every latent site set to its distribution's mean."""
    return _UseMean()(fn)


class Guide(nn.Module):
    """Base class of the guides q_phi(z | x, u).  Subclasses set ``name`` (the variant, for example
    ``"dks"``), a docstring naming the density, and implement :meth:`guide`.

    A guide holds a reference to its model (not as a submodule, so the model's parameters are not
    registered twice) to share deterministic states such as SRNN's h_t.
    """

    name: Optional[str] = None

    def __init__(self, model: DVAE):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.z_dim, self.x_dim, self.u_dim = model.z_dim, model.x_dim, model.u_dim
        self.pyro_name = _unique_pyro_name(f"{model.pyro_name}_guide_{self.name or 'q'}")

    def forward(self, x: torch.Tensor, u: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, num_sequences: Optional[int] = None,
                beta: float = 1.0) -> None:
        x, u = self.model.prepare_inputs(x, u, mask)
        pyro.module(self.pyro_name, self)
        with self.model.plate(x, num_sequences), kl_weight(beta):
            self.guide(x, u, mask)

    def guide(self, x, u=None, mask=None) -> None:
        raise NotImplementedError

    # helpers ---------------------------------------------------------------------------------
    def sample_independent(self, name: str, x: torch.Tensor, mask, loc: torch.Tensor,
                           scale: torch.Tensor) -> NormalSequence:
        """Sites ``name_t`` with parameters known for all steps at once (no z recursion)."""
        batch, T = x.shape[:2]
        seq = NormalSequence(batch, T, loc.shape[-1], x, mask, loc=loc, scale=scale)
        if self.model.fused():
            seq.record_all(pyro.sample(name, SequenceSite(seq)))
            return seq
        for t in pyro.markov(range(T)):
            seq.record(t, pyro.sample(f"{name}_{t + 1}", seq.step(t)))
        return seq

    def sample_chain(self, name: str, x: torch.Tensor, mask, step: Callable,
                     dim: Optional[int] = None) -> NormalSequence:
        """Sites ``name_t`` sampled in order; ``step(t, z_prev) -> (loc, scale)`` with z_prev the
        previous sample (zeros at t = 1), each (batch, dim).

        The recursion runs in float32 even under bfloat16 autocast (its products are too small to
        gain from bfloat16 and would pay a cast per step): tensors that ``step`` reads from
        outside the loop must be float32 (:func:`pyro_dvae.precision.fp32`; the helpers
        :func:`pyro_dvae.nn.stepwise` and :func:`pyro_dvae.nn.lstm_step` do this)."""
        with full_precision(x):
            return self._sample_chain(name, x, mask, step, dim)

    def _sample_chain(self, name, x, mask, step, dim):
        batch, T = x.shape[:2]
        dim = dim or self.z_dim
        seq = NormalSequence(batch, T, dim, x, mask)
        z_prev = x.new_zeros(batch, dim)
        if self.model.fused():  # the recursion draws every step, the fused site hands them out
            for t in range(T):
                loc, scale = step(t, z_prev)
                z_prev = seq.record(t, seq.step(t, loc, scale).rsample())
            value = pyro.sample(name, SequenceSite(seq))
            if value is not seq.stacked():
                raise RuntimeError(f"{type(self).__name__}: the fused site {name!r} was given a "
                                   "value; condition or replay guides outside fused_sites()")
            return seq
        for t in pyro.markov(range(T)):
            loc, scale = step(t, z_prev)
            z_prev = seq.record(t, pyro.sample(f"{name}_{t + 1}", seq.step(t, loc, scale)))
        return seq
