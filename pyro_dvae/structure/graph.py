"""Reading the compact DAG of a Pyro model, and the dependencies of a guide, from the running code.

The compact form of a DVAE (4.1.2) has only random variables as nodes; a node ``a`` is a parent of
``b`` when the realisation of ``a`` is used to compute the parameters of the distribution of ``b``
(4.4).  Deterministic RNN states are not nodes: they are unrolled into functions of the random
variables (appendix A, 15.1-15.6).  Nothing about the structure is declared by hand; it is measured
on deep float64 copies of model and guide, in three ways, and an edge exists if any of them sees it
at any draw:

1. gradients: every latent site is given a float64 leaf tensor as its value (the values of a guide
   draw), the observed sequence ``x`` (and any other tensor argument such as ``u``) is passed as a
   float64 leaf; for every sample site, the gradient of ``fn.log_prob(value)`` -- at the site's
   own value, held fixed -- is taken with respect to every latent leaf and every argument leaf.  A
   non-zero gradient means the value changes the site's distribution.  Gradients through an RNN
   are exactly zero where there is no computational path, so the unrolled dependencies (for
   example h_t(x_{1:t-1}, z_{1:t}) in STORN) appear as edges from every variable they involve.
2. value interventions (:mod:`.intervene`): each latent value and each time step of each argument
   is replaced in turn by other values (0, -v, v +- 10, 100 v), every other value held fixed, and
   the program is run again; a site whose distribution changed depends on it, gradient path or
   not (``.detach()``, ``torch.sign``, an inactive ``relu``, a saturated ``tanh``).
3. parameter draws: the reading is repeated at the caller's parameters and at ``reinits``
   re-initialisations of the copies' parameters (:func:`reinitialise`), so that weights set to zero
   or a gate closed at the current values cannot hide an architectural edge.

An edge that no method found counts as absent only when some intervention compared the site's
distribution cleanly without seeing a change (for a discrete value: every point of an enumerable
support, inside plates).  Otherwise it is *undetermined* (``Structure.undetermined``): an upstream
value with an unbounded discrete support (Poisson), a replacement that changes which sites the
program samples (Python control flow), a site whose distribution cannot be evaluated.

What can still fool it: a dependency that shows only for values that none of the draws and
replacement values reaches (``relu(z - 1e6)``), or only jointly with another variable taking a
value that no draw visits (an interaction through a branch on ``z_1 > 100`` and ``z_2 > 100``); a
dependency through state the program keeps between runs (a cache keyed on something other than
its inputs, a global); a program that processes the sequences of a batch differently by their
position (reading row 0 alone) while the interventions run batched; a parameter frozen
(``requires_grad=False``) at a value that hides an edge.

Observed sites are mapped to time steps of the arguments they observe (an observed site ``x_t``
whose value is the view ``x[:, t-1]`` of the argument ``x`` becomes the variable ``x_t``), so that
dependencies on slices of ``x`` that feed networks (predictive mode, guides) land on the right node
whatever the observed sites are called.  Slices of tensor arguments that no site observes (a driving
input ``u_t``, or an x_1 that only conditions) are input variables: always known, never random.
"""

from __future__ import annotations

import copy
import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from .intervene import Evidence, intervene, upstream_variables
from .sites import SetLatents, latent_names, sample_sites

_INDEXED = re.compile(r"^(.+)_(\d+)$")

LATENT, OBSERVED, INPUT = "latent", "observed", "input"


class StructureError(ValueError):
    """The model or the guide cannot be analysed (the message says why)."""


@dataclass(frozen=True, order=True)
class Var:
    """A random variable of the compact form: ``family`` and 1-based ``index`` (None for a single
    variable such as DSAE's ``v``), and its ``kind``: latent, observed or input (always known)."""

    family: str
    index: Optional[int]
    kind: str = field(compare=False)

    def __str__(self) -> str:
        return self.family if self.index is None else f"{self.family}_{self.index}"


# ---- arguments ---------------------------------------------------------------------------------

