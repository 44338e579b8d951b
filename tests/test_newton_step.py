"""The influence step of the trained objective on the most convex case there is: softmax
regression with weight decay (``model.arch: linear``) on scikit-learn's digits, trained to
its exact minimiser, every parameter a target.

There the step at scale 1 is a theorem, not a heuristic: ``if`` and ``gif`` (every parameter a
target, no damping) take one Newton step of the retained objective ``R(θ) = mean loss over the
retained data + (wd/2)‖θ‖²`` from ``θ̂``, whichever right-hand side they use, and that step
lands close to the exactly retrained model. The references here are built without the engine:
``torch.autograd.functional`` for the dense Hessian and gradient, ``torch.optim.LBFGS`` for the
minimisers (before and after removal).
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from gifcli.checkpoint import checkpoint_metadata, save_checkpoint
from gifcli.cli.main import app
from gifcli.config import load_config
from gifcli.data import load_dataset
from gifcli.influence import CurvatureOperator, estimate_update, flatten_params
from gifcli.influence.estimators import removal_gradient, retained_gradient
from gifcli.models import build_model
from gifcli.runs import recorded_weight_decay, with_trained_weight_decay
from gifcli.tasks import RemoveClass, RemoveSamples
from tests.conftest import DIGITS, DIGITS_SAMPLES

WEIGHT_DECAY = 1e-3
LINEAR = ["model.arch=linear", f"train.weight_decay={WEIGHT_DECAY}"]
STEP_ONE = [
    "selection.ratio=1.0",
    "influence.method=gif",
    "influence.solver=exact",
    "influence.damping=0",
    "influence.hessian_samples=100000",  # the whole retained set
    "update.scale=1.0",
]


def _xy(split):
    return split.x.double(), split.y


def minimise(model, split):
    """``model`` (float64) moved to the minimiser of the training objective ``mean CE over split
    + (wd/2)‖θ‖²``: L-BFGS, then Newton steps on the dense Hessian until the gradient is at
    rounding level; returns it and the objective's gradient norm there."""
    x, y = _xy(split)
    params = list(model.parameters())
    optimiser = torch.optim.LBFGS(
        params,
        max_iter=1000,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def objective():
        optimiser.zero_grad()
        value = F.cross_entropy(model(x), y)
        value = value + WEIGHT_DECAY / 2 * sum(p.square().sum() for p in params)
        value.backward()
        return value

    optimiser.step(objective)
    for _ in range(3):
        step, gradient = _newton(model, split)
        if gradient.norm() < 1e-13:
            break
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flatten_params(model) + step, params)
    return model, float(_newton(model, split)[1].norm())


def _newton(model, split):
    """The retained objective's Newton step ``−∇²R(θ̂)⁻¹ ∇R(θ̂)`` at the model's parameters and
    its gradient ``∇R(θ̂)``, dense float64, over ``split``."""
    x, y = _xy(split)
    theta = flatten_params(model)
    shapes = [(name, p.shape) for name, p in model.named_parameters()]

    def objective(flat):
        params, start = {}, 0
        for name, shape in shapes:
            params[name] = flat[start : start + shape.numel()].view(shape)
            start += shape.numel()
        logits = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(logits, y) + WEIGHT_DECAY / 2 * flat.square().sum()

    gradient = torch.autograd.functional.jacobian(objective, theta, vectorize=True)
    hessian = torch.autograd.functional.hessian(objective, theta, vectorize=True)
    return -torch.linalg.solve(hessian, gradient), gradient


