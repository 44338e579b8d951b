"""Influence estimators of the parameter change ``Δ`` that removes the removal set (see
docs/design.md, estimators).

Notation: ``n`` training points, ``m`` of them in the removal set ``U``, ``p = m / n``, ``H``
the curvature of the retained risk (``CurvatureOperator``), ``H_U`` that of the removal loss
with the labels trained on, ``H_D`` that of the loss the edit takes out (``H_U`` for class
removal; backdoor: of ``L_U(poisoned labels) − L_U(true labels)``), ``g`` the removal gradient,
``t`` the target coordinates (``target_flat``), ``s`` the scope (``scope_flat``), ``λ`` the
damping. The edited model is ``θ̂ + σ Δ`` (``σ`` the step scale).

| method        | system solved, ``argmin ‖A x − b‖² + λ²‖x‖²``   | ``Δ``                       |
|---------------|-------------------------------------------------|-----------------------------|
| ``gif``       | ``A = H[:, t]``, ``b = g``                      | ``Δ_t = x``, 0 elsewhere    |
| ``fif``       | ``A = H[t, t]``, ``b = g_t``                    | ``Δ_t = x``, 0 elsewhere    |
| ``pif``       | ``A = H[s, s]``, ``b = g_s``                    | ``Δ_t = x_t``, 0 elsewhere  |
| ``if``        | ``A = H[s, s]``, ``b = g_s``                    | ``Δ_s = x``, 0 elsewhere    |
| ``sif``       | ``A = H_S[s, s]``, ``H_S = (1−p) H + p H_U``:   | ``Δ_s = (1−2p)/(1−p) Δ₁``   |
|               | ``Δ₁`` for ``b = g_s``, ``Δ₂`` for              | ``+ p/(1−p) Δ₂``            |
|               | ``b = H_D[s, s] Δ₁``                            |                             |
| first-order   | none                                            | ``Δ_t = g_t``, 0 elsewhere  |

``H[:, t] x`` is one HVP of ``x`` scattered into a zero vector; ``H[t, :] y = (H y)_t`` is one
HVP followed by a gather (``H`` is symmetric). So every product costs one HVP whatever ``|t|``
(``sif``: one of ``H`` and one of ``H_U`` per ``H_S`` product).

``H_S`` is the curvature of the training risk the model was trained on, the point Basu et al.'s
expansion starts from; for a backdoor that risk holds the poisoned labels, so ``H_S`` takes
``H_U`` with them, and the label change enters through ``H_D`` only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gifcli.config import INFLUENCE_METHODS, TARGETED_METHODS
from gifcli.errors import GifError, ParameterError
from gifcli.influence.hvp import loss_gradient
from gifcli.influence.operators import (
    Combination,
    LinearOperator,
    RemovalCurvature,
    Restricted,
    Zero,
    products,
    scatter,
)
from gifcli.influence.solvers import SOLVERS, PathResult, SolveResult, lsqr_path, solve

METHODS = INFLUENCE_METHODS
TARGETED = TARGETED_METHODS
"""Methods whose ``Δ`` is zero outside the target mask."""
PATH_METHODS = ("gif", "fif", "pif", "if")
"""Methods with one damped solve, which ``estimate_path`` covers (``sif`` has two)."""
AUTO = "auto"
"""``influence.damping`` value asking for the regularisation path."""

Progress = Callable[[int, float], None]

# --------------------------------------------------------------------------- removal gradient


def removal_gradient(
    model: nn.Module,
    *,
    removal_x: Tensor,
    removal_y: Tensor,
    n_train: int,
    batch_size: int,
    true_labels: Tensor | None = None,
    removal_size: int | None = None,
) -> Tensor:
    """The removal gradient ``g`` (flat, ``[dim]``) of docs/design.md.

    Class removal: ``g = (m / (n − m)) · ∇θ L_U(θ̂)``, ``L_U`` the mean cross-entropy over the
    points ``(removal_x, removal_y)``, ``m = len(removal_x)`` unless ``removal_size`` says
    otherwise, ``n = n_train`` (training set size, removal set included).

    Backdoor relabelling (``true_labels`` given): the poisoned points are removed with their
    poisoned labels ``removal_y`` and re-added with their true labels,
    ``g = (m / (n − m)) · (∇θ L_U(θ̂; removal_y) − ∇θ L_U(θ̂; true_labels))``.

    ``removal_size`` is the size ``m`` of the whole removal set when the points passed are only
    part of it: a rank's shard under ``torchrun`` (``loss_gradient`` reduces the gradient sums
    and counts over the ranks, so ``L_U`` is still the mean over the points of every rank), or
    a random subsample that estimates ``L_U`` (``removal.gradient_samples``), whose mean
    estimates the whole set's while ``m`` stays the whole set's size.
    """
    m = len(removal_x) if removal_size is None else removal_size
    if m == 0:
        raise GifError("removal set: it is empty; nothing to remove")
    if n_train <= m:
        raise GifError(f"removal set: {m} points of a training set of {n_train}; need m < n")
    grad_u = loss_gradient(model, removal_x, removal_y, batch_size=batch_size)
    if true_labels is not None:
        if len(true_labels) != len(removal_x):
            raise GifError(
                f"removal set: {len(true_labels)} true labels for {len(removal_x)} points"
            )
        grad_u = grad_u - loss_gradient(model, removal_x, true_labels, batch_size=batch_size)
    if not torch.isfinite(grad_u).all():
        raise GifError(
            "removal gradient: NaN or Inf; the checkpoint's loss is not finite on the removal "
            "set (check the checkpoint, the data normalisation and the model's dtype)"
        )
    return (m / (n_train - m)) * grad_u


# --------------------------------------------------------------------------- estimators


def estimate_update(
    *,
    method: str,
    operator: LinearOperator,
    gradient: Tensor,
    target_flat: Tensor,
    solver: str,
    damping: float | str,
    max_iter: int,
    tol: float,
    damping_relative: bool = False,
    damping_grid: Sequence[float] | None = None,
    removal_operator: RemovalCurvature | LinearOperator | None = None,
    removal_fraction: float | None = None,
    scope_flat: Tensor | None = None,
    progress: Progress | None = None,
    solver_options: Mapping[str, object] | None = None,
) -> tuple[Tensor, SolveResult] | UpdatePath:
    """The update ``Δ`` (flat, ``[dim]``, the operator's dtype and device) and its solve record;
    for ``damping="auto"`` the regularisation path instead (``estimate_path``).

    Args (keyword-only):
        method: one of ``METHODS`` (module docstring).
        operator: ``H`` of the retained risk, ``.matvec`` on flat ``[dim]`` vectors.
        gradient: the removal gradient ``g``, ``[dim]``.
        target_flat: bool ``[dim]``, True on the target parameters ``t`` (ignored by ``if``
            and ``sif``, which change every parameter of the scope).
        solver, damping, max_iter, tol: the solver (``SOLVERS``) and its settings; unused by
            ``first-order``. ``damping="auto"``: ``estimate_path`` with ``damping_grid``
            (``lsqr`` and ``PATH_METHODS`` only).
        damping_relative: ``damping`` is ``λ / σ_max(A)``, ``σ_max`` estimated by the solve
            (``solvers.solve``); ``sif`` takes ``λ`` from its first solve for both.
        removal_operator: the removal set's curvatures (``sif`` only): a ``RemovalCurvature``
            (``removal_curvature`` builds it for class removal and backdoor relabelling), or
            one operator ``H_U`` that is both of them (class removal).
        removal_fraction: ``p = m / n`` (``sif`` only), in ``(0, 1)``.
        scope_flat: bool ``[dim]``, the parameters ``s`` that ``if``, ``pif`` and ``sif``
            treat as variables (``influence.scope``); None: all. The others are constants of
            the loss: ``H`` becomes ``H[s, s]``, ``g`` becomes ``g_s``, and ``Δ`` is 0 outside
            ``s``. A ``pif`` target outside ``s`` joins it (what is edited is never held
            constant). Ignored by ``gif``, ``fif`` and ``first-order``.
        progress: ``progress(iteration, relative normal residual)`` after each iteration
            (``exact``: after each column built; ``sif``: counts restart for its second solve).
        solver_options: extra keyword arguments of the solver (``neumann``: ``scale``,
            ``scale_step``, ``max_restarts``, ``absolute_tol``).

    Coordinates outside the target mask are exactly zero for the targeted methods, and outside
    the scope for ``if`` and ``sif``.
    """
    if isinstance(damping, str) and damping != AUTO:
        raise ParameterError("damping", f"must be {AUTO!r} or a number >= 0, got {damping!r}")
    if damping == AUTO and method != "first-order":
        if solver != "lsqr":
            raise ParameterError(
                "damping",
                f"'auto' runs the LSQR regularisation path; set "
                f"influence.solver to lsqr (got {solver!r}) or give a number",
            )
        return estimate_path(
            method=method,
            operator=operator,
            gradient=gradient,
            target_flat=target_flat,
            max_iter=max_iter,
            tol=tol,
            grid=damping_grid,
            scope_flat=scope_flat,
            progress=progress,
        )
    _check(method, operator, gradient, target_flat, solver)
    g = gradient.to(operator.device, operator.dtype)
    target = target_flat.to(g.device)
    if method == "first-order":
        return torch.where(target, g, torch.zeros_like(g)), _first_order_result()
    settings = {"damping": damping, "relative": damping_relative}

    def solve_system(matvec: Callable, rmatvec: Callable, b: Tensor) -> tuple[Tensor, SolveResult]:
        x, result = solve(
            solver,
            matvec,
            rmatvec,
            b,
            **settings,
            max_iter=max_iter,
            tol=tol,
            progress=progress,
            **dict(solver_options or {}),
        )
        # A relative λ is resolved once, so that both solves of sif use the same λ.
        settings.update(damping=result.damping, relative=False)
        return x, result

    if method in PATH_METHODS:
        matvec, rmatvec, b, to_update = _system(method, operator, g, target, scope_flat)
        x, result = solve_system(matvec, rmatvec, b)
        return to_update(x), result
    if removal_operator is None:
        raise ParameterError("method", "'sif' needs the removal set's curvature H_U")
    if not isinstance(removal_operator, RemovalCurvature):
        removal_operator = RemovalCurvature(removal_operator, removal_operator)
    free_index = _scope(scope_flat, target, method, operator.dim).nonzero().squeeze(1)
    removal = RemovalCurvature(
        trained=_restrict(removal_operator.trained, free_index),
        change=_restrict(removal_operator.change, free_index),
    )
    x, result = _second_order(
        solve_system, _restrict(operator, free_index), removal, g[free_index], removal_fraction
    )
    return scatter(x, free_index, operator.dim), result


def _system(
    method: str, operator: LinearOperator, g: Tensor, target: Tensor, scope_flat: Tensor | None
) -> tuple[Callable, Callable, Tensor, Callable[[Tensor], Tensor]]:
    """``(A x, Aᵀ y, b, x ↦ Δ)`` of a method with one damped solve (``PATH_METHODS``)."""
    h, dim = operator.matvec, operator.dim
    if method in ("gif", "fif"):
        index = target.nonzero().squeeze(1)
        place = lambda x: scatter(x, index, dim)  # noqa: E731 - the map back to Δ
        if method == "gif":
            return lambda x: h(place(x)), lambda y: h(y)[index], g, place
        restricted = Restricted(operator, index).matvec  # H[t, t] is symmetric
        return restricted, restricted, g[index], place
    free_index = _scope(scope_flat, target, method, dim).nonzero().squeeze(1)
    restricted = _restrict(operator, free_index).matvec

    def to_update(x: Tensor) -> Tensor:
        delta = scatter(x, free_index, dim)
        return torch.where(target, delta, torch.zeros_like(delta)) if method == "pif" else delta

    return restricted, restricted, g[free_index], to_update


@dataclass
class UpdatePath:
    """The updates ``Δ_λ`` of one LSQR run for every ``λ`` of a damping grid.

    ``path`` holds the Krylov basis and the per-``λ`` solutions of the system; ``update(i)``
    maps solution ``i`` to the full-size ``Δ`` (``[dim]``) when asked, one at a time, so a grid
    of ``G`` updates never occupies ``G`` full-size vectors.
    """

    method: str
    path: PathResult
    to_update: Callable[[Tensor], Tensor]

    def __len__(self) -> int:
        return len(self.path)

    @property
    def lambdas(self) -> list[float]:
        """Absolute ``λ`` of the grid."""
        return self.path.lambdas

    @property
    def relative(self) -> list[float]:
        """``λ / σ_max``."""
        return self.path.relative

    @property
    def sigma_max(self) -> float:
        return self.path.sigma_max

    def update(self, index: int) -> Tensor:
        """``Δ`` of ``lambdas[index]``, flat ``[dim]``."""
        return self.to_update(self.path.solution(index))

    def record(self, index: int) -> SolveResult:
        """The solve record of ``lambdas[index]`` (``damping`` and ``sigma_max`` filled in)."""
        return self.path.records[index]


def estimate_path(
    *,
    method: str,
    operator: LinearOperator,
    gradient: Tensor,
    target_flat: Tensor,
    max_iter: int,
    tol: float,
    grid: Sequence[float] | None = None,
    relative: bool = True,
    scope_flat: Tensor | None = None,
    progress: Callable[[int, float], None] | None = None,
    basis_device: torch.device | str | None = None,
    max_basis_bytes: int | None = None,
    reorthogonalize: bool = False,
) -> UpdatePath:
    """``Δ_λ`` of ``method`` for every ``λ`` of ``grid`` from one LSQR run (``lsqr_path``).

    Same system and arguments as ``estimate_update``; ``grid`` is relative to ``σ_max(A)``
    unless ``relative=False`` (default: 8 values from 1e-4 to 1). Costs what one ``lsqr`` solve
    of ``max_iter`` iterations costs, plus the Krylov basis: ``max_iter`` vectors of the system's
    length (``|t|`` for gif and fif, ``|s|`` for pif and if), 4 bytes each in float32, on
    ``basis_device`` and capped by ``max_basis_bytes``; ``reorthogonalize`` keeps it
    orthonormal (see ``lsqr_path``).
    """
    if method not in PATH_METHODS:
        raise ParameterError(
            "damping",
            f"'auto' supports the methods {', '.join(PATH_METHODS)}, not {method!r}; give a number",
        )
    _check(method, operator, gradient, target_flat, "lsqr")
    g = gradient.to(operator.device, operator.dtype)
    target = target_flat.to(g.device)
    matvec, rmatvec, b, to_update = _system(method, operator, g, target, scope_flat)
    path = lsqr_path(
        matvec,
        rmatvec,
        b,
        grid=grid,
        relative=relative,
        max_iter=max_iter,
        tol=tol,
        progress=progress,
        basis_device=basis_device,
        max_basis_bytes=max_basis_bytes,
        reorthogonalize=reorthogonalize,
    )
    return UpdatePath(method=method, path=path, to_update=to_update)


def _scope(scope_flat: Tensor | None, target: Tensor, method: str, dim: int) -> Tensor:
    """The free coordinates of ``if``, ``pif`` and ``sif``, bool ``[dim]``."""
    if scope_flat is None:
        return torch.ones(dim, dtype=torch.bool, device=target.device)
    if scope_flat.shape != (dim,) or scope_flat.dtype != torch.bool:
        raise ValueError(f"scope_flat must be a bool tensor of shape ({dim},)")
    free = scope_flat.to(target.device)
    if method == "pif":
        free = free | target
    if not free.any():
        raise ParameterError(
            "scope",
            "the scope holds no parameter; set influence.scope: all, or use "
            "a model with nn.Linear / nn.Conv2d layers",
        )
    return free


def _restrict(operator: LinearOperator, index: Tensor) -> LinearOperator:
    """``operator[s, s]``; the operator itself when ``s`` is every coordinate."""
    if len(index) == operator.dim:
        return operator
    if isinstance(operator, Zero):
        return Zero(dim=len(index), dtype=operator.dtype, device=operator.device)
    return Restricted(operator, index)


def _second_order(
    solve: Callable,
    operator: LinearOperator,
    removal: RemovalCurvature,
    g: Tensor,
    p: float | None,
) -> tuple[Tensor, SolveResult]:
    """``sif``, the second-order group influence of Basu et al. (ICML 2020):

        Δ = ((1 − 2p)/(1 − p)) · Δ₁ + (p/(1 − p)) · H_S⁻¹ H_D Δ₁,     Δ₁ = H_S⁻¹ g,

    ``H_S = (1 − p) H + p H_U`` the curvature of the *full* training risk at ``θ̂`` (the retained
    risk's ``H`` and the removal loss's ``H_U = removal.trained`` weighted by their shares of the
    training set), ``p = m / n``, and ``H_D = removal.change`` the curvature of the loss the edit
    takes out: ``H_U`` itself for class removal, ``H_U(poisoned) − H_U(true)`` for a backdoor.
    Both solves are the damped least-squares solves of the other estimators, with ``A = H_S``
    (symmetric, its own transpose). When ``H_D`` is ``Zero`` (a backdoor under Gauss-Newton
    curvature) the second term vanishes and its solve is skipped. The record counts every
    curvature product: one of ``H`` and one of ``H_U`` per ``H_S`` product, and ``H_D Δ₁``.
    """
    if p is None or not 0 < p < 1:
        raise ParameterError("method", f"'sif' needs the removal fraction m/n in (0, 1), got {p}")
    started = time.perf_counter()
    full_risk = Combination([(1 - p, operator), (p, removal.trained)])
    h_s = full_risk.matvec  # symmetric: its own transpose
    first, first_result = solve(h_s, h_s, g)
    delta, results = ((1 - 2 * p) / (1 - p)) * first, [first_result]
    if not isinstance(removal.change, Zero):
        second, second_result = solve(h_s, h_s, removal.change.matvec(first))
        delta, results = delta + (p / (1 - p)) * second, [first_result, second_result]
    result = _merge(results, per_product=products(full_risk), extra_hvps=products(removal.change))
    if isinstance(removal.change, Zero):
        result.message += (
            "; second-order term 0: a backdoor's H_D is the curvature of L_U(poisoned labels) − "
            "L_U(true labels), and the Gauss-Newton matrix does not depend on the labels, so "
            "under ggn curvature sif is (1 − 2p)/(1 − p) · H_S⁻¹ g"
        )
    result.seconds = time.perf_counter() - started
    return delta, result


def _check(
    method: str, operator: LinearOperator, gradient: Tensor, target_flat: Tensor, solver: str
) -> None:
    """Raise on inputs that cannot be estimated from."""
    if method not in METHODS:
        raise ParameterError("method", f"unknown {method!r}; use one of {', '.join(METHODS)}")
    if method != "first-order" and solver not in SOLVERS:
        raise ParameterError("solver", f"unknown {solver!r}; use one of {', '.join(SOLVERS)}")
    if gradient.shape != (operator.dim,):
        raise ValueError(f"gradient has shape {tuple(gradient.shape)}; expected ({operator.dim},)")
    if target_flat.shape != (operator.dim,) or target_flat.dtype != torch.bool:
        raise ValueError(f"target_flat must be a bool tensor of shape ({operator.dim},)")
    if not torch.isfinite(gradient).all():
        raise GifError(
            "removal gradient: contains NaN or Inf; the checkpoint's loss is not finite on the "
            "removal set"
        )
    if method in TARGETED and not target_flat.any():
        raise GifError(
            "selection: the target mask selects no parameter; raise selection.ratio "
            "or check selection.include / exclude"
        )


def _first_order_result() -> SolveResult:
    nan = float("nan")
    return SolveResult(
        solver="none",
        iterations=0,
        hvps=0,
        relative_residual=nan,
        normal_residual=nan,
        converged=True,
        seconds=0.0,
        message="first-order: Δ = g on the target parameters, no curvature solve",
        status="no-solve",
    )


def _merge(results: list[SolveResult], *, per_product: int, extra_hvps: int) -> SolveResult:
    """One record for the solves of ``sif``: counts add up (each solver product costing
    ``per_product`` HVPs, plus ``extra_hvps`` in between), residuals are the worst."""
    first = results[0]
    return SolveResult(
        solver=first.solver,
        iterations=sum(r.iterations for r in results),
        hvps=per_product * sum(r.hvps for r in results) + extra_hvps,
        relative_residual=max(r.relative_residual for r in results),
        normal_residual=max(r.normal_residual for r in results),
        converged=all(r.converged for r in results),
        seconds=sum(r.seconds for r in results),  # the caller adds the time in between
        damping=first.damping,
        sigma_max=first.sigma_max,
        residual_history=[v for r in results for v in r.residual_history],
        normal_history=[v for r in results for v in r.normal_history],
        message="; ".join(
            f"{which} solve: {r.message}"
            for which, r in zip(("first", "second"), results, strict=False)
        ),
        status=next((r.status for r in results if r.status != "converged"), "converged"),
    )
