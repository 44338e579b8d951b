import math

import pytest
import torch
from torch import nn

from gifcli.update import (
    assign_flat,
    scale_grid,
    search_scale,
    search_step,
    updated,
)


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


# --------------------------------------------------------------------------- damping and step


class FakePath:
    """Δ_λ = λ-dependent directions in a 2-parameter model; ``updates`` counts materialisations."""

    def __init__(self, lambdas, directions):
        self.lambdas, self.relative = lambdas, [lam / 10 for lam in lambdas]
        self.directions, self.updates = directions, 0

    def __len__(self):
        return len(self.lambdas)

    def update(self, index):
        self.updates += 1
        return torch.tensor(self.directions[index])


def _joint(path, objective, **kwargs):
    model = nn.Linear(2, 1, bias=False)
    theta = torch.zeros(2)
    assign_flat(model, theta)
    grid_for = lambda delta: [(s, s) for s in torch.logspace(-2, 1, 25).tolist()]  # noqa: E731
    choice = search_step(
        model,
        theta=theta,
        path=path,
        target=torch.ones(2, dtype=torch.bool),
        grid_for=grid_for,
        objective=objective,
        **kwargs,
    )
    assert model.weight.abs().sum() == 0, "the model is left at theta"
    return choice


def _peak(m):
    """Single-peaked in the edited weights, best at w = (1, 1)."""
    w = m.weight.detach().reshape(-1)
    return -float(((w - 1) ** 2).sum()), {"w0": float(w[0])}


def test_joint_search_finds_the_full_grid_optimum_with_fewer_evaluations():
    directions = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]  # only λ index 1 can reach (1, 1)
    full = _joint(FakePath([0.1, 1.0, 10.0], directions), _peak, coarse_stride=1)
    path = FakePath([0.1, 1.0, 10.0], directions)
    coarse = _joint(path, _peak, coarse_stride=3)
    assert (coarse.index, coarse.scale) == (full.index, full.scale) == (1, pytest.approx(1.0))
    assert len(full.sweep) == 3 * 25
    assert len(coarse.sweep) == 3 * (9 + 4)  # per damping: 9 coarse points, 4 fine ones
    assert {p.stage for p in coarse.sweep} == {"coarse", "fine"}
    assert path.updates == 3, "one materialised update per damping"
    chosen = next(p for p in coarse.sweep if p.scale == coarse.scale and p.damping == 1.0)
    assert chosen.relative_damping == 0.1
    point = coarse.sweep[0].to_dict()
    assert {"damping", "relative_damping", "scale", "relative_step", "objective", "w0"} <= set(
        point
    )


def test_joint_search_ties_go_to_the_larger_damping_then_the_smaller_step():
    path = FakePath([0.1, 1.0, 10.0], [[1.0, 0.0]] * 3)

    def plateau(m):
        return min(m.weight[0, 0].item(), 1.0), {}

    choice = _joint(path, plateau, coarse_stride=1)
    assert choice.index == 2
    assert choice.scale == pytest.approx(1.0)  # the smallest step reaching the plateau


def test_joint_search_never_picks_a_non_finite_objective():
    path = FakePath([0.1, 1.0], [[1.0, 0.0], [0.0, 1.0]])

    def objective(m):
        w = m.weight.detach().reshape(-1)
        return (float("nan") if w[1] > 0 else float(w[0])), {}

    choice = _joint(path, objective)
    assert choice.index == 0 and math.isfinite(choice.objective)
    with pytest.raises(ValueError, match="coarse_stride"):
        _joint(path, objective, coarse_stride=0)


def _bn_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.BatchNorm2d(3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 3),
    ).eval()


def test_recalibrate_batchnorm_sets_the_statistics_of_the_inputs_and_leaves_eval() -> None:
    from gifcli.update import recalibrate_batchnorm

    model, x = _bn_model(), torch.randn(40, 1, 4, 4) * 3 + 1
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    recalibrate_batchnorm(model, x, batch_size=8)  # 5 equal batches: their average is the mean
    conv = model[0](x)
    norm = model[1]
    assert torch.allclose(norm.running_mean, conv.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_var, conv.var((0, 2, 3)), rtol=0.1)
    assert not model.training and norm.momentum == 0.1
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if "num_batches" not in k)


def test_recalibrating_objective_scores_recalibrated_and_restores_the_model() -> None:
    from gifcli.update import recalibrating

    model, x = _bn_model(), torch.randn(20, 1, 4, 4) * 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    score = recalibrating(lambda m: (seen.append(m[1].running_mean.clone()) or 1.0, {}), x)
    assert score(model) == (1.0, {})
    assert torch.allclose(seen[0], model[0](x).mean((0, 2, 3)), atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_edit_with_recalibrated_batchnorm_keeps_parameters_outside_the_mask() -> None:
    import gifcli
    from gifcli.config import UpdateConfig

    torch.manual_seed(1)
    x = torch.randn(120, 1, 4, 4)
    y = torch.arange(120) % 3
    x[y == 2] += 2.0
    data = gifcli.DataSplits.from_tensors(train=(x, y), test=(x[:30], y[:30]), val_fraction=0.2)
    model = _bn_model()
    settings = gifcli.Settings(update=UpdateConfig(recalibrate_batchnorm=True, grid_points=6))
    result = gifcli.edit(model, gifcli.RemoveClass(classes=[2]), data, settings)
    edited, original = result.model.state_dict(), model.state_dict()
    mask = result.mask
    for name, tensor in original.items():
        if name in mask:  # a parameter: changed only inside the mask
            assert torch.equal(edited[name][~mask[name]], tensor[~mask[name]])
    assert not torch.equal(edited["1.running_mean"], original["1.running_mean"])


def test_only_a_batchnorm_with_running_statistics_is_recalibrated() -> None:
    from gifcli.update import tracks_batch_statistics

    untracked = _bn_model()
    untracked[1].track_running_stats = False
    assert tracks_batch_statistics(_bn_model())
    assert not tracks_batch_statistics(untracked)
    assert not tracks_batch_statistics(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_one_point_path_is_searched_over_its_full_step_grid():
    """A fixed damping is a path of one ``λ``: its search scores every step of the grid, as
    ``search_scale`` does, and chooses the same step."""
    path = FakePath([0.5], [[1.0, 1.0]])
    choice = _joint(path, _peak)
    model = nn.Linear(2, 1, bias=False)
    grid = [(s, s) for s in torch.logspace(-2, 1, 25).tolist()]
    best, sweep = search_scale(
        model,
        theta=torch.zeros(2),
        delta=torch.tensor([1.0, 1.0]),
        target=torch.ones(2, dtype=torch.bool),
        grid=grid,
        objective=_peak,
    )
    assert (choice.index, choice.scale) == (0, best)
    assert [p.scale for p in choice.sweep] == [p.scale for p in sweep]
    assert {p.stage for p in choice.sweep} == {"full"} and {p.damping for p in choice.sweep} == {
        0.5
    }