@pytest.fixture(scope="session")
def convex(tmp_path_factory):
    """Digits, the exact minimiser of the training objective (float64), the 5% random removal
    set of configs/digits-samples.yaml, and the model written as a checkpoint that records
    the weight decay it was trained with."""
    config = load_config(DIGITS_SAMPLES, LINEAR)
    data = load_dataset(config.data, seed=config.seed)
    torch.manual_seed(0)
    model = build_model(config.model, in_channels=1, image_size=(8, 8)).double()
    model, gradient_norm = minimise(model, data.train)
    assert gradient_norm < 1e-12
    path = tmp_path_factory.mktemp("convex") / "base.safetensors"
    metadata = checkpoint_metadata(
        task="train", config_yaml=config.to_yaml(), weight_decay=repr(WEIGHT_DECAY)
    )
    save_checkpoint(path, copy.deepcopy(model).float().state_dict(), metadata)
    return {
        "config": config,
        "data": data,
        "model": model,
        "checkpoint": path,
        "samples": RemoveSamples.from_config(config, data),
    }


@pytest.fixture(scope="session")
def newton_step(convex):
    return _newton(convex["model"], convex["samples"].retrain_split(convex["data"]))[0]


@pytest.mark.parametrize(
    ("method", "gradient"),
    [
        ("gif", "retained"),
        ("if", "removal"),
        pytest.param("gif", "removal", marks=pytest.mark.slow),
        pytest.param("if", "retained", marks=pytest.mark.slow),
    ],
)
def test_if_and_gif_at_step_one_are_the_newton_step_of_the_retained_objective(
    method, gradient, convex, newton_step
):
    model, data, task = convex["model"], convex["data"], convex["samples"]
    retained = task.retrain_split(data)
    removal = data.train.subset(task.removed_mask(data))
    if gradient == "retained":
        g = retained_gradient(
            model, x=retained.x, y=retained.y, batch_size=4096, weight_decay=WEIGHT_DECAY
        )
    else:
        g = removal_gradient(
            model,
            removal_x=removal.x,
            removal_y=removal.y,
            n_train=len(data.train),
            batch_size=4096,
            weight_decay=WEIGHT_DECAY,
        )
    everything = torch.ones(len(g), dtype=torch.bool)
    delta, result = estimate_update(
        method=method,
        operator=CurvatureOperator(model=model, x=retained.x, y=retained.y, batch_size=4096),
        gradient=g,
        target_flat=everything,
        solver="exact",
        damping=0.0,
        max_iter=1,
        tol=1e-12,
        weight_decay=WEIGHT_DECAY,
        scope_flat=everything,
    ).fixed()
    assert result.converged, result.message
    assert float((delta - newton_step).norm() / newton_step.norm()) <= 1e-6


@pytest.mark.slow
def test_without_the_weight_decay_the_step_is_not_the_newton_step(convex, newton_step):
    """The paper's curvature, the loss's alone, on the same problem: the step is a different
    one (and far longer, the loss curvature being near-singular)."""
    model, data, task = convex["model"], convex["data"], convex["samples"]
    retained = task.retrain_split(data)
    g = retained_gradient(
        model, x=retained.x, y=retained.y, batch_size=4096, weight_decay=WEIGHT_DECAY
    )
    delta, _ = estimate_update(
        method="if",
        operator=CurvatureOperator(model=model, x=retained.x, y=retained.y, batch_size=4096),
        gradient=g,
        target_flat=torch.ones(len(g), dtype=torch.bool),
        solver="exact",
        damping=0.0,
        max_iter=1,
        tol=1e-12,
    ).fixed()
    assert float((delta - newton_step).norm() / newton_step.norm()) > 0.5
    assert delta.norm() > 2 * newton_step.norm()


def test_the_weight_decay_comes_from_the_checkpoint(convex, tmp_path):
    notes = []
    config = load_config(DIGITS_SAMPLES, [*LINEAR, f"checkpoint={convex['checkpoint']}"])
    assert recorded_weight_decay(convex["checkpoint"]) == WEIGHT_DECAY
    resolved = with_trained_weight_decay(config, notes.append)
    assert resolved.influence.weight_decay == WEIGHT_DECAY and not notes
    assert resolved.source == config.source
    given = with_trained_weight_decay(
        load_config(DIGITS_SAMPLES, [*LINEAR, "influence.weight_decay=0.5"]), notes.append
    )
    assert given.influence.weight_decay == 0.5 and not notes
    foreign = tmp_path / "foreign.safetensors"
    save_checkpoint(foreign, copy.deepcopy(convex["model"]).float().state_dict(), {})
    config = load_config(DIGITS_SAMPLES, [*LINEAR, f"checkpoint={foreign}"])
    assert with_trained_weight_decay(config, notes.append).influence.weight_decay == 0.0
    assert len(notes) == 1 and "does not record the weight decay" in notes[0]


