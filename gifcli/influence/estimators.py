"""Influence estimators of the parameter change ``Δ`` that removes the removal set (see
docs/design.md, estimators).

Notation: ``n`` training points, ``m`` of them in the removal set ``U``, ``p = m / n``, ``wd``
the weight decay of the trained objective ``mean loss + (wd/2)‖θ‖²``, ``H = H_loss + wd·I``
the curvature of the retained objective (``H_loss`` a ``CurvatureOperator`` of the retained
loss), ``H_U`` that of the removal loss with the labels trained on, ``H_D`` that of the loss
the edit takes out (``H_U`` for class removal; backdoor: of ``L_U(poisoned labels) − L_U(true
labels)``), ``g = −∇R(θ̂)`` the right-hand side, ``t`` the target coordinates
(``target_flat``), ``s`` the scope (``scope_flat``), ``λ`` the damping. The edited model is
``θ̂ + σ Δ`` (``σ`` the step scale; ``σ = 1`` is the influence step).

| method        | system ``A x ≈ b``                              | ``Δ``                       |
|---------------|-------------------------------------------------|-----------------------------|
| ``gif``       | ``A = H[:, t]``, ``b = g`` (least squares)      | ``Δ_t = x``, 0 elsewhere    |
| ``fif``       | ``A = H[t, t]``, ``b = g_t``                    | ``Δ_t = x``, 0 elsewhere    |
| ``pif``       | ``A = H[s, s]``, ``b = g_s``                    | ``Δ_t = x_t``, 0 elsewhere  |
| ``if``        | ``A = H[s, s]``, ``b = g_s``                    | ``Δ_s = x``, 0 elsewhere    |
| ``sif``       | ``A = H_S[s, s]``,                              | ``Δ_s = (1−2p)/(1−p) Δ₁``   |
|               | ``H_S = (1−p) H_loss + p H_U + wd·I``:          | ``+ p/(1−p) Δ₂``            |
|               | ``Δ₁`` for ``b = g_s``, ``Δ₂`` for              |                             |
|               | ``b = H_D[s, s] Δ₁``                            |                             |
| first-order   | none                                            | ``Δ_t = g_t``, 0 elsewhere  |

Damping ``λ`` enters as a shift, ``H + λ·I`` in place of ``H`` (``damping_form="shift"``,
Levenberg-Marquardt), or as Tikhonov damping of the least-squares problem, ``argmin ‖A x −
b‖² + λ²‖x‖²`` (``"tikhonov"``).

``H[:, t] x`` is one HVP of ``x`` scattered into a zero vector; ``H[t, :] y = (H y)_t`` is one
HVP followed by a gather (``H`` is symmetric). So every product costs one HVP whatever ``|t|``
(``sif``: one of ``H`` and one of ``H_U`` per ``H_S`` product); the shifts cost none.

``H_S`` is the curvature of the training objective the model was trained on, the point Basu et
al.'s expansion starts from; for a backdoor that objective holds the poisoned labels, so
``H_S`` takes ``H_U`` with them, and the label change enters through ``H_D`` only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from gifcli.config import (
    Damping,
    DampingPath,
    FixedDamping,
    damping_of,
    path_problems,
)
from gifcli.errors import GifError, ParameterError
from gifcli.influence.hvp import flatten_params, loss_gradient
from gifcli.influence.operators import (
    Combination,
    LinearOperator,
    Restricted,
    Zero,
    products,
    scatter,
    shifted,
)
from gifcli.influence.solvers import (
    SIGMA_STEPS,
    SOLVERS,
    PathResult,
    Progress,
    SolveResult,
    estimate_sigma_max,
    lsqr_path,
    relative_damping,
    solve,
)


@dataclass(frozen=True)
class System:
    """One linear system ``A x ≈ b`` of an estimator: ``A`` by its products (``matvec``:
    ``x ↦ A x``, ``rmatvec``: ``y ↦ Aᵀ y``), the right-hand side ``b``, and ``to_update``, the
    map of a solution ``x`` to the full-size ``Δ``."""

    matvec: Callable[[Tensor], Tensor]
    rmatvec: Callable[[Tensor], Tensor]
    b: Tensor
    to_update: Callable[[Tensor], Tensor]

    @property
    def products(self) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], Tensor]:
        """``(matvec, rmatvec, b)``, a solver's first three arguments."""
        return self.matvec, self.rmatvec, self.b


