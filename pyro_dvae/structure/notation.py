"""Index sets in the paper's notation: ``z_{t-1}``, ``z_{1:t-1}``, ``x_{t:T}``, ``x_{1:T}``, ``v``.

A conditioning set is known per step t (per site z_t of a latent family).  For one family of
conditioning variables (``x``) the indices at step t form runs of consecutive integers, and each
run's endpoints are written either relative to t (``t``, ``t-1``, ``t+1``) or absolutely (``1``,
``T``, or a constant).  :func:`summarise` picks, among the writings of the runs seen at a middle
step, the one that reproduces the most steps once truncated to the valid range (so that
``z_{t-1}`` is empty at t = 1 and ``x_{t+1:T}`` at t = T: the obvious truncation); steps it does
not reproduce are returned as deviations, written with absolute indices.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: an endpoint: ("rel", k) = t + k, ("abs", c) = the constant index c
Endpoint = Tuple[str, int]
Pattern = Tuple[Tuple[Endpoint, Endpoint], ...]

_MAX_RUNS = 5


def runs(indices: Iterable[int]) -> List[Tuple[int, int]]:
    """Sorted indices as runs of consecutive integers: {1,2,3,5} -> [(1,3), (5,5)]."""
    out: List[Tuple[int, int]] = []
    for i in sorted(set(indices)):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _evaluate(pattern: Pattern, t: Optional[int], lo: int, hi: int) -> frozenset:
    out = set()
    for a, b in pattern:
        start = a[1] if a[0] == "abs" else t + a[1]
        end = b[1] if b[0] == "abs" else t + b[1]
        out.update(range(max(start, lo), min(end, hi) + 1))
    return frozenset(out)


def _candidates(e: int, t: Optional[int]) -> List[Endpoint]:
    c = [("abs", e)]
    if t is not None:
        c.append(("rel", e - t))
    return c


@dataclass
class FamilySummary:
    pattern: Pattern
    #: steps where the truncated pattern does not give the actual index set: step -> indices
    deviations: Dict[Optional[int], frozenset]


def fit_pattern(sets: Dict[Optional[int], frozenset], lo: int, hi: int) -> FamilySummary:
    """The writing of ``sets`` (step -> indices of one family) that reproduces the most steps.

    Steps are tried as seeds from the middle outwards; ties prefer absolute endpoints equal to the
    family's first/last index (1, T), then endpoints relative to t, then other constants.
    """
    steps = sorted(sets, key=lambda t: -1 if t is None else t)
    if None in sets:
        seeds: List[Optional[int]] = [None]
    else:
        first, last = min(steps), max(steps)
        mid = (first + last) / 2
        seeds = sorted(steps, key=lambda t: (abs(t - mid), t))
        middle = [t for t in seeds if first + 2 <= t <= last - 2]
        seeds = middle or seeds

    best, best_key = (), None
    tried = set()
    for t0 in seeds:
        rs = runs(sets[t0])
        if len(rs) > _MAX_RUNS:  # too many writings to try: absolute indices
            combos = [tuple((("abs", a), ("abs", b)) for a, b in rs)]
        else:
            per_run = [list(itertools.product(_candidates(a, t0), _candidates(b, t0)))
                       for a, b in rs]
            combos = list(itertools.product(*per_run)) if per_run else [()]
        for pattern in combos:
            if pattern in tried:
                continue
            tried.add(pattern)
            matches = sum(_evaluate(pattern, t, lo, hi) == sets[t] for t in steps)
            ends = [e for run in pattern for e in run]
            n_const = sum(e[0] == "abs" and e[1] not in (lo, hi) for e in ends)
            n_rel = sum(e[0] == "rel" for e in ends)
            key = (matches, -n_const, -n_rel)
            if best_key is None or key > best_key:
                best, best_key = pattern, key
    deviations = {t: sets[t] for t in steps if _evaluate(best, t, lo, hi) != sets[t]}
    return FamilySummary(best, deviations)


def _endpoint(e: Endpoint, T: int) -> str:
    kind, k = e
    if kind == "rel":
        return "t" if k == 0 else f"t{k:+d}"
    return "T" if k == T else str(k)


def _subscript(family: str, index: str) -> str:
    """``x_t``, ``x_T``, ``x_3``; braces for longer subscripts: ``z_{t-1}``, ``x_{12}``."""
    return f"{family}_{index}" if len(index) == 1 else f"{family}_{{{index}}}"


def format_pattern(family: str, pattern: Pattern, T: int) -> List[str]:
    """``x`` with runs ((rel 0),(abs T)) -> ["x_{t:T}"]."""
    out = []
    for a, b in pattern:
        sa, sb = _endpoint(a, T), _endpoint(b, T)
        out.append(_subscript(family, sa) if (a == b or sa == sb) else f"{family}_{{{sa}:{sb}}}")
    return out


def format_indices(family: str, indices: Iterable[int], T: int) -> List[str]:
    """Absolute notation: ``x`` {1,2,3} -> ["x_{1:3}"]; T is written as T."""
    pattern = tuple((("abs", a), ("abs", b)) for a, b in runs(indices))
    return format_pattern(family, pattern, T)


@dataclass
class Summary:
    """A per-step family of conditioning sets written in the paper's notation."""

    terms: List[str]
    #: step -> the actual set at that step in absolute notation, where the pattern deviates
    deviations: Dict[Optional[int], List[str]]


def summarise(per_step: Dict[Optional[int], Sequence], family_order: Dict[str, int],
              ranges: Dict[str, Tuple[int, int]], T: int) -> Summary:
    """Write the per-step sets ``per_step`` (step -> variables) in the paper's notation.

    Variables have ``family`` and ``index`` (None for single variables); ``ranges[family]`` gives
    the first and last index of a family (the truncation bounds); ``T`` is written as ``T``.
    """
    fams = sorted({v.family for vs in per_step.values() for v in vs},
                  key=lambda f: (family_order.get(f, 10 ** 6), f))
    terms: List[str] = []
    deviating: Dict[Optional[int], bool] = {}
    for fam in fams:
        members = {t: [v for v in vs if v.family == fam] for t, vs in per_step.items()}
        if all(v.index is None for vs in members.values() for v in vs):
            present = {t: bool(vs) for t, vs in members.items()}
            if any(present.values()):
                terms.append(fam)
                for t, p in present.items():
                    if not p:
                        deviating[t] = True
            continue
        sets = {t: frozenset(v.index for v in vs if v.index is not None)
                for t, vs in members.items()}
        lo, hi = ranges[fam]
        fit = fit_pattern(sets, lo, hi)
        terms += format_pattern(fam, fit.pattern, T)
        for t in fit.deviations:
            deviating[t] = True
    deviations = {t: format_set(per_step[t], family_order, T) for t in deviating}
    return Summary(terms, deviations)


def format_set(variables: Sequence, family_order: Dict[str, int], T: int) -> List[str]:
    """A concrete set of variables in absolute notation, families in report order."""
    fams = sorted({v.family for v in variables}, key=lambda f: (family_order.get(f, 10 ** 6), f))
    out: List[str] = []
    for fam in fams:
        idx = [v.index for v in variables if v.family == fam and v.index is not None]
        if any(v.family == fam and v.index is None for v in variables):
            out.append(fam)
        if idx:
            out += format_indices(fam, idx, T)
    return out
