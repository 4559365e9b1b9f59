"""``check_posterior``: does a guide condition on what the exact posterior depends on? (4.2)

>>> from pyro_dvae import build, check_posterior
>>> model, guide = build("srnn", "filtering", x_dim=4, z_dim=2)
>>> report = check_posterior(model.model, guide, torch.rand(2, 7, 4) + 0.1)
>>> print(report)                      # a table in the paper's notation
>>> report.to_dict()["latents"][0]["missing"]
['x_{t+1:T}']

The model's compact DAG and the guide's dependencies are read from the running code
(:mod:`.graph`), the exact posterior's conditioning sets follow by D-separation (:mod:`.dsep`), and
both are written per latent family in the paper's notation (:mod:`.notation`).  "missing": in the
exact posterior but not in the guide; "extra": in the guide but not in the exact posterior.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import networkx as nx

from .dsep import compact_dag, exact_posterior
from .graph import LATENT, Structure, Var, read_structure
from .notation import summarise

_COLUMNS = ("exact", "guide", "missing", "extra", "undetermined")

CONSISTENT, NOT_CONSISTENT, UNDETERMINED = "consistent", "not consistent", "undetermined"


@dataclass
class LatentReport:
    """One latent family (``z_t``) or single latent (``v``), in the paper's notation."""

    latent: str
    exact: List[str]
    guide: List[str]
    missing: List[str]
    extra: List[str]
    consistent: bool
    #: the sites of the family, in sampling order
    sites: List[Var] = field(default_factory=list)
    #: column -> step -> the actual set (absolute notation) at steps the pattern does not give
    deviations: Dict[str, Dict[Optional[int], List[str]]] = field(default_factory=dict)
    #: variables that may or may not belong to the exact posterior's or the guide's set, because an
    #: edge could not be determined (:mod:`.graph`); "exact"/"guide" hold the determined part
    undetermined: List[str] = field(default_factory=list)
    #: "consistent", "not consistent" (a difference that holds whatever the undetermined edges
    #: are) or "undetermined" (no sure difference, but undetermined edges that matter)
    status: str = CONSISTENT

    def to_dict(self) -> dict:
        return {"latent": self.latent, "exact": list(self.exact), "guide": list(self.guide),
                "missing": list(self.missing), "extra": list(self.extra),
                "consistent": bool(self.consistent), "status": self.status,
                "undetermined": list(self.undetermined)}

    @property
    def verdict(self) -> str:
        if self.consistent:
            return "consistent"
        if self.status == UNDETERMINED and not self.missing and not self.extra:
            return "cannot tell: undetermined " + ", ".join(self.undetermined or ["edges"])
        parts = []
        if self.missing:
            parts.append("missing " + ", ".join(self.missing))
        if self.extra:
            parts.append("extra " + ", ".join(self.extra))
        for col in ("missing", "extra"):  # differences the general pattern does not show
            if not getattr(self, col):
                for t, items in sorted(self.deviations.get(col, {}).items(),
                                       key=lambda kv: kv[0] or 0):
                    if items:
                        parts.append(f"{col} {', '.join(items)} at {self._step(t)}")
        return "; ".join(parts) or "differs at boundary steps"

    def _step(self, t: Optional[int]) -> str:
        return self.latent if t is None else self.latent.replace("_t", f"_{t}", 1)

    def notes(self) -> List[str]:
        """Boundary (or irregular) steps whose sets are not the truncated general pattern."""
        out = []
        for col in _COLUMNS:
            for t, items in sorted(self.deviations.get(col, {}).items(),
                                   key=lambda kv: kv[0] or 0):
                out.append(f"{self._step(t)}: {col} = {', '.join(items) if items else '(nothing)'}")
        return out


