import math

import pytest
import torch
from torch import nn

from gifcli.update import assign_flat, scale_grid, search_scale, updated


def test_update_touches_only_target_coordinates_bit_for_bit():
    theta = torch.tensor([-0.0, 1.0, 2.0, -3.0])
    delta = torch.tensor([0.0, 0.5, 0.0, 1.0])
    target = torch.tensor([False, True, False, True])
    new = updated(theta, delta, target, 2.0)
    assert new.tolist() == [0.0, 2.0, 2.0, -1.0]
    assert math.copysign(1.0, new[0].item()) == -1.0, "-0.0 outside the mask stays -0.0"


def test_grid_is_log_spaced_in_the_relative_step():
    grid = scale_grid(delta_norm=2.0, target_norm=4.0, points=5, smallest=1e-3, largest=10.0)
    relative = [r for _, r in grid]
    assert relative[0] == pytest.approx(1e-3) and relative[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(relative, relative[1:], strict=False)]
    assert all(r == pytest.approx(ratios[0]) for r in ratios)
    for scale, r in grid:
        assert scale * 2.0 / 4.0 == pytest.approx(r)
    assert scale_grid(delta_norm=0.0, target_norm=1.0, points=5, smallest=1e-3, largest=10.0) == []


def test_search_keeps_the_best_and_breaks_ties_towards_the_smaller_step():
    model = nn.Linear(1, 1, bias=False)
    theta = torch.tensor([0.0])
    delta = torch.tensor([1.0])
    target = torch.tensor([True])
    grid = [(s, s) for s in (0.5, 1.0, 2.0, 4.0, 8.0)]

    def objective(m):  # plateau between 2 and 4: the tie goes to 2
        w = m.weight.item()
        return min(w, 2.0) - (w > 4.0) * 10, {"w": w}

    assign_flat(model, theta)
    best, sweep = search_scale(
        model, theta=theta, delta=delta, target=target, grid=grid, objective=objective
    )
    assert best == 2.0
    assert [p.metrics["w"] for p in sweep] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert model.weight.item() == 0.0, "the model is left at theta"


def test_non_finite_objectives_never_win():
    model = nn.Linear(1, 1, bias=False)
    grid = [(1.0, 1.0), (2.0, 2.0)]
    values = iter([float("nan"), 0.0])
    best, _ = search_scale(
        model,
        theta=torch.zeros(1),
        delta=torch.ones(1),
        target=torch.ones(1, dtype=torch.bool),
        grid=grid,
        objective=lambda m: (next(values), {}),
    )
    assert best == 2.0
