"""Drawing a :class:`~.report.PosteriorReport` with graphviz.

The compact model graph (4.1.2) in black: latent variables as white circles, observed ones shaded,
inputs as boxes, one column per time step.  The guide's dependencies are drawn on top, into each
latent: blue dashed where the exact posterior needs them too, gold (the paper's colour for the
missing links of an inference model) and bold where the exact posterior needs them and the guide
does not, red dotted where the guide uses something the exact posterior does not need.  Edges that
could not be determined (:mod:`.graph`) are grey and dotted.
"""

from __future__ import annotations

import os
import shutil

GOLD = "#d4a017"
GUIDE = "#1f6fd1"
EXTRA = "#c0392b"
UNKNOWN = "#999999"

INSTALL = ("rendering needs Graphviz: install the `dot` program (apt-get install graphviz, "
           "brew install graphviz, or conda install graphviz) and the Python package "
           "(pip install graphviz)")


class RenderError(RuntimeError):
    """Graphviz is missing or failed; the message says how to install it."""


def _graphviz():
    try:
        import graphviz
    except ImportError:
        raise RenderError(f"the graphviz Python package is not installed; {INSTALL}") from None
    if shutil.which("dot") is None:
        raise RenderError(f"the Graphviz `dot` program is not on PATH; {INSTALL}")
    return graphviz


def to_graphviz(report):
    """A ``graphviz.Digraph`` of the report (see the module docstring)."""
    graphviz = _graphviz()
    s = report.structure
    title = (f"{report.model or 'model'} / {report.guide or 'guide'}: black = model (compact), "
             f"blue dashed = guide, gold = missing in the guide, red dotted = extra"
             + (", grey dotted = undetermined" if s.undetermined or s.guide_undetermined else ""))
    dot = graphviz.Digraph(graph_attr={"rankdir": "TB", "newrank": "true", "label": title,
                                       "labelloc": "t", "fontsize": "12", "nodesep": "0.3"})
    node_id = {}
    all_vars = s.latents + s.observed + s.inputs
    for n, v in enumerate(all_vars):
        node_id[v] = f"n{n}"
        label = str(v)
        attrs = {"shape": "circle", "fontsize": "10", "width": "0.45", "fixedsize": "false"}
        if v in s.observed:
            attrs.update(style="filled", fillcolor="#cccccc")
        elif v in s.inputs:
            attrs.update(shape="box", style="filled", fillcolor="#eeeeee")
        dot.node(node_id[v], label, **attrs)
    # rows per family, columns per time step (same rank = same row)
    families = sorted({v.family for v in all_vars}, key=lambda f: s.family_order.get(f, 10 ** 6))
    for fam in families:
        members = sorted((v for v in all_vars if v.family == fam), key=lambda v: v.index or 0)
        with dot.subgraph() as row:
            row.attr(rank="same")
            for v in members:
                row.node(node_id[v])
        for a, b in zip(members, members[1:]):  # keep time order left to right
            dot.edge(node_id[a], node_id[b], style="invis", weight="10")
    # a single latent (DSAE's v) goes above the latent sequences
    singles = [v for v in s.latents if v.index is None]
    firsts = [v for v in s.latents if v.index is not None]
    firsts = [min((v for v in firsts if v.family == f), key=lambda v: v.index)
              for f in dict.fromkeys(v.family for v in firsts)]
    for a in singles:
        for b in firsts:
            dot.edge(node_id[a], node_id[b], style="invis")
    for v, ps in s.parents.items():
        for p in sorted(ps):
            dot.edge(node_id[p], node_id[v], color="black")
    for v, ps in list(s.undetermined.items()) + list(s.guide_undetermined.items()):
        for p in sorted(ps):
            dot.edge(node_id[p], node_id[v], color=UNKNOWN, style="dotted", constraint="false")
    missing = set(report.missing_edges())
    extra = set(report.extra_edges())
    for z in s.latents:
        for p in sorted(s.guide_parents[z] | report.exact_sets[z]):
            if (p, z) in missing:
                attrs = {"color": GOLD, "penwidth": "2.5", "style": "dashed"}
            elif (p, z) in extra:
                attrs = {"color": EXTRA, "style": "dotted"}
            else:
                attrs = {"color": GUIDE, "style": "dashed"}
            dot.edge(node_id[p], node_id[z], constraint="false", **attrs)
    return dot


def render_report(report, filename: str) -> str:
    """Write the drawing to ``filename`` (format from its extension, PNG by default); returns the
    path written."""
    dot = to_graphviz(report)
    root, ext = os.path.splitext(filename)
    fmt = ext[1:].lower() or "png"
    try:
        return dot.render(outfile=filename, format=fmt, cleanup=True)
    except Exception as e:  # graphviz.ExecutableNotFound, CalledProcessError, bad format
        if type(e).__name__ == "ExecutableNotFound":
            raise RenderError(f"the Graphviz `dot` program was not found; {INSTALL}") from None
        raise RenderError(f"graphviz could not render {filename}: {e}") from None