class Estimator:
    """One estimator of the module docstring's table: the coordinates it changes, the system
    it solves and the curvature products that costs. ``ESTIMATORS`` holds one of each;
    ``estimator(name)`` looks one up by its ``influence.method`` name."""

    name: ClassVar[str]
    targeted: ClassVar[bool] = True
    """``Δ`` is zero outside the target mask, which is selected for it."""
    solves: ClassVar[int] = 1
    """Damped curvature solves: 0 (no curvature), 1 (``estimate_path`` covers it), 2."""
    uses_removal_curvature: ClassVar[bool] = False
    """Its system needs the removal set's curvature ``H_U`` (``removal_operator``)."""

    def free(self, scope_flat: Tensor | None, target: Tensor, dim: int) -> Tensor:
        """The coordinates the solve treats as variables, bool ``[dim]``: the scope."""
        return _scope(scope_flat, target, dim)

    def system(
        self, operator: LinearOperator, g: Tensor, target: Tensor, scope_flat: Tensor | None
    ) -> System:
        """The square system ``H[s, s] x = g_s`` over the free coordinates ``s``."""
        free_index = self.free(scope_flat, target, operator.dim).nonzero().squeeze(1)
        restricted = _restrict(operator, free_index).matvec
        placed = self._placed(free_index, target, operator)
        return System(restricted, restricted, g[free_index], placed)

    def _placed(
        self, index: Tensor, target: Tensor, operator: LinearOperator
    ) -> Callable[[Tensor], Tensor]:
        return lambda x: scatter(x, index, operator.dim)

    def products(
        self,
        solver: str,
        iterations: int,
        damping: Damping,
        *,
        unknowns: int = 0,
        removal_products: int = 1,
    ) -> int:
        """The curvature products of the solve when its solver runs ``iterations`` in full
        (what its record counts in ``hvps``; it stops earlier once it converges).

        Every iterative solver (``lsqr``, ``cg``, ``neumann`` without restarts) takes one
        product to start, two an iteration and two for the final residual check; ``exact`` one
        to start, one per column of its matrix (``unknowns``, the length of ``x``) and the
        check. A relative damping needs ``σ_max`` first (``2·SIGMA_STEPS + 1`` products) unless
        ``lsqr`` takes it from its own run (Tikhonov); the damping path is one ``lsqr_path``
        run, no check. ``removal_products``: what one product of ``H_U`` costs (``SIF``)."""
        if not self.solves:
            return 0
        if isinstance(damping, DampingPath):
            return 2 * iterations + 1
        first = self._first(solver, iterations, damping, unknowns)
        return self._combined(first, self._one(solver, iterations, unknowns), removal_products)

    def _combined(self, first: int, later: int, removal_products: int) -> int:
        """The estimate's products from its first solve's and those of one more solve."""
        return first

    @staticmethod
    def _one(solver: str, iterations: int, unknowns: int) -> int:
        return unknowns + 3 if solver == "exact" else 2 * iterations + 3

    def _first(self, solver: str, iterations: int, damping: FixedDamping, unknowns: int) -> int:
        estimates_sigma = damping.relative and (
            damping.value > 0 if damping.shift else solver != "lsqr"
        )
        sigma = 2 * SIGMA_STEPS + 1 if estimates_sigma else 0
        return self._one(solver, iterations, unknowns) + sigma


class GIF(Estimator):
    """Least squares over the target columns: ``A = H[:, t]``, ``b = g``."""

    name = "gif"

    def system(
        self, operator: LinearOperator, g: Tensor, target: Tensor, scope_flat: Tensor | None
    ) -> System:
        h, dim = operator.matvec, operator.dim
        index = target.nonzero().squeeze(1)
        place = lambda x: scatter(x, index, dim)  # noqa: E731 - the map back to Δ
        return System(lambda x: h(place(x)), lambda y: h(y)[index], g, place)


class FIF(Estimator):
    """The target block: ``A = H[t, t]``, ``b = g_t``."""

    name = "fif"

    def free(self, scope_flat: Tensor | None, target: Tensor, dim: int) -> Tensor:
        return target


class PIF(Estimator):
    """The scope's system, ``Δ`` kept on the targets; a target outside the scope joins it."""

    name = "pif"

    def free(self, scope_flat: Tensor | None, target: Tensor, dim: int) -> Tensor:
        return _scope(scope_flat, target, dim, also=target)

    def _placed(
        self, index: Tensor, target: Tensor, operator: LinearOperator
    ) -> Callable[[Tensor], Tensor]:
        def to_update(x: Tensor) -> Tensor:
            delta = scatter(x, index, operator.dim)
            return torch.where(target, delta, torch.zeros_like(delta))

        return to_update


