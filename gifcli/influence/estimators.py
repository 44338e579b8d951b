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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor, nn

from gifcli.config import INFLUENCE_METHODS, TARGETED_METHODS
from gifcli.errors import GifError
from gifcli.influence.hvp import loss_gradient
from gifcli.influence.solvers import SOLVERS, SolveResult

METHODS = INFLUENCE_METHODS
TARGETED = TARGETED_METHODS
"""Methods whose ``Δ`` is zero outside the target mask."""


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
    damping: float,
    max_iter: int,
    tol: float,
    removal_operator: LinearOperator | None = None,
    removal_fraction: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    solver_options: Mapping[str, object] | None = None,
) -> tuple[Tensor, SolveResult]:
    """The update ``Δ`` (flat, ``[dim]``, the operator's dtype and device) and its solve record.

    Args (keyword-only):
        method: one of ``METHODS`` (module docstring).
        operator: ``H`` of the retained risk, ``.matvec`` on flat ``[dim]`` vectors.
        gradient: the removal gradient ``g``, ``[dim]``.
        target_flat: bool ``[dim]``, True on the target parameters ``t`` (ignored by ``if``
            and ``sif``, which change all parameters).
        solver, damping, max_iter, tol: the solver (``SOLVERS``) and its settings; unused by
            ``first-order``.
        removal_operator: ``H_U``, the curvature of the mean removal loss (``sif`` only).
        removal_fraction: ``p = m / n`` (``sif`` only), in ``(0, 1)``.
        progress: ``progress(iteration, relative normal residual)`` after each iteration
            (``exact``: after each column built; ``sif``: counts restart for its second solve).
        solver_options: extra keyword arguments of the solver (``neumann``: ``scale``,
            ``scale_step``, ``max_restarts``).

    Coordinates outside the target mask are exactly zero for the targeted methods.
    """
    _check(method, operator, gradient, target_flat, solver)
    g = gradient.to(operator.device, operator.dtype)
    target = target_flat.to(g.device)
    if method == "first-order":
        return torch.where(target, g, torch.zeros_like(g)), _first_order_result()

    def solve(matvec: Callable, rmatvec: Callable, b: Tensor) -> tuple[Tensor, SolveResult]:
        return SOLVERS[solver](
            matvec,
            rmatvec,
            b,
            damping=damping,
            max_iter=max_iter,
            tol=tol,
            progress=progress,
            **dict(solver_options or {}),
        )

    h = operator.matvec
    index = target.nonzero().squeeze(1)
    if method == "gif":
        x, result = solve(lambda x: h(_scatter(x, index, g)), lambda y: h(y)[index], g)
        return _scatter(x, index, g), result
    if method == "fif":

        def restricted(x: Tensor) -> Tensor:  # H[t, t] is symmetric: its own transpose
            return h(_scatter(x, index, g))[index]

        x, result = solve(restricted, restricted, g[index])
        return _scatter(x, index, g), result
    if method in ("if", "pif"):
        x, result = solve(h, h, g)
        return (x if method == "if" else torch.where(target, x, torch.zeros_like(x))), result
    return _second_order(solve, h, g, removal_operator, removal_fraction)


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
        residual_history=first.residual_history + second.residual_history,
        normal_history=first.normal_history + second.normal_history,
        message=f"first solve: {first.message}; second solve: {second.message}",
        status=second.status if first.status == "converged" else first.status,
    )