@dataclass
class PosteriorReport:
    """The result of :func:`check_posterior`.

    ``to_dict()`` gives the JSON-ready summary; ``str(report)`` a table.  The measured structure is
    kept for inspection: ``structure`` (the compact DAG's parents and the guide's dependencies per
    variable), ``exact_sets`` (per latent site), ``graph`` (networkx DiGraph of the compact model).
    """

    model: Optional[str]
    guide: Optional[str]
    latents: List[LatentReport]
    structure: Structure
    exact_sets: Dict[Var, Set[Var]]
    graph: nx.DiGraph
    #: the exact sets with every undetermined model edge added (None: nothing undetermined)
    exact_upper: Optional[Dict[Var, Set[Var]]] = None

    @property
    def consistent(self) -> bool:
        return all(r.consistent for r in self.latents)

    @property
    def status(self) -> str:
        """"consistent", "not consistent" (some latent surely is not) or "undetermined"."""
        statuses = {r.status for r in self.latents}
        if NOT_CONSISTENT in statuses:
            return NOT_CONSISTENT
        return UNDETERMINED if UNDETERMINED in statuses else CONSISTENT

    @property
    def exit_code(self) -> int:
        """What ``pyro-dvae check-posterior`` exits with: 0 consistent, 3 not consistent,
        4 undetermined (no latent surely inconsistent, but some verdict not determined)."""
        return {CONSISTENT: 0, NOT_CONSISTENT: 3, UNDETERMINED: 4}[self.status]

    @property
    def T(self) -> int:
        return self.structure.T

    def undetermined_edges(self) -> Dict[str, List[str]]:
        """Edges no method found and no intervention ruled out: ``{"model": ["z_1 -> x_2", ...],
        "guide": [...]}`` (a guide edge ``x_3 -> z_2``: q(z_2) may depend on x_3)."""
        s = self.structure
        return {"model": [f"{a} -> {b}" for b in sorted(s.undetermined)
                          for a in sorted(s.undetermined[b])],
                "guide": [f"{a} -> {b}" for b in sorted(s.guide_undetermined)
                          for a in sorted(s.guide_undetermined[b])]}

    def to_dict(self) -> dict:
        return {"model": self.model, "guide": self.guide,
                "latents": [r.to_dict() for r in self.latents],
                "consistent": self.consistent, "status": self.status,
                "undetermined_edges": self.undetermined_edges(),
                "notes": list(self.structure.notes)}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def missing_edges(self) -> List[Tuple[Var, Var]]:
        """(variable, latent site) pairs surely in the exact posterior and surely not in the
        guide (whatever the undetermined edges are)."""
        s = self.structure
        return [(v, z) for z in s.latents for v in sorted(
            self.exact_sets[z] - s.guide_parents[z] - s.guide_undetermined.get(z, set()))]

    def extra_edges(self) -> List[Tuple[Var, Var]]:
        """(variable, latent site) pairs surely in the guide and surely not in the exact
        posterior."""
        s, upper = self.structure, self.exact_upper or self.exact_sets
        return [(v, z) for z in s.latents for v in sorted(s.guide_parents[z] - upper[z])]

    def __str__(self) -> str:
        return format_table(self)

    def render(self, filename: str) -> str:
        """Draw the compact model graph and the guide's dependencies (missing links in gold)."""
        from .render import render_report
        return render_report(self, filename)