class IF(Estimator):
    """The scope's system, every scope coordinate changed."""

    name = "if"
    targeted = False


class SIF(Estimator):
    """Basu et al.'s second-order group influence (``_second_order``): two solves of
    ``H_S``, each product one of ``H`` and one of ``H_U``, and one ``H_D`` product between
    them; no damping path."""

    name = "sif"
    targeted = False
    solves = 2
    uses_removal_curvature = True

    def _combined(self, first: int, later: int, removal_products: int) -> int:
        """``removal_products``: 1 for class removal, 2 for a backdoor (two label sets), 0
        where ``H_U`` is zero (a backdoor under Gauss-Newton: one solve of ``H`` alone)."""
        if removal_products == 0:
            return first
        return (1 + removal_products) * (first + later) + removal_products


class FirstOrder(Estimator):
    """``Δ = g`` on the targets: no curvature, no product."""

    name = "first-order"
    solves = 0


ESTIMATORS: dict[str, Estimator] = {
    e.name: e for e in (GIF(), FIF(), PIF(), IF(), SIF(), FirstOrder())
}
METHODS = tuple(ESTIMATORS)


def estimator(method: str) -> Estimator:
    """The ``Estimator`` named ``method`` (``influence.method``)."""
    try:
        return ESTIMATORS[method]
    except (KeyError, TypeError):
        raise ParameterError(
            "method", f"unknown {method!r}; use one of {', '.join(ESTIMATORS)}"
        ) from None


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
    weight_decay: float = 0.0,
) -> Tensor:
    """The right-hand side ``g`` (flat, ``[dim]``) from the removal set alone
    (``influence.gradient: removal``, docs/design.md, "Notation"): ``−∇R(θ̂)`` wherever ``θ̂``
    minimises the training objective ``mean loss + (wd/2)‖θ‖²`` exactly.

    Removal: ``g = (m / (n − m)) · (∇θ L_U(θ̂) + wd·θ̂)``, ``L_U`` the mean cross-entropy over the
    points ``(removal_x, removal_y)``, ``m = len(removal_x)`` unless ``removal_size`` says
    otherwise, ``n = n_train`` (training set size, removal set included), ``wd =
    weight_decay``.

    Backdoor relabelling (``true_labels`` given): the poisoned points are removed with their
    poisoned labels ``removal_y`` and re-added with their true labels, so the new training set
    has ``n`` points again and ``g = (m / n) · (∇θ L_U(θ̂; removal_y) − ∇θ L_U(θ̂;
    true_labels))``; the weight decay cancels.

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
    _check_gradient(grad_u, "the removal set")
    if true_labels is not None:
        return (m / n_train) * grad_u
    if weight_decay:
        grad_u = grad_u + weight_decay * flatten_params(model).to(grad_u)
    return (m / (n_train - m)) * grad_u


def retained_gradient(
    model: nn.Module, *, x: Tensor, y: Tensor, batch_size: int, weight_decay: float = 0.0
) -> Tensor:
    """The right-hand side ``g = −∇R(θ̂)`` (flat, ``[dim]``) from the retained objective itself
    (``influence.gradient: retained``): ``R(θ) = mean loss over (x, y) + (wd/2)‖θ‖²``, ``(x,
    y)`` the new training set (the retained points; a backdoor's also holds the poisoned inputs
    with their true labels) or a sample of it, streamed in batches (a shard per rank under
    ``torchrun``). Right wherever training stopped, stationary or not."""
    grad = loss_gradient(model, x, y, batch_size=batch_size)
    _check_gradient(grad, "the retained data")
    return -(grad + weight_decay * flatten_params(model).to(grad))


def _check_gradient(gradient: Tensor, where: str) -> None:
    if not torch.isfinite(gradient).all():
        raise GifError(
            f"influence.gradient: NaN or Inf; the checkpoint's loss is not finite on {where} "
            "(check the checkpoint, the data normalisation and the model's dtype)"
        )


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
    weight_decay: float = 0.0,
    damping_form: str = "shift",
    damping_relative: bool = False,
    damping_grid: Sequence[float] | None = None,
    removal_operator: LinearOperator | None = None,
    removal_fraction: float | None = None,
    scope_flat: Tensor | None = None,
    progress: Progress | None = None,
    solver_options: Mapping[str, object] | None = None,
) -> UpdatePath:
    """The updates ``Δ`` (flat, ``[dim]``, the operator's dtype and device) with their solve
    records, as a path over the damping: one point for a fixed damping (``UpdatePath.fixed()``
    gives ``Δ`` and its record), the regularisation path over ``damping_grid`` for
    ``damping="auto"`` (``estimate_path``).

    Args (keyword-only):
        method: one of ``METHODS`` (module docstring).
        operator: the curvature of the retained *loss* (``.matvec`` on flat ``[dim]``
            vectors); the objective's curvature is ``H = operator + weight_decay·I``.
        gradient: the right-hand side ``g``, ``[dim]`` (``removal_gradient`` or
            ``retained_gradient``).
        target_flat: bool ``[dim]``, True on the target parameters ``t`` (ignored by ``if``
            and ``sif``, which change every parameter of the scope).
        solver, damping, max_iter, tol: the solver (``SOLVERS``) and its settings; unused by
            ``first-order``. ``damping="auto"``: ``estimate_path`` with ``damping_grid``
            (``lsqr`` and a method of one solve only), Tikhonov ``λ`` on the system of ``H``.
        weight_decay: ``wd`` of the trained objective ``mean loss + (wd/2)‖θ‖²``.
        damping_form: ``"shift"``: ``λ`` shifts the curvature, ``H + λ·I`` (Levenberg-
            Marquardt), and the system is solved undamped; ``"tikhonov"``: ``λ`` damps the
            least-squares problem, ``min ‖A x − b‖² + λ²‖x‖²`` (docs/design.md, "Damping").
        damping_relative: ``damping`` is ``λ / σ_max(A)``: ``σ_max`` of the system of ``H``
            (shift: ``solvers.estimate_sigma_max``; tikhonov: estimated by the solve, see
            ``solvers.solve``); ``sif`` takes ``λ`` from its first system for both solves.
        removal_operator: the removal set's curvature ``H_U`` (``sif`` only;
            ``removal_curvature`` builds it for class removal and backdoor relabelling).
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
    chosen = damping_of(damping, damping_form, damping_relative)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ParameterError("weight_decay", f"must be a finite number >= 0, got {weight_decay}")
    kind = estimator(method)
    if isinstance(chosen, DampingPath) and kind.solves:
        _check_path(method, solver)
        return estimate_path(
            method=method,
            operator=operator,
            gradient=gradient,
            target_flat=target_flat,
            max_iter=max_iter,
            tol=tol,
            weight_decay=weight_decay,
            grid=damping_grid,
            scope_flat=scope_flat,
            progress=progress,
        )
    _check(kind, operator, gradient, target_flat, solver)
    g = gradient.to(operator.device, operator.dtype)
    target = target_flat.to(g.device)
    if not kind.solves:
        return UpdatePath.of(
            method, torch.where(target, g, torch.zeros_like(g)), _first_order_result()
        )
    fixed = [chosen]

    def damped(system: Callable[[float], System]) -> tuple[Tensor, SolveResult]:
        x, result = _damped_solve(
            system,
            weight_decay=weight_decay,
            damping=fixed[0],
            solver=solver,
            settings={"max_iter": max_iter, "tol": tol, "progress": progress}
            | dict(solver_options or {}),
        )
        # A relative λ is resolved once, so that both solves of sif use the same λ.
        fixed[0] = FixedDamping(result.damping, shift=fixed[0].shift)
        return x, result

    if kind.solves == 1:

        def system(shift: float) -> System:
            return kind.system(shifted(operator, shift), g, target, scope_flat)

        x, result = damped(system)
        return UpdatePath.of(method, system(weight_decay).to_update(x), result)
    if removal_operator is None:
        raise ParameterError("method", "'sif' needs the removal set's curvature H_U")
    free_index = kind.free(scope_flat, target, operator.dim).nonzero().squeeze(1)
    x, result = _second_order(
        _restrict(operator, free_index),
        _restrict(removal_operator, free_index),
        g[free_index],
        removal_fraction,
        damped,
    )
    return UpdatePath.of(method, scatter(x, free_index, operator.dim), result)


