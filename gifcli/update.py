"""Apply a masked update ``θ̂ + s·Δ`` and search the step scale ``s`` on the validation split.

The first-order ``Δ`` is exact only for an infinitesimal removal, so its length is searched
(docs/design.md, "Step scale"): a log-spaced grid of *relative* steps ``r = |s·Δ| / |θ̂_t|``
(``θ̂_t`` the target parameters) from ``update.grid_min`` to ``update.grid_max``; each is
scored by the task's objective on the validation split and the best is kept, ties going to
the smaller step.

The estimator returns one ``Δ_λ`` per damping it solved at (``UpdatePath``: one for a fixed
damping, a grid for ``influence.damping: auto``), and ``search_step`` searches ``(λ, s)``
jointly: each ``λ``'s step grid in full when there is one ``λ``, else coarsely and then finely
around each ``λ``'s best; ties go to the larger ``λ`` and then to the smaller step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import nn

from gifcli.errors import GifError

Objective = Callable[[nn.Module], tuple[float, dict]]


@torch.no_grad()
def assign_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector back into the trainable parameters (in place)."""
    offset = 0
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def updated(
    theta: torch.Tensor, delta: torch.Tensor, target: torch.Tensor, scale: float
) -> torch.Tensor:
    """``θ + s·Δ`` on the target coordinates; every other coordinate is bit-identical to ``θ``
    (a plain ``θ + 0`` would turn ``-0.0`` into ``+0.0``)."""
    return torch.where(target, theta + scale * delta, theta)


OUTPUT_CHECK_SAMPLES = 64
"""Test images every loaded checkpoint and every edited model must give finite outputs on."""


def check_finite(theta: torch.Tensor, scale: float) -> None:
    """Refuse edited parameters that overflowed: ``s·Δ`` is finite but too large."""
    if not torch.isfinite(theta).all():
        raise GifError(
            f"update.scale: the edited parameters overflow at step scale {scale:g}; lower "
            f"update.scale (or use auto)"
        )


@torch.no_grad()
def finite_outputs(model: nn.Module, test: _Takes, device: torch.device) -> bool:
    """Whether ``model``'s outputs on the first ``OUTPUT_CHECK_SAMPLES`` test images are
    finite: finite weights can still overflow (1e30 through a few layers is inf), and every
    metric of such a model would be meaningless."""
    x = test.take(torch.arange(min(OUTPUT_CHECK_SAMPLES, len(test)))).to(device)
    return not len(x) or bool(torch.isfinite(model(x)).all())


def check_edited_outputs(
    model: nn.Module, test: _Takes, device: torch.device, *, scale: float, searched: bool
) -> None:
    """Refuse, before anything is published, an edited model whose outputs overflow (the
    check ``gif evaluate`` makes of any checkpoint), naming the key to change."""
    if finite_outputs(model, test, device):
        return
    key = "update.grid_max" if searched else "update.scale"
    raise GifError(
        f"{key}: the edited model's outputs on the test images are NaN or infinite at step "
        f"scale {scale:g}; lower {key}" + ("" if searched else " (or use auto)")
    )


class _Takes(Protocol):
    def __len__(self) -> int: ...

    def take(self, indices: torch.Tensor) -> torch.Tensor: ...


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def tracks_batch_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm with running statistics (what recalibration renews)."""
    return any(m.track_running_stats for m in _batchnorms(model))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> None:
    """Re-estimate every BatchNorm's running statistics on the inputs ``x`` (a cumulative
    average over batches of ``batch_size``, train mode, no gradient); the model is left in
    ``eval()``. An edit moves the activations the statistics describe (``update.
    recalibrate_batchnorm``; BENCHMARKS.md, "ResNet-18 with BatchNorm"). A model without
    BatchNorm is unchanged."""
    norms = [m for m in _batchnorms(model) if m.track_running_stats]
    if not norms:  # nothing to renew
        return
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size].to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()


def recalibrating(objective: Objective, x: torch.Tensor, *, batch_size: int = 256) -> Objective:
    """``objective`` scored with the BatchNorm statistics re-estimated on ``x`` for the model
    as it is, the model's own statistics restored afterwards (for the step search)."""

    def scored(model: nn.Module) -> tuple[float, dict]:
        saved = {k: v.clone() for k, v in model.state_dict().items() if _is_norm_buffer(model, k)}
        try:
            recalibrate_batchnorm(model, x, batch_size=batch_size)
            return objective(model)
        finally:
            model.load_state_dict(saved, strict=False)

    return scored


def _is_norm_buffer(model: nn.Module, key: str) -> bool:
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and name in (
        "running_mean",
        "running_var",
        "num_batches_tracked",
    )


@dataclass
class SweepPoint:
    """A point of the validation sweep: the step ``scale`` (relative step ``relative_step``)
    along ``Δ_λ`` of damping ``damping`` (``relative_damping = λ / σ_max``, None where
    ``σ_max`` is unknown), its ``objective`` and validation ``metrics``, and the ``stage`` of
    the search that scored it (``full``, ``coarse`` or ``fine``)."""

    scale: float
    relative_step: float
    objective: float
    metrics: dict
    damping: float = 0.0
    relative_damping: float | None = None
    stage: str = "full"

    def to_dict(self) -> dict:
        return {
            "damping": self.damping,
            "relative_damping": self.relative_damping,
            "scale": self.scale,
            "relative_step": self.relative_step,
            "objective": self.objective,
            **self.metrics,
            "stage": self.stage,
        }