def format_table(report: PosteriorReport) -> str:
    head = (f"model: {report.model or '(unnamed)'}   guide: {report.guide or '(unnamed)'}   "
            f"(read from the code at T = {report.T})")
    header = ("latent", "exact posterior", "guide", "missing", "extra", "verdict")
    rows = [header]
    shown = {CONSISTENT: "consistent", NOT_CONSISTENT: "NOT consistent",
             UNDETERMINED: "cannot tell"}
    for r in report.latents:
        rows.append((r.latent, _join(r.exact), _join(r.guide), _join(r.missing, "-"),
                     _join(r.extra, "-"), shown[r.status]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [head, ""]
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [note for r in report.latents for note in r.notes()]
    if notes:
        lines += ["", "boundary steps that are not the truncated pattern:"]
        lines += [f"  {note}" for note in notes]
    edges = report.undetermined_edges()
    if edges["model"] or edges["guide"]:
        lines += ["", "edges that could not be determined (neither found nor ruled out):"]
        for kind in ("model", "guide"):
            if edges[kind]:
                lines.append(f"  {kind}: " + ", ".join(edges[kind]))
        for r in report.latents:
            if r.undetermined:
                lines.append(f"  {r.latent}: exact posterior or guide may also involve "
                             + ", ".join(r.undetermined))
    if report.structure.notes:
        lines += [""] + [f"note: {n}" for n in report.structure.notes]
    lines.append("")
    if report.consistent:
        lines.append("verdict: the guide conditions on exactly what the exact posterior depends on")
    elif report.status == NOT_CONSISTENT:
        bad = [f"{r.latent} ({r.verdict})" for r in report.latents
               if r.status == NOT_CONSISTENT]
        lines.append("verdict: NOT consistent: " + "; ".join(bad))
    else:
        unsure = [r.latent for r in report.latents if r.status == UNDETERMINED]
        lines.append("verdict: cannot tell: undetermined edges matter for " + ", ".join(unsure))
    return "\n".join(lines)


def _join(items: List[str], empty: str = "(nothing)") -> str:
    return ", ".join(items) if items else empty


def _ranges(structure: Structure) -> Dict[str, Tuple[int, int]]:
    out: Dict[str, Tuple[int, int]] = {}
    for v in structure.latents + structure.observed + structure.inputs:
        if v.index is not None:
            lo, hi = out.get(v.family, (v.index, v.index))
            out[v.family] = (min(lo, v.index), max(hi, v.index))
    return out


def _upper_graph(structure: Structure, g: nx.DiGraph) -> nx.DiGraph:
    """The compact DAG with every undetermined model edge added (one that would close a cycle
    cannot exist in a directed acyclic model and is left out)."""
    hi = g.copy()
    for v in sorted(structure.undetermined):
        for p in sorted(structure.undetermined[v]):
            hi.add_edge(p, v)
            if not nx.is_directed_acyclic_graph(hi):
                hi.remove_edge(p, v)
    return hi


def build_report(structure: Structure, model_name: Optional[str] = None,
                 guide_name: Optional[str] = None) -> PosteriorReport:
    """Exact posterior by D-separation, comparison with the guide, summary per latent family.

    With undetermined edges (:attr:`Structure.undetermined`), the exact sets are computed on the
    determined graph and on the graph with every undetermined edge added (D-separation can only
    lose separations when edges are added, so the truth lies between the two), the guide's sets
    with and without its undetermined dependencies; "missing" and "extra" are the differences
    that hold at both ends, "undetermined" what lies between.
    """
    g = compact_dag(structure)
    exact = exact_posterior(structure, g)
    exact_hi = (exact_posterior(structure, _upper_graph(structure, g))
                if structure.undetermined else exact)
    ranges = _ranges(structure)
    order = structure.family_order
    groups: Dict[str, List[Var]] = {}
    for z in structure.latents:
        key = z.family if z.index is not None else f"\0{z.family}"
        groups.setdefault(key, []).append(z)
    latents = []
    for members in groups.values():
        per = {col: {} for col in _COLUMNS}
        for z in members:
            q = structure.guide_parents[z]
            q_hi = q | structure.guide_undetermined.get(z, set())
            p, p_hi = exact[z], exact_hi[z]
            per["exact"][z.index] = sorted(p)
            per["guide"][z.index] = sorted(q)
            per["missing"][z.index] = sorted(p - q_hi)
            per["extra"][z.index] = sorted(q - p_hi)
            per["undetermined"][z.index] = sorted((p_hi - p) | (q_hi - q))
        summaries = {col: summarise(per[col], order, ranges, structure.T) for col in _COLUMNS}
        z0 = members[0]
        name = f"{z0.family}_t" if z0.index is not None else z0.family
        if any(per["missing"][t] or per["extra"][t] for t in per["exact"]):
            status = NOT_CONSISTENT
        elif any(per["undetermined"][t] for t in per["exact"]):
            status = UNDETERMINED
        else:
            status = CONSISTENT
        latents.append(LatentReport(
            latent=name,
            exact=summaries["exact"].terms, guide=summaries["guide"].terms,
            missing=summaries["missing"].terms, extra=summaries["extra"].terms,
            consistent=status == CONSISTENT, sites=members,
            deviations={col: s.deviations for col, s in summaries.items() if s.deviations},
            undetermined=summaries["undetermined"].terms, status=status))
    return PosteriorReport(model_name, guide_name, latents, structure, exact, g,
                           exact_hi if structure.undetermined else None)


def _name_of(fn: Callable) -> Optional[str]:
    for owner in (getattr(fn, "__self__", None), fn):
        name = getattr(owner, "name", None)
        if isinstance(name, str):
            return name
    return None


def check_posterior(model: Callable, guide: Callable, *args, draws: int = 1, reinits: int = 2,
                    seed: int = 0, **kwargs) -> PosteriorReport:
    """Derive the exact posterior structure of ``model`` by D-separation and compare ``guide``.

    ``model`` and ``guide`` are Pyro callables taking the same arguments, the observed sequence x of
    shape (batch, T, ...) first (extra inputs such as u may follow); ``args``/``kwargs`` are those
    arguments.  Choose T so that first, middle and last steps are all visible (6 to 8) and a batch
    of 2 or more.  Nothing is declared by hand:

    1. the compact DAG is read from the running model: an edge where a float64 gradient of a
       site's log-density with respect to another site's value is non-zero, or where replacing
       that value (0, -v, v +- 10, 100 v, the rest held fixed) changes the site's distribution, at
       the caller's parameters and at two re-initialisations of them (:mod:`.graph`); RNN states
       are thereby unrolled (appendix A);
    2. for each latent, in the guide's sampling order, the chain-rule conditioning set (4.20) is
       reduced by D-separation (4.2.1);
    3. the guide's dependencies (which x_s and earlier latents change the parameters of q) are read
       the same way, and compared: "missing" = in the exact posterior, not in the guide; "extra" =
       in the guide, not in the exact posterior.

    Edges that no method found and no intervention ruled out (a latent with an unbounded discrete
    support, a value that changes which sites are sampled) are reported as undetermined; a latent
    whose verdict depends on them gets the status "undetermined" instead of a guess
    (:attr:`PosteriorReport.status`, :attr:`PosteriorReport.exit_code`).  Model and guide are
    deep-copied and cast to float64 for the check; the originals, Pyro's parameter store and the
    random state are left as they were.  ``draws``, ``reinits`` and ``seed`` (keywords) go to
    :func:`.graph.read_structure`.
    """
    structure = read_structure(model, guide, *args, draws=draws, reinits=reinits, seed=seed,
                               **kwargs)
    return build_report(structure, _name_of(model), _name_of(guide))


__all__ = ["LATENT", "LatentReport", "PosteriorReport", "build_report", "check_posterior",
           "format_table"]