def _damped_solve(
    system: Callable[[float], System],
    *,
    weight_decay: float,
    damping: FixedDamping,
    solver: str,
    settings: dict,
) -> tuple[Tensor, SolveResult]:
    """Solve ``system(c)``, the system of ``H_loss + c·I``, damped by ``λ`` in ``form``:
    ``shift``, undamped with ``c = wd + λ``; ``tikhonov``, with ``c = wd`` and the solver's
    ``λ``. A relative ``λ`` is a multiple of ``σ_max`` of the system with ``c = wd``. The
    record's ``damping`` is the absolute ``λ``; ``settings`` are the solver's keyword
    arguments."""
    value = damping.value
    if not damping.shift:
        products = system(weight_decay).products
        return solve(solver, *products, damping=value, relative=damping.relative, **settings)
    started, sigma_max, extra, lam = time.perf_counter(), None, 0, value
    if damping.relative and value > 0:
        sigma_max, extra = estimate_sigma_max(*system(weight_decay).products)
        lam = relative_damping(value, sigma_max)
    x, result = solve(solver, *system(weight_decay + lam).products, damping=0.0, **settings)
    result.damping, result.sigma_max = lam, sigma_max
    result.hvps += extra
    result.seconds = time.perf_counter() - started
    if lam:
        scale = f" ({value:g} × σ_max {sigma_max:.3g}, {extra} products)" if sigma_max else ""
        result.message += f"; curvature shifted by λ = {lam:.3g}{scale}"
    return x, result


