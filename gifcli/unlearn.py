"""The one unlearning pipeline behind ``gif remove-class`` and ``gif recover-backdoor``.

config -> (model, checkpoint, data) -> removal set -> target mask -> estimator (solver over
HVPs) -> step search on the validation split -> edited checkpoint -> metrics -> report.

The two tasks differ only in their removal-set builder (``class_removal``, ``backdoor_removal``):
which points are removed (and, for a backdoor, re-added with their true labels), which retained
points form the Hessian sample, and the validation objective of the step search.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gifcli import distributed
from gifcli.checkpoint import check_writable, sha256_file
from gifcli.checks import Check, evaluate_checks
from gifcli.config import TARGETED_METHODS, Config, InfluenceConfig
from gifcli.context import RunContext, prepare
from gifcli.data import TensorSplit, seeded_subset
from gifcli.errors import GifError
from gifcli.influence.estimators import estimate_update, removal_gradient
from gifcli.influence.hvp import CurvatureOperator, flatten_params
from gifcli.influence.operators import removal_curvature
from gifcli.influence.solvers import SolveResult
from gifcli.metrics import forget_retain, harmonic_mean, percent, predict
from gifcli.progress import ProgressFactory, silent
from gifcli.report import OUTPUT_FILES, mask_metadata, oracle_gap, write_outputs
from gifcli.selection import (
    Selection,
    load_mask,
    mask_to_flat,
    save_mask,
    scope_mask,
    select_targets,
    summarize_mask,
)
from gifcli.tasks import REMOVE_CLASS, backdoor_of, task_metrics, task_of, triggered_inputs
from gifcli.update import assign_flat, scale_grid, search_scale, updated

Objective = Callable[[nn.Module], tuple[float, dict]]


@dataclass
class RemovalSet:
    """What a task removes, and how its edit is judged on the validation split.

    ``x``/``y``: the removal set ``U`` with the labels it was trained on (the removal loss and
    the selection statistics use them); ``true_y``: backdoor only, the labels the points are
    re-added with. ``n_train``: the size ``n`` of the training set. ``retained``: the points a
    Hessian sample is drawn from. ``objective(model)``: (harmonic mean, its two parts) on the
    validation split.
    """

    x: torch.Tensor
    y: torch.Tensor
    true_y: torch.Tensor | None
    n_train: int
    retained: TensorSplit
    objective: Objective
    description: str


def class_removal(ctx: RunContext) -> RemovalSet:
    """The training samples of ``removal.classes``; retained: every other training sample."""
    train, val = ctx.data.train, ctx.data.val
    classes = ctx.config.removal.classes
    removed = torch.isin(train.y, torch.tensor(classes))
    if not removed.any():
        raise GifError(f"removal.classes: no training sample has class {classes}")

    def objective(model: nn.Module) -> tuple[float, dict]:
        predicted, _ = predict(model, val, device=ctx.device)
        forget, retain = forget_retain(predicted, val.y, classes)
        return harmonic_mean(100 - forget, retain), {
            "forget_acc_val": forget,
            "retain_acc_val": retain,
        }

    return RemovalSet(
        x=train.x[removed],
        y=train.y[removed],
        true_y=None,
        n_train=len(train),
        retained=train.subset(torch.nonzero(~removed).squeeze(1)),
        objective=objective,
        description=f"classes {classes}",
    )


def backdoor_removal(ctx: RunContext) -> RemovalSet:
    """Known poisoned samples (mode 1) or, with ``removal.synthetic_samples``, clean training
    samples given the known trigger (mode 2): removed with the target label, re-added with
    their true labels. Retained: the clean training samples."""
    train = ctx.data.train
    backdoor = backdoor_of(ctx)
    val = backdoor.clean_val(ctx.data.val)
    clean = torch.ones(len(train), dtype=torch.bool)
    clean[backdoor.poisoned] = False
    count = ctx.config.removal.synthetic_samples
    if count is None:
        x, y, true_y = train.x[backdoor.poisoned], train.y[backdoor.poisoned], backdoor.true_labels
        description = f"{len(backdoor.poisoned)} known poisoned samples"
    else:
        candidates = torch.nonzero(clean & (train.y != backdoor.target)).squeeze(1)
        generator = torch.Generator().manual_seed(ctx.config.seed)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        x = backdoor.apply_trigger(ctx, train.x[chosen])
        y, true_y = torch.full((len(chosen),), backdoor.target), train.y[chosen]
        description = f"{len(chosen)} clean samples with the known trigger"
    triggered_val = triggered_inputs(ctx, val, backdoor)

    def objective(model: nn.Module) -> tuple[float, dict]:
        clean_pred, _ = predict(model, val, device=ctx.device)
        triggered_pred, _ = predict(model, triggered_val, device=ctx.device)
        clean_acc = percent(clean_pred == val.y)
        robust = percent(triggered_pred == triggered_val.y)
        return harmonic_mean(clean_acc, robust), {
            "clean_acc_val": clean_acc,
            "robust_acc_val": robust,
            "asr_val": percent(triggered_pred == backdoor.target),
        }

    return RemovalSet(
        x=x,
        y=y,
        true_y=true_y,
        n_train=len(train),
        retained=train.subset(torch.nonzero(clean).squeeze(1)),
        objective=objective,
        description=description,
    )


def select(ctx: RunContext, model: nn.Module, removal: RemovalSet) -> Selection:
    """The target parameters from this rank's share of the removal set (statistics
    all-reduced across ranks under torchrun)."""
    config = ctx.config
    mine = distributed.shard(len(removal.x))
    return select_targets(
        model,
        removal.x[mine],
        removal.y[mine],
        method=config.selection.method,
        ratio=config.selection.ratio,
        include=config.selection.include,
        exclude=config.selection.exclude,
        seed=config.seed,
        batch_size=config.influence.batch_size,
        device=ctx.device,
        reduce=distributed.all_reduce_sum,
    )


def target_selection(
    ctx: RunContext, model: nn.Module, removal: RemovalSet, mask_path: Path | None
) -> Selection:
    """The scope's parameters for ``if``/``sif``; else a saved mask, or a selection made anew."""
    if ctx.config.influence.method not in TARGETED_METHODS:
        return Selection(mask=scope_mask(model, ctx.config.influence.scope))
    if mask_path is not None:
        return Selection(mask=load_mask(mask_path, model))
    return select(ctx, model, removal)


