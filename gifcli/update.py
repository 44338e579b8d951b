"""Apply a masked update ``θ̂ + s·Δ`` and search the step scale ``s`` on the validation split.

The first-order ``Δ`` is exact only for an infinitesimal removal, so its length is searched
(SPEC §4): a log-spaced grid of *relative* steps ``r = |s·Δ| / |θ̂_t|`` (``θ̂_t`` the target
parameters) from ``update.grid_min`` to ``update.grid_max``; each is scored by the task's
objective on the validation split and the best is kept, ties going to the smaller step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gifcli.errors import GifError


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


def check_finite(theta: torch.Tensor, scale: float) -> None:
    """Refuse edited parameters that overflowed: ``s·Δ`` is finite but too large."""
    if not torch.isfinite(theta).all():
        raise GifError(
            f"update.scale: the edited parameters overflow at step scale {scale:g}; lower "
            f"update.scale (or use auto)"
        )


@dataclass
class SweepPoint:
    scale: float
    relative_step: float
    objective: float
    metrics: dict

    def to_dict(self) -> dict:
        return {
            "scale": self.scale,
            "relative_step": self.relative_step,
            "objective": self.objective,
            **self.metrics,
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
    objective: Callable[[nn.Module], tuple[float, dict]],
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