@dataclass
class UpdatePath:
    """The updates ``Δ_λ`` of one estimate, one for each damping ``λ`` it was solved at: the
    one ``λ`` of a fixed damping, or a grid of them from one LSQR run (``influence.damping:
    auto``, ``estimate_path``).

    ``records[i]`` is the solve record of ``λ_i`` (``damping`` and ``sigma_max`` filled in);
    ``update(i)`` builds ``Δ_{λ_i}`` (flat, ``[dim]``) when asked, one at a time, so a grid of
    ``G`` updates never occupies ``G`` full-size vectors.
    """

    method: str
    records: list[SolveResult]
    updates: Callable[[int], Tensor]
    run: PathResult | None = None
    """The LSQR run behind a damping grid (its Krylov basis and coefficients); None for a
    fixed damping."""

    @classmethod
    def of(cls, method: str, delta: Tensor, record: SolveResult) -> UpdatePath:
        """The one-point path of an update solved at a fixed damping."""
        return cls(method=method, records=[record], updates=lambda index: delta)

    @classmethod
    def along(
        cls, method: str, run: PathResult, to_update: Callable[[Tensor], Tensor]
    ) -> UpdatePath:
        """The path of an LSQR run over a damping grid, ``to_update`` mapping each of its
        solutions to ``Δ``."""
        updates = lambda index: to_update(run.solution(index))  # noqa: E731
        return cls(method=method, records=run.records, updates=updates, run=run)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lambdas(self) -> list[float]:
        """Absolute ``λ`` of each point."""
        return [record.damping for record in self.records]

    @property
    def relative(self) -> list[float | None]:
        """``λ / σ_max`` of each point; None where ``σ_max`` was not estimated."""
        return [r.damping / r.sigma_max if r.sigma_max else None for r in self.records]

    def update(self, index: int) -> Tensor:
        """``Δ`` of ``lambdas[index]``, flat ``[dim]``."""
        return self.updates(index)

    def record(self, index: int) -> SolveResult:
        """The solve record of ``lambdas[index]``."""
        return self.records[index]

    def fixed(self) -> tuple[Tensor, SolveResult]:
        """``Δ`` and the record of a one-point path (a fixed damping)."""
        if len(self) != 1:
            raise ValueError(f"the path has {len(self)} dampings; pick one with update(i)")
        return self.update(0), self.record(0)