def estimate(
    ctx: RunContext,
    model: nn.Module,
    removal: RemovalSet,
    sample: TensorSplit,
    target: torch.Tensor,
    progress: ProgressFactory,
) -> tuple[torch.Tensor, SolveResult]:
    """The update ``Δ`` of ``influence.method`` (flat, zero outside ``target``) and its solve.

    Each rank streams its share of the Hessian sample and of the removal set; the engine
    all-reduces every product and gradient.
    """
    influence = ctx.config.influence
    mine = distributed.shard(len(removal.x))
    local = sample.subset(distributed.shard(len(sample)))
    # The removal gradient averages a seeded subsample (removal.gradient_samples; default all),
    # each rank its share of it.
    averaged = seeded_subset(
        len(removal.x), ctx.config.removal.gradient_samples, seed=ctx.config.seed
    )
    averaged = averaged[distributed.shard(len(averaged))]

    def curvature(x: torch.Tensor, y: torch.Tensor) -> CurvatureOperator:
        return CurvatureOperator(
            model=model,
            x=x,
            y=y,
            batch_size=influence.batch_size,
            curvature=influence.curvature,
            cache_bytes=influence.cache_mb << 20,
        )

    with progress("removal gradient", 1) as advance:
        gradient = removal_gradient(
            model,
            removal_x=removal.x[averaged],
            removal_y=removal.y[averaged],
            n_train=removal.n_train,
            batch_size=influence.batch_size,
            true_labels=None if removal.true_y is None else removal.true_y[averaged],
            removal_size=len(removal.x),
        )
        advance(1)
    removal_operator = (
        removal_curvature(
            curvature,
            removal.x[mine],
            removal.y[mine],
            true_labels=None if removal.true_y is None else removal.true_y[mine],
            curvature=influence.curvature,
        )
        if influence.method == "sif"
        else None
    )
    with progress(f"solve ({influence.solver})", influence.max_iter) as advance:
        delta, solve = estimate_update(
            method=influence.method,
            operator=curvature(local.x, local.y),
            gradient=gradient,
            target_flat=target,
            solver=influence.solver,
            damping=influence.damping,
            max_iter=influence.max_iter,
            tol=influence.tol,
            removal_operator=removal_operator,
            removal_fraction=len(removal.x) / removal.n_train,
            scope_flat=mask_to_flat(model, scope_mask(model, influence.scope)).to(ctx.device),
            progress=lambda iteration, residual: advance(iteration, f"residual {residual:.2e}"),
            solver_options=influence.solver_options(),
        )
    if not torch.isfinite(delta).all():
        raise GifError(
            f"influence.solver: the {influence.solver} solve produced NaN/Inf "
            f"({solve.message}); increase influence.damping or lower "
            f"influence.max_iter"
        )
    return delta, solve