class Arguments:
    """The tensor arguments of a model/guide call, as float64 leaves.

    The first positional argument is the observed sequence x of shape (batch, T, ...); its dim 1 is
    the time axis.  Every other floating tensor argument with the same (batch, T) leading shape is
    time-indexed too (a driving input u); other floating tensors are single inputs; everything else
    (masks, integers, floats such as ``beta``) is passed through unchanged.
    """

    def __init__(self, fn: Callable, args: Sequence, kwargs: Dict):
        if not args or not _is_float_tensor(args[0]) or args[0].dim() < 2:
            raise StructureError(
                "check_posterior: the first argument must be the observed sequence x, a floating "
                f"tensor of shape (batch, T, ...); got {_describe(args[0] if args else None)}")
        self.args, self.kwargs = tuple(args), dict(kwargs)
        x = args[0]
        self.batch, self.T = int(x.shape[0]), int(x.shape[1])
        names = _positional_names(fn, len(args))
        #: (key, name, time_indexed) for every floating tensor argument; key = int | str
        self.tensors: List[Tuple[object, str, bool]] = []
        for i, a in enumerate(args):
            if _is_float_tensor(a):
                self.tensors.append((i, names[i], self._timed(a)))
        for k, a in kwargs.items():
            if _is_float_tensor(a):
                self.tensors.append((k, k, self._timed(a)))
        self.time_indexed = {name: timed for _, name, timed in self.tensors}
        self.position = {name: n for n, (_, name, _) in enumerate(self.tensors)}

    def _timed(self, a: torch.Tensor) -> bool:
        return a.dim() >= 2 and tuple(a.shape[:2]) == (self.batch, self.T)

    def leaves(self) -> Dict[str, torch.Tensor]:
        """Fresh float64 leaves requiring grad, one per tensor argument (by name)."""
        out = {}
        for key, name, _ in self.tensors:
            a = self.args[key] if isinstance(key, int) else self.kwargs[key]
            out[name] = a.detach().to(torch.float64).clone().requires_grad_(True)
        return out

    def call(self, leaves: Dict[str, torch.Tensor]) -> Tuple[tuple, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for key, name, _ in self.tensors:
            if isinstance(key, int):
                args[key] = leaves[name]
            else:
                kwargs[key] = leaves[name]
        return tuple(args), kwargs

    def slices(self, name: str, grad: torch.Tensor) -> List[Optional[int]]:
        """0-based time steps of argument ``name`` where ``grad`` is non-zero ([None] for an
        argument without a time axis and a non-zero gradient)."""
        if not self.time_indexed[name]:
            return [None] if bool((grad != 0).any()) else []
        g = grad.detach().abs().transpose(0, 1).reshape(self.T, -1).amax(-1)
        return [int(s) for s in torch.nonzero(g > 0).flatten()]


def _is_float_tensor(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _describe(a) -> str:
    if isinstance(a, torch.Tensor):
        return f"a {a.dtype} tensor of shape {tuple(a.shape)}"
    return repr(type(a).__name__) if a is not None else "nothing"


def _positional_names(fn: Callable, n: int) -> List[str]:
    names: List[str] = []
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    names = names[:n]
    names += ["x" if i == 0 else f"arg{i}" for i in range(len(names), n)]
    return names


# ---- running model and guide with leaf values ----------------------------------------------

def is_discrete(site: dict) -> bool:
    """A latent site whose value is not a point of a continuum (integer dtype or a discrete
    support): no gradient reaches through it, only interventions on its support values."""
    v = site["value"]
    if not _is_float_tensor(v):
        return True
    support = getattr(site["fn"], "support", None)
    return bool(getattr(support, "is_discrete", False))


def _site_log_prob(site: dict) -> torch.Tensor:
    """log-density of the site's distribution at its own value held fixed: its gradient reads only
    the dependencies of the distribution's parameters, never the site's own value."""
    fn = site["fn"]
    value = site["value"].detach()
    return fn.log_prob(value).sum()


@contextmanager
def isolated(dtype=torch.float64) -> Iterator[None]:
    """A private parameter store (holding float64 copies of the current parameters) and a float64
    default dtype, both restored on exit; the caller's parameter store is left untouched."""
    store = pyro.get_param_store()
    state = store.get_state()
    state = {"params": {k: v.detach().to(dtype).clone() if v.is_floating_point() else v
                        for k, v in state["params"].items()},
             "constraints": dict(state["constraints"])}
    old_dtype = torch.get_default_dtype()
    with store.scope(state):
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old_dtype)


def float64_copies(model: Callable, guide: Callable) -> Tuple[Callable, Callable]:
    """Deep copies of model and guide (copied together, so that a guide holding its model keeps
    sharing it) with every torch module they hold cast to float64."""
    model, guide = copy.deepcopy((model, guide))
    seen: Set[int] = set()
    for fn in (model, guide):
        for module in _modules_of(fn):
            if id(module) not in seen:
                seen.add(id(module))
                module.double().eval()
    return model, guide


def _modules_of(fn) -> List[nn.Module]:
    owners = [fn, getattr(fn, "__self__", None)]
    found = []
    for owner in owners:
        if isinstance(owner, nn.Module):
            found.append(owner)
            # modules held as plain attributes (e.g. a guide's reference to its model)
            found += [v for v in vars(owner).values() if isinstance(v, nn.Module)]
    return found


# ---- one draw -------------------------------------------------------------------------------

@dataclass
class Draw:
    """Dependencies measured on one random draw.

    ``model_parents[site]`` and ``guide_parents[site]``: parent latent site names and
    (argument name, 0-based step) slices; ``observes[site]``: the argument slices an observed site's
    value is made of.
    """

    latent_order: List[str]                     # guide sampling order
    model_order: List[str]                      # every model sample site, in trace order
    observed: List[str]                         # observed model sites, in trace order
    observes: Dict[str, List[Tuple[str, Optional[int]]]]
    model_parents: Dict[str, Tuple[Set[str], Set[Tuple[str, Optional[int]]]]]
    guide_parents: Dict[str, Tuple[Set[str], Set[Tuple[str, Optional[int]]]]]
    #: the latent values of the draw, and the discrete latent sites among them
    values: Dict[str, torch.Tensor] = field(default_factory=dict)
    discrete: Set[str] = field(default_factory=set)
    #: site -> upstream variables whose absence an intervention established (latent names and
    #: argument slices, as in ``model_parents``); None: no interventions were run
    model_absent: Optional[Dict[str, Set]] = None
    guide_absent: Optional[Dict[str, Set]] = None
    #: every upstream variable (latent names, argument slices); those no intervention could vary
    upstream: List = field(default_factory=list)
    unvaried: Set = field(default_factory=set)
    batched: bool = True

    def add_evidence(self, ev: "Evidence") -> None:
        """Merge the edges and established absences of :func:`.intervene.intervene`."""
        self.model_absent, self.guide_absent = {}, {}
        for (kind, site), keys in ev.edges.items():
            parents, slices = (self.model_parents if kind == "model" else self.guide_parents)[site]
            for k in keys:
                (parents.add if isinstance(k, str) else slices.add)(k)
        for (kind, site), keys in ev.absent.items():
            (self.model_absent if kind == "model" else self.guide_absent)[site] = set(keys)
        self.unvaried = set(ev.unvaried)
        self.batched = ev.batched


def _dependencies(sites: List[dict], latent_leaves: Dict[str, torch.Tensor],
                  arg_leaves: Dict[str, torch.Tensor], arguments: Arguments, rtol: float
                  ) -> Dict[str, Tuple[Set[str], Set[Tuple[str, Optional[int]]]]]:
    names_l, names_a = list(latent_leaves), list(arg_leaves)
    inputs = [latent_leaves[n] for n in names_l] + [arg_leaves[n] for n in names_a]
    out = {}
    for site in sites:
        lp = _site_log_prob(site)
        parents: Set[str] = set()
        slices: Set[Tuple[str, Optional[int]]] = set()
        out[site["name"]] = (parents, slices)
        if not lp.requires_grad:
            continue
        grads = torch.autograd.grad(lp, inputs, retain_graph=True, allow_unused=True)
        scale = max((float(g.abs().max()) for g in grads if g is not None and g.numel()),
                    default=0.0)
        if not scale > 0:
            continue
        thresh = rtol * scale
        for name, g in zip(names_l, grads[:len(names_l)]):
            if g is not None and float(g.abs().max()) > thresh:
                parents.add(name)
        for name, g in zip(names_a, grads[len(names_l):]):
            if g is not None:
                g = torch.where(g.abs() > thresh, g, torch.zeros_like(g))
                slices.update((name, s) for s in arguments.slices(name, g))
    return out


def trace_draw(model: Callable, guide: Callable, arguments: Arguments, rtol: float
               ) -> Tuple[Draw, list]:
    """Sample the guide once, then run guide and model with those latent values as float64 leaves
    and read every site's dependencies by gradient (see the module docstring).  Returns the draw
    and the upstream variables to intervene on (:func:`.intervene.upstream_variables`)."""
    args, kwargs = arguments.call(arguments.leaves())
    with torch.no_grad():
        first = poutine.trace(guide).get_trace(*args, **kwargs)
    guide_latents = latent_names(first)
    if not guide_latents:
        raise StructureError("the guide samples no latent site")
    discrete = {n for n in guide_latents if is_discrete(first.nodes[n])}
    values = {n: first.nodes[n]["value"].detach().clone() if n in discrete else
              first.nodes[n]["value"].detach().to(torch.float64).clone().requires_grad_(True)
              for n in guide_latents}
    leaves = {n: v for n, v in values.items() if n not in discrete}

    # guide, with its own argument leaves
    g_leaves = arguments.leaves()
    args, kwargs = arguments.call(g_leaves)
    setter = SetLatents(values)
    g_tr = poutine.trace(setter(guide)).get_trace(*args, **kwargs)
    g_sites = [s for s in sample_sites(g_tr) if not s["is_observed"]]
    if [s["name"] for s in g_sites] != guide_latents:
        raise StructureError(
            "the guide samples different sites from one run to the next "
            f"({guide_latents} then {[s['name'] for s in g_sites]})")

    # model
    m_leaves = arguments.leaves()
    args, kwargs = arguments.call(m_leaves)
    setter = SetLatents(values)
    m_tr = poutine.trace(setter(model)).get_trace(*args, **kwargs)
    m_sites = sample_sites(m_tr)
    extra = [n for n in guide_latents if n not in m_tr.nodes]
    observed_by_model = [n for n in guide_latents
                         if n in m_tr.nodes and m_tr.nodes[n]["is_observed"]]
    if setter.unset:
        raise StructureError(
            f"the model samples latent site(s) {', '.join(setter.unset)} that the guide does not "
            "sample: the guide must sample every latent site of the model")
    if extra:
        raise StructureError(
            f"the guide samples site(s) {', '.join(extra)} that the model does not have")
    if observed_by_model:
        raise StructureError(
            f"the guide samples site(s) {', '.join(observed_by_model)} that the model observes")

    # observed sites -> argument slices
    observed = [s["name"] for s in m_sites if s["is_observed"]]
    observes: Dict[str, List[Tuple[str, Optional[int]]]] = {}
    a_names = list(m_leaves)
    for s in m_sites:
        if not s["is_observed"]:
            continue
        v = s["value"]
        found: List[Tuple[str, Optional[int]]] = []
        if isinstance(v, torch.Tensor) and v.requires_grad:
            grads = torch.autograd.grad(v.sum(), [m_leaves[n] for n in a_names],
                                        retain_graph=True, allow_unused=True)
            for n, g in zip(a_names, grads):
                if g is not None:
                    found += [(n, t) for t in arguments.slices(n, g)]
        observes[s["name"]] = found

    fixed = {n: v.detach() for n, v in values.items()}
    upstream = upstream_variables(arguments, fixed, {s["name"]: s for s in g_sites}, discrete)
    draw = Draw(
        latent_order=guide_latents,
        model_order=[s["name"] for s in m_sites],
        observed=observed,
        observes=observes,
        model_parents=_dependencies(m_sites, leaves, m_leaves, arguments, rtol),
        guide_parents=_dependencies(g_sites, leaves, g_leaves, arguments, rtol),
        values=fixed,
        discrete=discrete,
        upstream=[u.key for u in upstream],
    )
    return draw, upstream


# ---- the compact graph --------------------------------------------------------------------------

@dataclass
class Structure:
    """What the code says: the compact model DAG and the guide's dependencies, over :class:`Var`.

    ``parents[v]``: parents of every latent and observed variable in the model;
    ``guide_parents[z]``: the variables that change the parameters of q at latent ``z``;
    ``latents``: in the guide's sampling order; ``observed`` and ``inputs``: conditioning variables.
    """

    latents: List[Var]
    observed: List[Var]
    inputs: List[Var]
    parents: Dict[Var, Set[Var]]
    guide_parents: Dict[Var, Set[Var]]
    site_of: Dict[Var, str]
    T: int
    family_order: Dict[str, int]
    #: edges into a variable that no method found and no intervention ruled out (only non-empty
    #: sets): ``undetermined[v]`` for the model, ``guide_undetermined[z]`` for the guide
    undetermined: Dict[Var, Set[Var]] = field(default_factory=dict)
    guide_undetermined: Dict[Var, Set[Var]] = field(default_factory=dict)
    #: whether every draw's interventions ran in one batch; how many draws were read
    batched: bool = True
    draws: int = 1
    #: what the reading could not do (a re-initialisation the model could not run, ...)
    notes: List[str] = field(default_factory=list)


def latent_vars(names: Sequence[str]) -> Dict[str, Var]:
    """``NAME_t`` sites shared by at least two sites form a family; other names are single."""
    parsed = {n: _INDEXED.match(n) for n in names}
    counts: Dict[str, int] = {}
    for m in parsed.values():
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    out = {}
    for n, m in parsed.items():
        if m and counts[m.group(1)] >= 2:
            out[n] = Var(m.group(1), int(m.group(2)), LATENT)
        else:
            out[n] = Var(n, None, LATENT)
    return out


def build_structure(draws: List[Draw], arguments: Arguments) -> Structure:
    """Merge the draws (an edge seen in any draw is an edge) into a :class:`Structure`."""
    d0 = draws[0]
    for d in draws[1:]:
        if d.latent_order != d0.latent_order or d.observed != d0.observed:
            raise StructureError("the model or the guide samples different sites from one run "
                                 "to the next; check_posterior needs a fixed set of sites")
    lat = latent_vars(d0.latent_order)

    # observed sites: named after the argument slice they observe when they observe exactly one
    slice_owner: Dict[Tuple[str, Optional[int]], List[Var]] = {}
    obs_var: Dict[str, Var] = {}
    single = latent_vars([n for n in d0.observed])  # NAME_t grouping for unmapped sites
    for name in d0.observed:
        covered = sorted(set().union(*[set(d.observes[name]) for d in draws]),
                         key=lambda s: (s[0], -1 if s[1] is None else s[1]))
        if len(covered) == 1:
            a, s = covered[0]
            var = Var(a, None if s is None else s + 1, OBSERVED)
        else:
            base = single[name]
            var = Var(base.family, base.index, OBSERVED)
        if var in obs_var.values():
            raise StructureError(f"two observed sites observe the same variable {var}")
        obs_var[name] = var
        for sl in covered:
            slice_owner.setdefault(sl, []).append(var)

    inputs: Dict[Tuple[str, Optional[int]], Var] = {}

    def slice_vars(sl: Tuple[str, Optional[int]]) -> List[Var]:
        if sl in slice_owner:
            return slice_owner[sl]
        if sl not in inputs:
            a, s = sl
            inputs[sl] = Var(a, None if s is None else s + 1, INPUT)
        return [inputs[sl]]

    site_var = dict(lat)
    site_var.update(obs_var)
    parents: Dict[Var, Set[Var]] = {v: set() for v in site_var.values()}
    guide_parents: Dict[Var, Set[Var]] = {lat[n]: set() for n in d0.latent_order}
    for d in draws:
        for name, (lp, sl) in d.model_parents.items():
            v = site_var[name]
            for p in lp:
                parents[v].add(lat[p])
            for s in sl:
                parents[v].update(slice_vars(s))
        for name, (lp, sl) in d.guide_parents.items():
            v = lat[name]
            for p in lp:
                guide_parents[v].add(lat[p])
            for s in sl:
                guide_parents[v].update(slice_vars(s))
    for v, ps in parents.items():
        if v in ps:
            raise StructureError(
                f"the distribution of {v} depends on its own value: the model is not a directed "
                "acyclic graph (a non-causal computation, or an observation fed to its own "
                "decoder?)")
    for v, ps in guide_parents.items():
        ps.discard(v)  # a guide's own value never enters its parameters; guard anyway

    # edges neither found nor ruled out by an intervention (module docstring)
    def unknown(site: str, found: Set[Var], absent_of) -> Set[Var]:
        absent = set().union(*[absent_of(d).get(site, set()) for d in draws])
        per_var: Dict[Var, bool] = {}
        for key in d0.upstream:
            owners = [lat[key]] if isinstance(key, str) else slice_owner.get(key)
            ruled_out = key in absent
            for var in owners or [Var(key[0], None if key[1] is None else key[1] + 1, INPUT)]:
                per_var[var] = per_var.get(var, True) and ruled_out
        out = set()
        for var, ruled_out in per_var.items():
            if not ruled_out and var not in found and var != site_var[site]:
                out.add(slice_vars((var.family, None if var.index is None else var.index - 1))[0]
                        if var.kind == INPUT else var)
        return out

    undetermined = {site_var[n]: unknown(n, parents[site_var[n]],
                                         lambda d: d.model_absent or {})
                    for n in d0.model_order}
    guide_undetermined = {lat[n]: unknown(n, guide_parents[lat[n]],
                                          lambda d: d.guide_absent or {})
                          for n in d0.latent_order}

    # family order: latent families by sampling order, then observed, then inputs (by argument)
    order: Dict[str, int] = {}
    for n in d0.latent_order:
        order.setdefault(lat[n].family, len(order))
    obs_list = list(obs_var.values())
    for v in sorted(obs_list, key=lambda v: (arguments.position.get(v.family, 10 ** 6),
                                             obs_list.index(v))):
        order.setdefault(v.family, len(order))
    input_list = sorted(inputs.values(),
                        key=lambda v: (arguments.position.get(v.family, 10 ** 6), v.index or 0))
    for v in input_list:
        order.setdefault(v.family, len(order))

    return Structure(
        latents=[lat[n] for n in d0.latent_order],
        observed=obs_list,
        inputs=input_list,
        parents=parents,
        guide_parents=guide_parents,
        site_of={v: n for n, v in site_var.items()},
        T=arguments.T,
        family_order=order,
        undetermined={v: ps for v, ps in undetermined.items() if ps},
        guide_undetermined={v: ps for v, ps in guide_undetermined.items() if ps},
        batched=all(d.batched for d in draws),
        draws=len(draws),
    )


def reinitialise(model: Callable, guide: Callable) -> None:
    """Draw new values for the trainable parameters of the (copied) model and guide, in place.

    Every submodule with ``reset_parameters`` (torch's layers) is reset to its default random
    initialisation; every other trainable parameter, and every parameter of Pyro's (private)
    parameter store, gets Gaussian noise of its own root-mean-square size (0.3 where it is all
    zero), as does a parameter still all zero after its reset -- so that weights the user set to
    zero cannot hide a dependency.  Frozen parameters (``requires_grad=False``, e.g. masks) and
    buffers are left alone.  Draws from torch's global random state (which
    :func:`read_structure` forks and seeds).
    """
    modules: List[nn.Module] = []
    for fn in (model, guide):
        for m in _modules_of(fn):
            modules += [sub for sub in m.modules() if all(sub is not o for o in modules)]
    reset: Set[int] = set()
    for m in modules:
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
            reset.update(id(p) for p in m.parameters(recurse=False))
    params = {id(p): p for m in modules for p in m.parameters()}
    store = pyro.get_param_store()
    params.update({id(p): p for _, p in store.named_parameters()})
    with torch.no_grad():
        for key, p in params.items():
            if not p.requires_grad or not p.is_floating_point():
                continue
            if key in reset and bool((p != 0).any()):
                continue
            rms = float(p.pow(2).mean().sqrt()) if p.numel() else 0.0
            scale = rms if rms > 0 else 0.3
            p.add_(scale * torch.randn(p.shape, dtype=p.dtype))


def read_structure(model: Callable, guide: Callable, *args, draws: int = 1, reinits: int = 2,
                   rtol: float = 1e-10, seed: int = 0, **kwargs) -> Structure:
    """Measure the compact model DAG and the guide's dependencies (module docstring).

    ``model`` and ``guide`` are any Pyro callables taking the same arguments, the observed sequence
    x of shape (batch, T, ...) first.  They are deep-copied and cast to float64; the caller's
    objects, parameter store and random state are not modified.  ``draws`` guide draws are read at
    the caller's parameters, then one at each of ``reinits`` re-initialisations of the copies'
    parameters (:func:`reinitialise`); every draw is read by gradient and by intervention.
    """
    arguments = Arguments(model, args, kwargs)
    results: List[Draw] = []
    notes: List[str] = []
    with isolated(), torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed also seeds devices: slow)
        m, g = float64_copies(model, guide)
        n_user = max(1, int(draws))
        for i in range(n_user + max(0, int(reinits))):
            if i >= n_user:
                reinitialise(m, g)
            try:
                draw, upstream = trace_draw(m, g, arguments, rtol)
            except StructureError:
                raise
            except Exception as e:  # noqa: BLE001 -- a re-initialisation the model cannot run
                if i < n_user:
                    raise
                notes.append(f"re-initialisation {i - n_user + 1} could not be read "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")
                continue
            draw.add_evidence(intervene(m, g, arguments, draw.values, upstream))
            results.append(draw)
    structure = build_structure(results, arguments)
    structure.notes = notes + structure.notes
    return structure
