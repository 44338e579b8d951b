"""Influence estimators of the parameter change ``Δ`` that removes the removal set (SPEC §1).

Notation: ``n`` training points, ``m`` of them in the removal set ``U``, ``H`` the curvature of
the retained risk (``CurvatureOperator``), ``g`` the removal gradient, ``t`` the target
coordinates (``target_flat``), ``λ`` the damping. The edited model is ``θ̂ + s Δ``.

| method        | system solved, ``argmin ‖A x − b‖² + λ²‖x‖²``   | ``Δ``                       |
|---------------|-------------------------------------------------|-----------------------------|
| ``gif``       | ``A = H[:, t]``, ``b = g``                      | ``Δ_t = x``, 0 elsewhere    |
| ``fif``       | ``A = H[t, t]``, ``b = g_t``                    | ``Δ_t = x``, 0 elsewhere    |
| ``pif``       | ``A = H``, ``b = g``                            | ``Δ_t = x_t``, 0 elsewhere  |
| ``if``        | ``A = H``, ``b = g``                            | ``Δ = x``                   |
| ``sif``       | ``A = H``: ``Δ₁`` for ``b = g``, then ``Δ₂``   | ``Δ₁ + p/(1−p) Δ₂``         |
|               | for ``b = (H − H_U) Δ₁``                        |                             |
| first-order   | none                                            | ``Δ_t = g_t``, 0 elsewhere  |

``H[:, t] x`` is one HVP of ``x`` scattered into a zero vector; ``H[t, :] y = (H y)_t`` is one
HVP followed by a gather (``H`` is symmetric). So every product costs one HVP whatever ``|t|``.

``λ`` is absolute, or relative to ``σ_max(A)`` (``damping_relative``), or ``"auto"``: then
``estimate_path`` returns ``Δ_λ`` for a whole grid of ``λ`` from one LSQR run, for the step
search to choose from (see docs/design.md, estimators).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from gifcli.config import INFLUENCE_METHODS, TARGETED_METHODS
from gifcli.errors import GifError
from gifcli.influence.hvp import loss_gradient
from gifcli.influence.solvers import SOLVERS, PathResult, SolveResult, lsqr_path, solve

METHODS = INFLUENCE_METHODS
TARGETED = TARGETED_METHODS
"""Methods whose ``Δ`` is zero outside the target mask."""
PATH_METHODS = ("gif", "fif", "pif", "if")
"""Methods with one damped solve, which ``estimate_path`` covers (``sif`` has two)."""
AUTO = "auto"
"""``influence.damping`` value asking for the regularisation path."""


class LinearOperator(Protocol):
    """What the estimators need from a curvature operator (``CurvatureOperator`` has it)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


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
    """The removal gradient ``g`` (flat, ``[dim]``) of SPEC §1.

    Class removal: ``g = (m / (n − m)) · ∇θ L_U(θ̂)``, ``L_U`` the mean cross-entropy over the
    removal set ``(removal_x, removal_y)``, ``m = len(removal_x)``, ``n = n_train`` (training
    set size, removal set included).

    Backdoor relabelling (``true_labels`` given): the poisoned points are removed with their
    poisoned labels ``removal_y`` and re-added with their true labels,
    ``g = (m / (n − m)) · (∇θ L_U(θ̂; removal_y) − ∇θ L_U(θ̂; true_labels))``.

    Under ``torchrun`` each rank passes its shard of the removal set and ``removal_size``, the
    size ``m`` of the whole set: ``loss_gradient`` reduces the gradient sums and counts over the
    ranks, so ``L_U`` is still the mean over the whole set.
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
    removal_operator: LinearOperator | None = None,
    removal_fraction: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    solver_options: Mapping[str, object] | None = None,
) -> tuple[Tensor, SolveResult] | UpdatePath:
    """The update ``Δ`` (flat, ``[dim]``, the operator's dtype and device) and its solve record;
    for ``damping="auto"`` the regularisation path instead (``estimate_path``).

    Args (keyword-only):
        method: one of ``METHODS`` (module docstring).
        operator: ``H`` of the retained risk, ``.matvec`` on flat ``[dim]`` vectors.
        gradient: the removal gradient ``g``, ``[dim]``.
        target_flat: bool ``[dim]``, True on the target parameters ``t`` (ignored by ``if``
            and ``sif``, which change all parameters).
        solver, damping, max_iter, tol: the solver (``SOLVERS``) and its settings; unused by
            ``first-order``. ``damping="auto"``: ``estimate_path`` with ``damping_grid``
            (``lsqr`` and ``PATH_METHODS`` only).
        damping_relative: ``damping`` is ``λ / σ_max(A)``, ``σ_max`` estimated by the solve
            (``solvers.solve``); ``sif`` takes ``λ`` from its first solve for both.
        removal_operator: ``H_U``, the curvature of the mean removal loss (``sif`` only).
        removal_fraction: ``p = m / n`` (``sif`` only), in ``(0, 1)``.
        progress: ``progress(iteration, relative normal residual)`` after each iteration
            (``exact``: after each column built; ``sif``: counts restart for its second solve).
        solver_options: extra keyword arguments of the solver (``neumann``: ``scale``,
            ``scale_step``, ``max_restarts``).

    Coordinates outside the target mask are exactly zero for the targeted methods.
    """
    if isinstance(damping, str) and damping != AUTO:
        raise GifError(f"influence.damping: must be {AUTO!r} or a number >= 0, got {damping!r}")
    if damping == AUTO and method != "first-order":
        if solver != "lsqr":
            raise GifError(
                f"influence.damping: 'auto' runs the LSQR regularisation path; set "
                f"influence.solver to lsqr (got {solver!r}) or give a number"
            )
        return estimate_path(
            method=method,
            operator=operator,
            gradient=gradient,
            target_flat=target_flat,
            max_iter=max_iter,
            tol=tol,
            grid=damping_grid,
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
        matvec, rmatvec, b, to_update = _system(method, operator.matvec, g, target)
        x, result = solve_system(matvec, rmatvec, b)
        return to_update(x), result
    return _second_order(solve_system, operator.matvec, g, removal_operator, removal_fraction)


def _system(
    method: str, h: Callable[[Tensor], Tensor], g: Tensor, target: Tensor
) -> tuple[Callable, Callable, Tensor, Callable[[Tensor], Tensor]]:
    """``(A x, Aᵀ y, b, x ↦ Δ)`` of a method with one damped solve (``PATH_METHODS``)."""
    index = target.nonzero().squeeze(1)
    if method == "gif":
        return (
            lambda x: h(_scatter(x, index, g)),
            lambda y: h(y)[index],
            g,
            lambda x: _scatter(x, index, g),
        )
    if method == "fif":

        def restricted(x: Tensor) -> Tensor:  # H[t, t] is symmetric: its own transpose
            return h(_scatter(x, index, g))[index]

        return restricted, restricted, g[index], lambda x: _scatter(x, index, g)
    if method == "pif":
        return h, h, g, lambda x: torch.where(target, x, torch.zeros_like(x))
    return h, h, g, lambda x: x


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
    progress: Callable[[int, float], None] | None = None,
    basis_device: torch.device | str | None = None,
    max_basis_bytes: int | None = None,
    reorthogonalize: bool = False,
) -> UpdatePath:
    """``Δ_λ`` of ``method`` for every ``λ`` of ``grid`` from one LSQR run (``lsqr_path``).

    Same system and arguments as ``estimate_update``; ``grid`` is relative to ``σ_max(A)``
    unless ``relative=False`` (default: 8 values from 1e-4 to 1). Costs what one ``lsqr`` solve
    of ``max_iter`` iterations costs, plus the Krylov basis: ``max_iter`` vectors of the system's
    length (``|t|`` for gif and fif, ``dim`` for pif and if), 4 bytes each in float32, on
    ``basis_device`` and capped by ``max_basis_bytes``; ``reorthogonalize`` keeps it
    orthonormal (see ``lsqr_path``).
    """
    if method not in PATH_METHODS:
        raise GifError(
            f"influence.damping: 'auto' supports the methods {', '.join(PATH_METHODS)}, not "
            f"{method!r}; give a number"
        )
    _check(method, operator, gradient, target_flat, "lsqr")
    g = gradient.to(operator.device, operator.dtype)
    matvec, rmatvec, b, to_update = _system(method, operator.matvec, g, target_flat.to(g.device))
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


def _second_order(
    solve: Callable,
    h: Callable,
    g: Tensor,
    removal_operator: LinearOperator | None,
    p: float | None,
) -> tuple[Tensor, SolveResult]:
    """``sif`` (Basu et al. 2020): ``Δ = Δ₁ + p/(1−p) · H⁻¹ (H − H_U) Δ₁``, ``Δ₁ = H⁻¹ g``."""
    if removal_operator is None:
        raise GifError("influence.method: 'sif' needs the removal set's curvature H_U")
    if p is None or not 0 < p < 1:
        raise GifError(f"influence.method: 'sif' needs the removal fraction m/n in (0, 1), got {p}")
    started = time.perf_counter()
    first, first_result = solve(h, h, g)
    rhs = h(first) - removal_operator.matvec(first)
    second, second_result = solve(h, h, rhs)
    result = _merge(first_result, second_result, extra_hvps=2)
    result.seconds = time.perf_counter() - started
    return first + (p / (1 - p)) * second, result


def _scatter(x: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """``x`` (``[|t|]``) placed at ``index`` in a zero vector shaped like ``like``."""
    full = torch.zeros_like(like)
    full[index] = x.to(like.dtype)
    return full


def _check(
    method: str, operator: LinearOperator, gradient: Tensor, target_flat: Tensor, solver: str
) -> None:
    """Raise on inputs that cannot be estimated from."""
    if method not in METHODS:
        raise GifError(f"influence.method: unknown {method!r}; use one of {', '.join(METHODS)}")
    if method != "first-order" and solver not in SOLVERS:
        raise GifError(f"influence.solver: unknown {solver!r}; use one of {', '.join(SOLVERS)}")
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


def _merge(first: SolveResult, second: SolveResult, *, extra_hvps: int) -> SolveResult:
    """One record for the two solves of ``sif``: counts add up, residuals are the worse."""
    return SolveResult(
        solver=first.solver,
        iterations=first.iterations + second.iterations,
        hvps=first.hvps + second.hvps + extra_hvps,
        relative_residual=max(first.relative_residual, second.relative_residual),
        normal_residual=max(first.normal_residual, second.normal_residual),
        converged=first.converged and second.converged,
        seconds=first.seconds + second.seconds,  # the caller adds the time in between
        damping=first.damping,
        sigma_max=first.sigma_max,
        residual_history=first.residual_history + second.residual_history,
        normal_history=first.normal_history + second.normal_history,
        message=f"first solve: {first.message}; second solve: {second.message}",
        status=second.status if first.status == "converged" else first.status,
    )