def estimate_path(
    *,
    method: str,
    operator: LinearOperator,
    gradient: Tensor,
    target_flat: Tensor,
    max_iter: int,
    tol: float,
    weight_decay: float = 0.0,
    grid: Sequence[float] | None = None,
    relative: bool = True,
    scope_flat: Tensor | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> UpdatePath:
    """``Δ_λ`` of ``method`` for every ``λ`` of ``grid`` from one LSQR run (``lsqr_path``).

    Same system and arguments as ``estimate_update`` (Tikhonov ``λ`` on the system of ``H =
    operator + weight_decay·I``); ``grid`` is relative to ``σ_max(A)``
    unless ``relative=False`` (default: 8 values from 1e-4 to 1). Costs what one ``lsqr`` solve
    of ``max_iter`` iterations costs, plus the Krylov basis: ``max_iter`` vectors of the system's
    length (``|t|`` for gif and fif, ``|s|`` for pif and if), 4 bytes each in float32.
    """
    kind = estimator(method)
    if not kind.solves:
        raise ParameterError("damping", f"{method!r} makes no solve, so it has no damping path")
    _check_path(method, "lsqr")
    _check(kind, operator, gradient, target_flat, "lsqr")
    g = gradient.to(operator.device, operator.dtype)
    target = target_flat.to(g.device)
    curvature = shifted(operator, weight_decay)
    system = kind.system(curvature, g, target, scope_flat)
    path = lsqr_path(
        *system.products,
        grid=grid,
        relative=relative,
        max_iter=max_iter,
        tol=tol,
        progress=progress,
    )
    return UpdatePath.along(method, path, system.to_update)


def _scope(
    scope_flat: Tensor | None, target: Tensor, dim: int, *, also: Tensor | None = None
) -> Tensor:
    """The free coordinates of ``if``, ``pif`` and ``sif``, bool ``[dim]``: the scope (None:
    every coordinate), with ``also`` joined to it."""
    if scope_flat is None:
        return torch.ones(dim, dtype=torch.bool, device=target.device)
    if scope_flat.shape != (dim,) or scope_flat.dtype != torch.bool:
        raise ValueError(f"scope_flat must be a bool tensor of shape ({dim},)")
    free = scope_flat.to(target.device)
    if also is not None:
        free = free | also
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
    operator: LinearOperator,
    removal: LinearOperator,
    g: Tensor,
    p: float | None,
    damped: Callable[[Callable[[float], System]], tuple[Tensor, SolveResult]],
) -> tuple[Tensor, SolveResult]:
    """``sif``, the second-order group influence of Basu et al. (ICML 2020):

        Δ = ((1 − 2p)/(1 − p)) · Δ₁ + (p/(1 − p)) · H_S⁻¹ H_D Δ₁,     Δ₁ = H_S⁻¹ g,

    ``H_S = (1 − p) H_loss + p H_U + wd·I`` the curvature of the *full* training objective at
    ``θ̂`` (the retained loss's ``H_loss = operator`` and the removal loss's ``H_U = removal``
    weighted by their shares of the training set, and the weight decay), ``p = m / n``, and
    ``H_D = removal`` too, the curvature of the loss the edit takes out:
    ``H_U`` itself for class removal, ``H_U(poisoned) − H_U(true)`` for a backdoor (the weight
    decay, in both objectives, cancels from it). ``damped(system)`` solves ``system(c)``, the
    system of the loss curvature plus ``c·I``, with ``A = H_S`` (symmetric, its own transpose)
    and the damping of the other estimators. When ``H_D`` is ``Zero`` (a backdoor under
    Gauss-Newton curvature) the second term vanishes and its solve is skipped. The record
    counts every curvature product: one of ``H`` and one of ``H_U`` per ``H_S`` product, and
    ``H_D Δ₁``.
    """
    if p is None or not 0 < p < 1:
        raise ParameterError("method", f"'sif' needs the removal fraction m/n in (0, 1), got {p}")
    started = time.perf_counter()
    full_risk = Combination([(1 - p, operator), (p, removal)])

    def system(b: Tensor) -> Callable[[float], System]:
        def of(shift: float) -> System:
            h_s = shifted(full_risk, shift).matvec  # symmetric: its own transpose
            return System(h_s, h_s, b, lambda x: x)

        return of

    first, first_result = damped(system(g))
    delta, results = ((1 - 2 * p) / (1 - p)) * first, [first_result]
    if not isinstance(removal, Zero):
        second, second_result = damped(system(removal.matvec(first)))
        delta, results = delta + (p / (1 - p)) * second, [first_result, second_result]
    result = _merge(results, per_product=products(full_risk), extra_hvps=products(removal))
    if isinstance(removal, Zero):
        result.message += (
            "; second-order term 0: a backdoor's H_D is the curvature of L_U(poisoned labels) − "
            "L_U(true labels), and the Gauss-Newton matrix does not depend on the labels, so "
            "under ggn curvature sif is (1 − 2p)/(1 − p) · H_S⁻¹ g"
        )
    result.seconds = time.perf_counter() - started
    return delta, result


def _check(
    kind: Estimator, operator: LinearOperator, gradient: Tensor, target_flat: Tensor, solver: str
) -> None:
    """Raise on inputs that cannot be estimated from."""
    if kind.solves and solver not in SOLVERS:
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
    if kind.targeted and not target_flat.any():
        raise GifError(
            "selection: the target mask selects no parameter; raise selection.ratio "
            "or check selection.include / exclude"
        )


def _check_path(method: str, solver: str) -> None:
    """Raise where ``damping: auto`` cannot run (``config.path_problems``)."""
    problems = path_problems(method, solver)
    if problems:
        raise ParameterError("damping", problems[0])


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