def _distance_ratio(edited, retrained, base):
    return float((edited - retrained).norm() / (base - retrained).norm())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "config", "task", "most"),
    [
        ("remove-samples", DIGITS_SAMPLES, "samples", 0.2),
        ("remove-class", DIGITS, "class", 0.6),
    ],
)
def test_an_edit_at_step_one_lands_near_exact_retraining(
    command, config, task, most, convex, tmp_path
):
    """``gif <command>`` with every parameter a target, exact solver, no damping and step 1,
    on the checkpoint alone (the weight decay from its metadata): the edited model is within
    ``most`` of the base model's distance to the exactly retrained one."""
    out = tmp_path / "edit"
    result = CliRunner().invoke(
        app,
        [
            command,
            str(config),
            *LINEAR,
            *STEP_ONE,
            f"checkpoint={convex['checkpoint']}",
            "--output-dir",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["solver"]["weight_decay"] == WEIGHT_DECAY
    assert report["solver"]["gradient"] == "removal"
    data = convex["data"]
    chosen = convex["samples"] if task == "samples" else RemoveClass(classes=[3])
    base = copy.deepcopy(convex["model"]).float().double()  # as the checkpoint holds it
    retrained, _ = minimise(copy.deepcopy(base), chosen.retrain_split(data))
    edited = copy.deepcopy(base)
    state = load_file(out / "model.safetensors")
    edited.load_state_dict({k: v.double() for k, v in state.items()})
    ratio = _distance_ratio(flatten_params(edited), flatten_params(retrained), flatten_params(base))
    assert ratio <= most, ratio


def _quick_edit(convex, task, notes, **update):
    """An in-memory GIF edit of the convex model (float32, as a checkpoint holds it) with a
    cheap solve; ``update``: the ``update`` section's settings."""
    from gifcli.config import InfluenceConfig, SelectionConfig, TrainConfig, UpdateConfig
    from gifcli.pipeline import Settings, edit

    settings = Settings(
        selection=SelectionConfig(ratio=1.0),
        influence=InfluenceConfig(hessian_samples=256, max_iter=5),
        update=UpdateConfig(grid_points=4, **update),
        train=TrainConfig(weight_decay=WEIGHT_DECAY),
    )
    model = copy.deepcopy(convex["model"]).float()
    return edit(model, task, convex["data"], settings, note=notes.append)


def test_sample_removal_takes_the_influence_step_by_default_and_moves_the_model(convex):
    notes = []
    result = _quick_edit(convex, convex["samples"], notes)
    update = result.report.update
    assert (update.scale, update.chosen_by, update.sweep) == (1.0, "task", [])
    assert update.norm > 0 and result.report.params.changed > 0
    assert not notes
    from gifcli.report import summary_lines

    assert (
        "step scale 1× the influence step (the task's default)"
        in summary_lines(result.report.to_dict())[1]
    )


def test_a_search_that_stretches_the_step_past_three_times_says_so(convex):
    task = RemoveClass(classes=[3])
    notes = []
    step = _quick_edit(convex, task, notes, scale=1.0).report.update
    assert step.chosen_by == "config" and not notes
    relative = step.relative_norm  # |Δ| / |θ_t| at scale 1
    searched = _quick_edit(
        convex, task, notes, scale="auto", grid_min=5 * relative, grid_max=8 * relative
    ).report.update
    assert searched.chosen_by == "validation" and searched.scale >= 5 - 1e-9
    assert len(notes) == 1 and "quadratic model" in notes[0] and "influence step" in notes[0]