def scale_grid(
    *, delta_norm: float, target_norm: float, points: int, smallest: float, largest: float
) -> list[tuple[float, float]]:
    """(scale, relative step) pairs, log-spaced in the relative step ``|s·Δ| / |θ_t|``."""
    if delta_norm == 0 or not math.isfinite(delta_norm):
        return []
    reference = target_norm if target_norm > 0 else 1.0
    steps = torch.logspace(
        math.log10(smallest), math.log10(largest), points, dtype=torch.float64
    ).tolist()
    return [(r * reference / delta_norm, r) for r in steps]


def search_scale(
    model: nn.Module,
    *,
    theta: torch.Tensor,
    delta: torch.Tensor,
    target: torch.Tensor,
    grid: list[tuple[float, float]],
    objective: Objective,
    advance: Callable[[], None] | None = None,
) -> tuple[float, list[SweepPoint]]:
    """Score every grid point with ``objective(model) -> (value, metrics)`` (higher is better);
    return the best scale (ties to the smaller step) and the sweep. The model is left at
    ``theta``."""
    sweep = []
    try:
        for scale, relative in grid:
            assign_flat(model, updated(theta, delta, target, scale))
            value, metrics = objective(model)
            sweep.append(SweepPoint(scale, relative, value, metrics))
            if advance is not None:
                advance()
    finally:
        assign_flat(model, theta)
    if not sweep:
        return 0.0, sweep
    best = max(sweep, key=lambda p: (_finite(p.objective), -p.scale))
    return best.scale, sweep


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


# --------------------------------------------------------------------------- damping and step


class UpdatePath(Protocol):
    """What the search needs of the estimator's path (``influence.estimators.UpdatePath``)."""

    lambdas: list[float]
    relative: list[float | None]

    def __len__(self) -> int: ...

    def update(self, index: int) -> torch.Tensor: ...


@dataclass
class StepChoice:
    """The chosen ``(λ, s)``: ``index`` into the path, the step ``scale`` and the sweep."""

    index: int
    scale: float
    objective: float
    sweep: list[SweepPoint] = field(default_factory=list)


def search_step(
    model: nn.Module,
    *,
    theta: torch.Tensor,
    path: UpdatePath,
    target: torch.Tensor,
    grid_for: Callable[[torch.Tensor], list[tuple[float, float]]],
    objective: Objective,
    coarse_stride: int | None = None,
    advance: Callable[[], None] | None = None,
) -> StepChoice:
    """Choose the damping ``λ`` of ``path`` and the step scale ``s`` together on ``objective``.

    For each ``λ`` (one ``Δ_λ = path.update(i)`` in memory at a time), ``grid_for(Δ_λ)`` gives
    its step grid, ``[(scale, relative step)]`` (``scale_grid``); the coarse pass scores every
    ``coarse_stride``-th point and the last, the fine pass the points skipped next to the
    coarse best, so a single-peaked curve keeps its exact optimum at about ``1/coarse_stride``
    of the evaluations. ``coarse_stride`` defaults to 1 (the full grid) for a one-point path
    and 2 for a longer one. The best point over all ``λ`` wins, ties going to the larger ``λ``
    (the more regularised update), then to the smaller step. ``objective(model) -> (value,
    metrics)``, higher is better; non-finite values lose. The model is left at ``theta``.
    Raises ValueError on an empty path.
    """
    if len(path) == 0:
        raise ValueError("the damping path is empty")
    stride = (1 if len(path) == 1 else 2) if coarse_stride is None else coarse_stride
    if stride < 1:
        raise ValueError(f"coarse_stride must be >= 1, got {stride}")
    sweep: list[SweepPoint] = []
    owner: list[int] = []  # the path index of each sweep point's λ
    for index in range(len(path)):
        delta = path.update(index)
        grid = grid_for(delta)
        evaluate = functools.partial(
            _score,
            model,
            theta=theta,
            delta=delta,
            target=target,
            objective=objective,
            advance=advance,
            damping=path.lambdas[index],
            relative_damping=path.relative[index],
        )
        coarse = sorted({*range(0, len(grid), stride), len(grid) - 1} - {-1})
        points = evaluate(grid=[grid[i] for i in coarse], stage="full" if stride == 1 else "coarse")
        if points and stride > 1:
            best = coarse[max(range(len(points)), key=lambda j: _rank(points[j]))]
            fine = [
                i
                for i in range(best - stride + 1, best + stride)
                if 0 <= i < len(grid) and i not in coarse
            ]
            points += evaluate(grid=[grid[i] for i in fine], stage="fine")
        sweep += points
        owner += [index] * len(points)
    if not sweep:
        return StepChoice(0, 0.0, -math.inf)
    position = max(
        range(len(sweep)),
        key=lambda j: (_finite(sweep[j].objective), sweep[j].damping, -sweep[j].scale),
    )
    best = sweep[position]
    return StepChoice(
        index=owner[position], scale=best.scale, objective=best.objective, sweep=sweep
    )


def _score(
    model: nn.Module,
    *,
    grid: list[tuple[float, float]],
    stage: str,
    damping: float,
    relative_damping: float | None,
    **search: object,
) -> list[SweepPoint]:
    """``search_scale``'s sweep over ``grid``, each point labelled with its ``λ`` and stage."""
    _, points = search_scale(model, grid=grid, **search)
    return [
        replace(p, damping=damping, relative_damping=relative_damping, stage=stage) for p in points
    ]


def _rank(point: SweepPoint) -> tuple[float, float]:
    """Order within one step grid: objective, then the smaller step."""
    return _finite(point.objective), -point.scale
