"""The exact posterior's conditioning sets by D-separation (4.2.1-4.2.2).

The exact posterior is factorised by the chain rule in the guide's sampling order (4.20):
p(z | x, u) = prod_i p(z_i | z_{<i}, x, u).  In each factor, the conditioning set starts as every
latent sampled before z_i and every observed and input variable, and each variable that is
D-separated from z_i given the remaining ones is removed, one at a time (Bayes ball on the compact
DAG, networkx's d-separation).  Because D-separation satisfies the intersection and contraction
properties, the result does not depend on the order of removal: it is the set of variables v for
which z_i is not D-separated from v given the rest of the chain-rule set.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Set

import networkx as nx

from .graph import Structure, StructureError, Var


def compact_dag(structure: Structure) -> nx.DiGraph:
    """The compact model DAG: an edge p -> v for every parent p of v."""
    g = nx.DiGraph()
    g.add_nodes_from(structure.latents + structure.observed + structure.inputs)
    for v, ps in structure.parents.items():
        g.add_edges_from((p, v) for p in ps)
    if not nx.is_directed_acyclic_graph(g):
        cycle = " -> ".join(str(a) for a, _ in nx.find_cycle(g))
        raise StructureError(f"the model's dependencies form a cycle ({cycle} -> ...): "
                             "it is not a directed acyclic graph")
    return g


def _d_separated(g: nx.DiGraph, x: Set[Var], y: Set[Var], z: Set[Var]) -> bool:
    if hasattr(nx, "is_d_separator"):
        return nx.is_d_separator(g, x, y, z)
    return nx.d_separated(g, x, y, z)  # networkx < 3.3


def _sort_key(order: Dict[str, int]):
    return lambda v: (order.get(v.family, 10 ** 6), v.family, v.index or 0)


def minimal_conditioning(g: nx.DiGraph, target: Var, candidates: Iterable[Var],
                         order: Dict[str, int]) -> Set[Var]:
    """Remove from ``candidates`` every variable D-separated from ``target`` given the others."""
    keep = set(candidates)
    for v in sorted(keep, key=_sort_key(order)):
        rest = keep - {v}
        if _d_separated(g, {target}, {v}, rest):
            keep = rest
    return keep


def exact_posterior(structure: Structure, g: nx.DiGraph = None) -> Dict[Var, Set[Var]]:
    """For each latent (guide order), the variables its exact posterior factor conditions on."""
    g = compact_dag(structure) if g is None else g
    known: List[Var] = structure.observed + structure.inputs
    out: Dict[Var, Set[Var]] = {}
    for i, z in enumerate(structure.latents):
        chain = set(structure.latents[:i]) | set(known)
        out[z] = minimal_conditioning(g, z, chain, structure.family_order)
    return out