def hessian_sample(retained: TensorSplit, *, size: int, seed: int) -> TensorSplit:
    """A seeded random subset of ``size`` retained training points (all when fewer)."""
    return retained.subset(seeded_subset(len(retained), size, seed=seed))


def _solver_report(solve: dict, influence: InfluenceConfig) -> dict:
    """The solve's diagnostics under the SPEC's names (``name``: ``none`` for first-order)."""
    return {
        "name": solve.pop("solver"),
        "curvature": influence.curvature,
        "damping": influence.damping,
        **solve,
    }


def output_paths(directory: Path) -> dict[str, Path]:
    return {key: directory / name for key, name in OUTPUT_FILES.items()}


def run_unlearning(
    *,
    config: Config,
    task: str,
    mask_path: Path | None = None,
    oracle: Path | None = None,
    force: bool = False,
    progress: ProgressFactory = silent,
    checks: Sequence[Check] = (),
) -> dict:
    """Edit ``config.checkpoint`` so that it forgets the task's removal set; write the outputs
    of SPEC §5 into ``output.dir`` and return the report, with the result of each of
    ``checks`` under ``checks``."""
    started = time.perf_counter()
    timing: dict[str, float] = {}
    paths = output_paths(Path(config.output.dir))
    check_writable(config.output.dir)
    existing = [p for p in paths.values() if p.exists()]
    if existing and not force:
        raise GifError(
            f"{existing[0]}: already exists; pass --force to overwrite the outputs "
            f"in {config.output.dir} or set output.dir"
        )
    ctx = prepare(config)
    removal = (class_removal if task == REMOVE_CLASS else backdoor_removal)(ctx)
    if config.update.scale == "auto" and len(ctx.data.val) == 0:
        raise GifError(
            "data.val_fraction: update.scale auto searches the step on the "
            "validation split; set data.val_fraction > 0 or a numeric update.scale"
        )
    model = ctx.load_model()
    input_sha = sha256_file(config.checkpoint)
    influence = config.influence
    # Under torchrun, each rank takes its share of the removal set and of the Hessian sample;
    # every sum over them is all-reduced (the inputs were validated alike on every rank).
    distributed.init(ctx.device)

    clock = time.perf_counter()
    selection = target_selection(ctx, model, removal, mask_path)
    target = mask_to_flat(model, selection.mask).to(ctx.device)
    timing["selection_seconds"] = time.perf_counter() - clock

    clock = time.perf_counter()
    sample = hessian_sample(removal.retained, size=influence.hessian_samples, seed=config.seed)
    delta, solve = estimate(ctx, model, removal, sample, target, progress)
    timing["solve_seconds"] = time.perf_counter() - clock

    clock = time.perf_counter()
    theta = flatten_params(model)
    delta_norm = float(delta.norm())
    target_norm = float(theta[target].norm())
    sweep = []
    if config.update.scale == "auto":
        grid = scale_grid(
            delta_norm=delta_norm,
            target_norm=target_norm,
            points=config.update.grid_points,
            smallest=config.update.grid_min,
            largest=config.update.grid_max,
        )
        with progress("step search", len(grid)) as advance:
            scale, sweep = search_scale(
                model,
                theta=theta,
                delta=delta,
                target=target,
                grid=grid,
                objective=removal.objective,
                advance=advance,
            )
    else:
        scale = float(config.update.scale)
    timing["sweep_seconds"] = time.perf_counter() - clock

    clock = time.perf_counter()
    before = task_metrics(ctx, model)
    new_theta = updated(theta, delta, target, scale)
    assign_flat(model, new_theta)
    after = task_metrics(ctx, model)
    metrics = {"before": before, "after": after}
    if oracle is not None:
        metrics["oracle"] = task_metrics(ctx, ctx.load_model(oracle))
        metrics["gap"] = oracle_gap(after, metrics["oracle"])
    timing["metrics_seconds"] = time.perf_counter() - clock

    changed = int((new_theta != theta).sum())
    report = {
        "task": task,
        "method": influence.method,
        "removal": {
            "description": removal.description,
            "samples": len(removal.x),
            "train_samples": removal.n_train,
            "hessian_samples": len(sample),
            "gradient_samples": min(
                len(removal.x), config.removal.gradient_samples or len(removal.x)
            ),
        },
        "selection": {
            "method": config.selection.method,
            "ratio": config.selection.ratio,
            "mask": str(mask_path) if mask_path else None,
            "targets": int(target.sum()),
            "units": selection.units,
        },
        "params": {"total": theta.numel(), "changed": changed, "fraction": changed / theta.numel()},
        "solver": _solver_report(solve.to_dict(), influence),
        "update": {
            "scale": scale,
            "chosen_by": "validation" if sweep else "config",
            "norm": scale * delta_norm,
            "raw_norm": delta_norm,
            "relative_norm": scale * delta_norm / target_norm if target_norm else None,
            "sweep": [p.to_dict() for p in sweep],
        },
        "metrics": metrics,
        "timing": timing,
        "checkpoint": {
            "input": str(config.checkpoint),
            "input_sha256": input_sha,
            "output": str(paths["model"]),
            "output_sha256": None,
        },
    }
    report["timing"]["total_seconds"] = time.perf_counter() - started
    report["checks"] = evaluate_checks(checks, report)
    if distributed.is_main():  # every rank holds the same edit; one writes it
        write_outputs(paths=paths, report=report, model=model, mask=selection.mask, config=config)
    return report


