"""The influence engine: curvature operators over HVPs, matrix-free solvers, estimators.

- ``hvp``: ``CurvatureOperator`` (``H v`` of the retained risk via ``torch.func``, streamed;
  one ``Curvature`` class per curvature, ``CURVATURES_BY_NAME``),
  ``loss_gradient``, the flat-vector helpers and ``reduce_sum``, the one reduction point.
- ``operators``: operators composed from curvature operators (sums, restrictions to a scope,
  zero) and ``removal_curvature``, the removal set's curvature ``H_U`` that ``sif`` needs.
- ``solvers``: ``lsqr``, ``cg``, ``neumann``, ``exact`` behind one signature; ``SolveResult``;
  ``lsqr_path`` (every damping of a grid from one run, ``PathResult``) and relative damping.
- ``estimators``: the estimator registry (``estimator(name)``), ``removal_gradient`` and
  ``estimate_update`` for gif, fif, pif, if, sif and first-order, which returns the updates
  as an ``UpdatePath`` over the damping (one point for a fixed damping, the grid of
  ``estimate_path`` for ``influence.damping: auto``).
"""

from gifcli.influence.estimators import (
    METHODS,
    UpdatePath,
    estimate_path,
    estimate_update,
    removal_gradient,
)
from gifcli.influence.hvp import (
    CURVATURES_BY_NAME,
    CurvatureOperator,
    flatten,
    flatten_params,
    loss_gradient,
    reduce_sum,
    trainable_parameters,
    unflatten,
)
from gifcli.influence.solvers import SOLVERS, PathResult, SolveResult, lsqr_path

__all__ = [
    "CURVATURES_BY_NAME",
    "METHODS",
    "SOLVERS",
    "CurvatureOperator",
    "PathResult",
    "SolveResult",
    "UpdatePath",
    "estimate_path",
    "estimate_update",
    "flatten",
    "flatten_params",
    "loss_gradient",
    "lsqr_path",
    "reduce_sum",
    "removal_gradient",
    "trainable_parameters",
    "unflatten",
]
