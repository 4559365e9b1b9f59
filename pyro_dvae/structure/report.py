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

_COLUMNS = ("exact", "guide", "missing", "extra")


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

    def to_dict(self) -> dict:
        return {"latent": self.latent, "exact": list(self.exact), "guide": list(self.guide),
                "missing": list(self.missing), "extra": list(self.extra),
                "consistent": bool(self.consistent)}

    @property
    def verdict(self) -> str:
        if self.consistent:
            return "consistent"
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

    @property
    def consistent(self) -> bool:
        return all(r.consistent for r in self.latents)

    @property
    def T(self) -> int:
        return self.structure.T

    def to_dict(self) -> dict:
        return {"model": self.model, "guide": self.guide,
                "latents": [r.to_dict() for r in self.latents],
                "consistent": self.consistent}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def missing_edges(self) -> List[Tuple[Var, Var]]:
        """(variable, latent site) pairs in the exact posterior but not in the guide."""
        s = self.structure
        return [(v, z) for z in s.latents for v in sorted(self.exact_sets[z] - s.guide_parents[z])]

    def extra_edges(self) -> List[Tuple[Var, Var]]:
        s = self.structure
        return [(v, z) for z in s.latents for v in sorted(s.guide_parents[z] - self.exact_sets[z])]

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
    for r in report.latents:
        rows.append((r.latent, _join(r.exact), _join(r.guide), _join(r.missing, "-"),
                     _join(r.extra, "-"), "consistent" if r.consistent else "NOT consistent"))
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
    lines.append("")
    if report.consistent:
        lines.append("verdict: the guide conditions on exactly what the exact posterior depends on")
    else:
        bad = [f"{r.latent} ({r.verdict})" for r in report.latents if not r.consistent]
        lines.append("verdict: NOT consistent: " + "; ".join(bad))
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


def build_report(structure: Structure, model_name: Optional[str] = None,
                 guide_name: Optional[str] = None) -> PosteriorReport:
    """Exact posterior by D-separation, comparison with the guide, summary per latent family."""
    g = compact_dag(structure)
    exact = exact_posterior(structure, g)
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
            p = exact[z]
            per["exact"][z.index] = sorted(p)
            per["guide"][z.index] = sorted(q)
            per["missing"][z.index] = sorted(p - q)
            per["extra"][z.index] = sorted(q - p)
        summaries = {col: summarise(per[col], order, ranges, structure.T) for col in _COLUMNS}
        z0 = members[0]
        name = f"{z0.family}_t" if z0.index is not None else z0.family
        consistent = all(not per["missing"][t] and not per["extra"][t] for t in per["exact"])
        latents.append(LatentReport(
            latent=name,
            exact=summaries["exact"].terms, guide=summaries["guide"].terms,
            missing=summaries["missing"].terms, extra=summaries["extra"].terms,
            consistent=consistent, sites=members,
            deviations={col: s.deviations for col, s in summaries.items() if s.deviations}))
    return PosteriorReport(model_name, guide_name, latents, structure, exact, g)


def _name_of(fn: Callable) -> Optional[str]:
    for owner in (getattr(fn, "__self__", None), fn):
        name = getattr(owner, "name", None)
        if isinstance(name, str):
            return name
    return None


def check_posterior(model: Callable, guide: Callable, *args, **kwargs) -> PosteriorReport:
    """Derive the exact posterior structure of ``model`` by D-separation and compare ``guide``.

    ``model`` and ``guide`` are Pyro callables taking the same arguments, the observed sequence x of
    shape (batch, T, ...) first (extra inputs such as u may follow); ``args``/``kwargs`` are those
    arguments.  Choose T so that first, middle and last steps are all visible (6 to 8) and a batch
    of 2 or more.  Nothing is declared by hand:

    1. the compact DAG is read from the running model (non-zero float64 gradients of every site's
       log-density with respect to the values of the other sites, over a few random draws; RNN
       states are thereby unrolled, appendix A);
    2. for each latent, in the guide's sampling order, the chain-rule conditioning set (4.20) is
       reduced by D-separation (4.2.1);
    3. the guide's dependencies (which x_s and earlier latents change the parameters of q) are read
       the same way, and compared: "missing" = in the exact posterior, not in the guide; "extra" =
       in the guide, not in the exact posterior.

    Model and guide are deep-copied and cast to float64 for the check; the originals and Pyro's
    parameter store are left as they were.  Dependencies that enter non-differentiably (integer
    indexing by a sampled value, discrete latents) cannot be read this way.
    """
    structure = read_structure(model, guide, *args, **kwargs)
    return build_report(structure, _name_of(model), _name_of(guide))


__all__ = ["LATENT", "LatentReport", "PosteriorReport", "build_report", "check_posterior",
           "format_table"]
