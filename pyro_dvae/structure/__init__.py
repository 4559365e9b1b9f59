"""Exact posterior structure vs the guide (SPEC section 3; paper 4.2.1-4.2.2, appendix A).

- :mod:`.graph`: reading the compact DAG of a model and the dependencies of a guide from the running
  code (float64 gradients of every site's log-density with respect to the other sites' values,
  value interventions, re-initialised parameters), with the edges it could not determine.
- :mod:`.intervene`: the value interventions (replace one value, rerun, compare distributions).
- :mod:`.sites`: running a program with given latent values.
- :mod:`.dsep`: the exact posterior's conditioning sets by D-separation, in the guide's order.
- :mod:`.notation`: per-step sets written in the paper's notation (``z_{t-1}``, ``x_{t:T}``, ...).
- :mod:`.report`: :func:`check_posterior` and :class:`PosteriorReport` (table, JSON).
- :mod:`.render`: the compact graph with the guide's links (graphviz), missing links in gold.
- :func:`check_registered`: the check for a registered model at small sizes (what the CLI runs).
"""

from .graph import StructureError, Var, read_structure
from .registered import check_registered
from .render import RenderError
from .report import LatentReport, PosteriorReport, build_report, check_posterior

__all__ = ["LatentReport", "PosteriorReport", "RenderError", "StructureError", "Var",
           "build_report", "check_posterior", "check_registered", "read_structure"]