def select_params(*, config: Config, output: Path | None = None, force: bool = False) -> dict:
    """``gif select-params``: select the target parameters of the config's task and save the
    mask (default: ``output.dir/mask.safetensors``); returns a summary with one row per layer."""
    output = output or output_paths(Path(config.output.dir))["mask"]
    check_writable(output.parent)
    if output.exists() and not force:
        raise GifError(f"{output}: already exists; pass --force to overwrite it or -o another path")
    ctx = prepare(config)
    task = task_of(config)
    removal = (class_removal if task == REMOVE_CLASS else backdoor_removal)(ctx)
    model = ctx.load_model()
    distributed.init(ctx.device)
    started = time.perf_counter()
    selection = select(ctx, model, removal)
    seconds = time.perf_counter() - started
    if distributed.is_main():
        save_mask(output, selection.mask, metadata=mask_metadata(task, config))
    layers = summarize_mask(model, selection.mask, selection.units)
    selected = sum(row["selected"] for row in layers)
    total = sum(row["parameters"] for row in layers)
    return {
        "task": task,
        "removal": removal.description,
        "selection": {"method": config.selection.method, "ratio": config.selection.ratio},
        "mask": str(output),
        "selected": selected,
        "parameters": total,
        "fraction": selected / total,
        "seconds": seconds,
        "layers": layers,
    }
