"""Reading dependencies by value interventions (the second method of :mod:`.graph`).

An upstream variable -- a latent site's value, or one time step of a tensor argument (``x_s``,
``u_s``) -- is replaced by other values while every other latent value and argument is held fixed
(the latents are conditioned on, as in :mod:`.graph`), model and guide are run again, and every
site's distribution is compared with the one of the unmodified run.  A site whose distribution
changed depends on the replaced variable: an edge, whether the value reached it through a gradient
path or not (``.detach()``, ``torch.sign``, a saturated or inactive nonlinearity, a Python branch).

- Replacement values, elementwise, for a continuous value v: 0, -v, v + 10, v - 10 and 100 v (small,
  sign-flipped and large values); for a discrete value: every point of its support when it is
  enumerable (at most :data:`MAX_SUPPORT` points), else v + 1, v + 2 and 0 where in the support.
- A distribution is compared through its log-density at a few fixed points (its own value and two
  shifted or scaled copies of it, or every support point of a discrete one, chosen once on the
  unmodified run; its mean and variance too where fewer than two points have a finite density); a
  change larger than 1e-8 (1 + max |base|) in any of them is a change (rounding in batched linear
  algebra grows with the largest magnitudes).  A comparison
  whose result is not finite (a replacement that overflowed or left the likelihood's support) tells
  nothing either way and is not counted.
- All interventions of one draw run as one batch: the sequences of the batch are repeated, one copy
  per intervention plus an unmodified copy, which must reproduce the unmodified run (a program that
  mixes the sequences of a batch, or branches on them as a whole, fails this and is rerun one
  intervention at a time, as is a group whose batched run raises).

The outcome per (site, upstream variable): an edge (some replacement changed the distribution), or
an established absence (at least one clean comparison and no change; for a discrete upstream value,
every point of an enumerable support compared inside plates), or nothing known.  A replacement that
changes which sites the program samples (Python control flow) leaves that variable unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import constraints

from .sites import sample_sites, SetLatents

#: an upstream variable: a latent site's name, or (argument name, 0-based step or None)
Key = Union[str, Tuple[str, Optional[int]]]

MAX_SUPPORT = 16
_TOL = 1e-8


@dataclass
class Evidence:
    """What the interventions of one draw established.

    ``edges[site]``: upstream keys whose replacement changed the site's distribution;
    ``absent[site]``: keys compared cleanly without a change; ``unvaried``: keys whose replacement
    changed the set of sites sampled (nothing can be compared); ``batched``: whether every
    intervention ran in one batch.  Sites are ``("model", name)`` or ``("guide", name)``.
    """

    edges: Dict[Tuple[str, str], Set[Key]] = field(default_factory=dict)
    absent: Dict[Tuple[str, str], Set[Key]] = field(default_factory=dict)
    unvaried: Set[Key] = field(default_factory=set)
    batched: bool = True


@dataclass
class Upstream:
    """One variable to intervene on, with its base value and replacement values."""

    key: Key
    base: torch.Tensor
    candidates: List[torch.Tensor]
    #: a discrete value whose whole support is among the candidates, inside plates
    exhaustive: bool = False
    discrete: bool = False


# ---- replacement values -------------------------------------------------------------------------

def continuous_candidates(v: torch.Tensor) -> List[torch.Tensor]:
    v = v.detach()
    return [torch.zeros_like(v), -v, v + 10, v - 10, 100 * v]


def discrete_candidates(site: dict) -> Tuple[List[torch.Tensor], bool]:
    """Replacement values of a discrete latent site, and whether they cover its support inside
    plates (each element of the value one support point, the elements independent)."""
    fn, v = site["fn"], site["value"].detach()
    if getattr(fn, "has_enumerate_support", False):
        try:
            support = fn.enumerate_support(expand=False)
        except (NotImplementedError, RuntimeError, ValueError):
            support = None
        if support is not None and 0 < support.shape[0] <= MAX_SUPPORT:
            cands = []
            for k in range(support.shape[0]):
                c = support[k].to(v.dtype)
                try:
                    cands.append(c.expand_as(v).clone())
                except RuntimeError:
                    cands = []
                    break
            if cands:
                plated = {f.dim for f in site.get("cond_indep_stack", ()) if f.vectorized}
                shape = fn.batch_shape
                covered = all(d in plated or shape[d] == 1 for d in range(-len(shape), 0))
                return cands, covered
    cands = []
    for c in (v + 1, v + 2, torch.zeros_like(v)):
        try:
            ok = bool(fn.support.check(c).all())
        except (NotImplementedError, RuntimeError, TypeError):
            ok = False
        if ok:
            cands.append(c)
    return cands, False


# ---- comparing distributions --------------------------------------------------------------------

def _probes(site: dict) -> List[torch.Tensor]:
    fn, v = site["fn"], site["value"].detach()
    probes = [v.clone()]
    support = getattr(fn, "support", None)
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    if support is not None and not support.is_discrete and v.is_floating_point():
        if base is constraints.real:
            probes += [v + 0.5, v - 1.3]
        elif base is constraints.positive:
            probes += [1.7 * v, 0.4 * v]
    elif support is not None and support.is_discrete:
        cands, _ = discrete_candidates(site)
        probes += cands
    return probes


#: a compared quantity: ("log_prob", probe indices) -- the log-density at those probes, stacked
#: along a new last dimension --, ("mean", ()) or ("variance", ())
Piece = Tuple[str, Tuple[int, ...]]


def _pieces(fn, probes: Sequence[torch.Tensor], recipe: Sequence[Piece]) -> List[torch.Tensor]:
    """The quantities of ``recipe`` for distribution ``fn`` (float64, detached)."""
    out = []
    for kind, idx in recipe:
        if kind == "log_prob":
            lp = fn.log_prob(torch.stack([probes[i] for i in idx]))
            if lp.dim() == 0 or lp.shape[0] != len(idx):
                raise ValueError("log_prob does not broadcast over stacked values")
            p = lp.movedim(0, -1)
        else:
            p = getattr(fn, kind)
        out.append(torch.as_tensor(p).detach().to(torch.float64))
    return out


@dataclass
class _SiteProbe:
    probes: List[torch.Tensor]
    recipe: List[Piece]
    base: List[torch.Tensor]


def _finite(p: torch.Tensor) -> bool:
    return bool(p.numel()) and bool(torch.isfinite(p).all())


def _site_probe(site: dict) -> Optional[_SiteProbe]:
    """The quantities of ``site`` that evaluate to finite tensors on the unmodified run: the
    log-density at its probes (all in one call where the distribution broadcasts, else one call
    per probe), its mean and its variance."""
    probes = _probes(site)
    fn = site["fn"]
    recipe: List[Piece] = []
    base: List[torch.Tensor] = []

    def evaluate(piece: Piece) -> Optional[torch.Tensor]:
        try:
            return _pieces(fn, probes, [piece])[0]
        except Exception:  # noqa: BLE001 -- a quantity the distribution does not provide
            return None

    def add(piece: Piece, p: Optional[torch.Tensor]) -> None:
        if p is not None and _finite(p):
            recipe.append(piece)
            base.append(p)

    every = tuple(range(len(probes)))
    p = evaluate(("log_prob", every))
    if p is not None:
        good = tuple(i for i in every if _finite(p[..., i]))
        if good == every:
            add(("log_prob", every), p)
        elif good:
            add(("log_prob", good), evaluate(("log_prob", good)))
    else:
        for i in every:
            add(("log_prob", (i,)), evaluate(("log_prob", (i,))))
    if sum(len(idx) for kind, idx in recipe) < 2:  # a log-density at one point: add moments
        for kind in ("mean", "variance"):
            add((kind, ()), evaluate((kind, ())))
    return _SiteProbe(probes, recipe, base) if recipe else None


# ---- running the program ------------------------------------------------------------------------

def _run(model: Callable, guide: Callable, setter: Callable, args_g, kw_g, args_m, kw_m):
    """Guide then model with every latent set (``setter()`` gives a fresh messenger), no grad,
    validation off; returns the guide's latent sites and the model's sample sites by name."""
    with torch.no_grad(), pyro.validation_enabled(False):
        g_tr = poutine.trace(setter()(guide)).get_trace(*args_g, **kw_g)
        m_tr = poutine.trace(setter()(model)).get_trace(*args_m, **kw_m)
    g = {s["name"]: s for s in sample_sites(g_tr) if not s["is_observed"]}
    m = {s["name"]: s for s in sample_sites(m_tr)}
    return g, m


def _layout(g: Dict[str, dict], m: Dict[str, dict]) -> Tuple:
    return (tuple(g), tuple((n, bool(s["is_observed"])) for n, s in m.items()))


class _Experiment:
    """The unmodified run of one draw, and the interventions on it."""

    def __init__(self, model, guide, arguments, values: Dict[str, torch.Tensor],
                 upstream: List[Upstream]):
        self.model, self.guide, self.arguments = model, guide, arguments
        self.values, self.upstream = values, upstream
        self._setter = SetLatents
        self.batch = arguments.batch
        g, m = self._call(values, self._base_args())
        self.layout = _layout(g, m)
        self.sites = {("guide", n): s for n, s in g.items()}
        self.sites.update({("model", n): s for n, s in m.items()})
        self.probe = {k: _site_probe(s) for k, s in self.sites.items()}

    # arguments: name -> tensor, for every floating tensor argument
    def _base_args(self) -> Dict[str, torch.Tensor]:
        a = self.arguments
        return {name: (a.args[key] if isinstance(key, int) else a.kwargs[key]).detach()
                .to(torch.float64) for key, name, _ in a.tensors}

    def _call(self, values, tensors: Dict[str, torch.Tensor], repeat: int = 1):
        a = self.arguments

        def build():
            args, kwargs = list(a.args), dict(a.kwargs)
            for key, name, _ in a.tensors:
                t = tensors[name].clone()
                if isinstance(key, int):
                    args[key] = t
                else:
                    kwargs[key] = t
            if repeat > 1:  # other per-sequence tensors (masks) follow the repeated batch
                float_keys = {key for key, _, _ in a.tensors}
                for i, v in enumerate(args):
                    if i not in float_keys and _per_sequence(v, self.batch):
                        args[i] = _tile(v, repeat)
                for k, v in kwargs.items():
                    if k not in float_keys and _per_sequence(v, self.batch):
                        kwargs[k] = _tile(v, repeat)
            return tuple(args), kwargs

        args_g, kw_g = build()
        args_m, kw_m = build()
        return _run(self.model, self.guide, lambda: self._setter(values), args_g, kw_g,
                    args_m, kw_m)

    # ---- one intervention at a time -------------------------------------------------------
    def _modified(self, up: Upstream, cand: torch.Tensor):
        values = dict(self.values)
        tensors = self._base_args()
        if isinstance(up.key, str):
            values[up.key] = cand
        else:
            name, step = up.key
            t = tensors[name].clone()
            if step is None:
                t = cand.to(t.dtype)
            else:
                t[:, step] = cand
            tensors[name] = t
        return values, tensors

    def run_one(self, up: Upstream, cand: torch.Tensor) -> Optional[Dict]:
        """site -> True/False/None for one intervention; None when it raised; "layout" when the
        program sampled other sites."""
        values, tensors = self._modified(up, cand)
        try:
            g, m = self._call(values, tensors)
        except Exception:  # noqa: BLE001 -- a replacement the program cannot run with
            return None
        if _layout(g, m) != self.layout:
            return "layout"
        sites = {("guide", n): s for n, s in g.items()}
        sites.update({("model", n): s for n, s in m.items()})
        return {k: self._compare(probe, sites[k]["fn"])[0] for k, probe in self.probe.items()}

    def _compare(self, probe: Optional[_SiteProbe], fn, copies: int = 1
                 ) -> List[Optional[bool]]:
        """For each of ``copies`` repeats of the batch: whether ``fn`` differs from the
        unmodified run (True), equals it (False) or cannot be compared (None)."""
        if probe is None:
            return [None] * copies
        probes = probe.probes if copies == 1 else [_tile(p, copies) for p in probe.probes]
        try:
            pieces = _pieces(fn, probes, probe.recipe)
        except Exception:  # noqa: BLE001 -- a distribution that cannot be evaluated here
            return [None] * copies
        changed = torch.zeros(copies, dtype=torch.bool)
        unknown = torch.zeros(copies, dtype=torch.bool)
        for base, new in zip(probe.base, pieces):
            if new.numel() != copies * base.numel() or (
                    copies > 1 and new.shape[:1] != (copies * base.shape[0],)):
                return [None] * copies
            new = new.reshape(copies, *base.shape)
            finite = torch.isfinite(new)
            # rounding in batched linear algebra scales with the largest magnitudes involved
            diff = finite & ((new - base).abs() > _TOL * (1 + base.abs().amax()))
            changed |= diff.reshape(copies, -1).any(1)
            unknown |= ~finite.reshape(copies, -1).all(1)
        return [True if c else (None if u else False)
                for c, u in zip(changed.tolist(), unknown.tolist())]

    # ---- all interventions in one batch -----------------------------------------------------
    def batchable(self) -> bool:
        b = self.batch
        ok = all(v.dim() >= 1 and v.shape[0] == b for v in self.values.values())
        ok = ok and all(t.dim() >= 1 and t.shape[0] == b for t in self._base_args().values())
        for probe in self.probe.values():
            if probe is not None:
                ok = ok and all(p.dim() >= 1 and p.shape[0] == b for p in probe.base)
                ok = ok and all(p.dim() >= 1 and p.shape[0] == b for p in probe.probes)
        return ok

    def run_batch(self, jobs: List[Tuple[Upstream, torch.Tensor]]) -> Optional[List[Dict]]:
        """Every job in one run (copy 0 unmodified); None when the batch cannot be trusted."""
        n, b = len(jobs) + 1, self.batch
        values = {k: _tile(v, n) for k, v in self.values.items()}
        tensors = {k: _tile(v, n) for k, v in self._base_args().items()}
        for i, (up, cand) in enumerate(jobs, start=1):
            rows = slice(i * b, (i + 1) * b)
            if isinstance(up.key, str):
                values[up.key][rows] = cand
            else:
                name, step = up.key
                if step is None:
                    tensors[name][rows] = cand
                else:
                    tensors[name][rows, step] = cand
        try:
            g, m = self._call(values, tensors, repeat=n)
        except Exception:  # noqa: BLE001 -- split the batch
            return None
        if _layout(g, m) != self.layout:
            return None
        sites = {("guide", k): s for k, s in g.items()}
        sites.update({("model", k): s for k, s in m.items()})
        per_site = {k: self._compare(probe, sites[k]["fn"], n) for k, probe in self.probe.items()}
        # the unmodified copy must reproduce the unmodified run
        if any(self.probe[k] is not None and c[0] is not False for k, c in per_site.items()):
            return None
        return [{k: c[i] for k, c in per_site.items()} for i in range(1, n)]


def _per_sequence(v, batch: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch


def _tile(v: torch.Tensor, n: int) -> torch.Tensor:
    return v.repeat(n, *([1] * (v.dim() - 1))) if n > 1 else v.clone()


# ---- the driver ---------------------------------------------------------------------------------

def intervene(model: Callable, guide: Callable, arguments, values: Dict[str, torch.Tensor],
              upstream: List[Upstream]) -> Evidence:
    """Run every intervention of ``upstream`` (module docstring) and collect the evidence."""
    exp = _Experiment(model, guide, arguments, values, upstream)
    jobs = [(up, c) for up in upstream for c in up.candidates]
    kinds = [k for up in upstream for k in range(len(up.candidates))]
    results: List = [None] * len(jobs)
    batched = exp.batchable()
    out = exp.run_batch(jobs) if batched else None
    if out is not None:
        results = out
    elif batched:  # one batch per kind of replacement value; a failed one, one at a time
        batched = False
        for kind in sorted(set(kinds)):
            idx = [j for j, k in enumerate(kinds) if k == kind]
            sub = exp.run_batch([jobs[j] for j in idx])
            for n, j in enumerate(idx):
                results[j] = sub[n] if sub is not None else exp.run_one(*jobs[j])
    else:
        results = [exp.run_one(up, c) for up, c in jobs]

    ev = Evidence(batched=batched)
    by_key: Dict[Key, List[Optional[Dict]]] = {}
    for (up, _), res in zip(jobs, results):
        by_key.setdefault(up.key, []).append(res)
    for up in upstream:
        res = by_key.get(up.key, [])
        if any(r == "layout" for r in res):
            ev.unvaried.add(up.key)
        runs = [r for r in res if isinstance(r, dict)]
        for site in exp.probe:
            if site == ("model", up.key) or site == ("guide", up.key):
                continue
            seen = [r[site] for r in runs]
            if any(c is True for c in seen):
                ev.edges.setdefault(site, set()).add(up.key)
            elif up.key in ev.unvaried:
                continue
            elif up.discrete:
                if up.exhaustive and len(runs) == len(up.candidates) and seen \
                        and all(c is False for c in seen):
                    ev.absent.setdefault(site, set()).add(up.key)
            elif any(c is False for c in seen):
                ev.absent.setdefault(site, set()).add(up.key)
    return ev


def upstream_variables(arguments, values: Dict[str, torch.Tensor], sites: Dict[str, dict],
                       discrete: Set[str]) -> List[Upstream]:
    """Every latent value (guide sites ``sites``) and every step of every floating tensor
    argument, with its replacement values."""
    out = []
    for name, v in values.items():
        if name in discrete:
            cands, exhaustive = discrete_candidates(sites[name])
            out.append(Upstream(name, v, cands, exhaustive, True))
        else:
            out.append(Upstream(name, v, continuous_candidates(v)))
    for key, name, timed in arguments.tensors:
        a = (arguments.args[key] if isinstance(key, int) else arguments.kwargs[key])
        a = a.detach().to(torch.float64)
        if timed:
            for s in range(arguments.T):
                out.append(Upstream((name, s), a[:, s], continuous_candidates(a[:, s])))
        else:
            out.append(Upstream((name, None), a, continuous_candidates(a)))
    return out
