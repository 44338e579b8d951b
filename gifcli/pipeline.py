"""The edit, in memory: ``edit(model, task, data, settings)`` -> ``EditResult``.

removal set (the task's) -> target mask -> estimator (a solver over HVPs) -> step search on
the validation split -> edited model -> metrics -> report. Nothing here reads or writes a
file: ``gifcli.runs`` loads a config's model and data and writes the outputs
(``gifcli.report.write_outputs``). See docs/design.md, "Pipeline".

Under ``torchrun`` the caller joins the process group (``distributed.process_group``); each
rank then takes its share of the removal set and of the Hessian sample, and every sum over
them is all-reduced.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from gifcli import distributed
from gifcli.config import (
    Config,
    DampingPath,
    FixedStep,
    InfluenceConfig,
    RemovalConfig,
    SelectionConfig,
    StepSearch,
    TrainConfig,
    UpdateConfig,
    range_problems,
)
from gifcli.cost import (
    FORWARD_PASSES,
    STEP_PASSES,
    Probe,
    Stages,
    cached_rates,
    cost_record,
    plan_budget,
    retrain_record,
)
from gifcli.data import DataSplits, Split
from gifcli.data.removal import seeded_subset
from gifcli.errors import GifError, ParameterError
from gifcli.influence.estimators import (
    UpdatePath,
    estimate_update,
    estimator,
    removal_gradient,
    retained_gradient,
)
from gifcli.influence.hvp import CurvatureOperator, curvature_kind, flatten_params, hvp_mode_for
from gifcli.influence.operators import removal_curvature
from gifcli.influence.solvers import SolveResult, damping_grid
from gifcli.metrics import oracle_gap
from gifcli.progress import ProgressFactory, silent
from gifcli.records import (
    BudgetRecord,
    EditReport,
    MetricsRecord,
    ParamsRecord,
    RemovalRecord,
    SelectionRecord,
    SolverRecord,
    UpdateRecord,
)
from gifcli.selection import Selection, check_mask, mask_to_flat, scope_mask, select_targets
from gifcli.tasks import RemovalSet, Task
from gifcli.update import (
    SweepPoint,
    assign_flat,
    check_edited_outputs,
    check_finite,
    recalibrate_batchnorm,
    recalibrating,
    scale_grid,
    search_step,
    tracks_batch_statistics,
    updated,
)


@dataclass
class Settings:
    """How an edit is made: the config's ``seed``, ``selection``, ``influence`` and ``update``
    sections (the same dataclasses, the same defaults and validation)."""

    seed: int = 0
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    gradient_samples: int | None = 1024
    """``removal.gradient_samples``: removal points the removal gradient and the selection
    statistics are averaged over (a seeded subsample; None: all)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """How the model was (and a retraining would be) trained: the retraining estimate of the
    report's ``cost`` and the budget of ``influence.budget`` are taken from it."""

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        return cls(
            seed=config.seed,
            selection=config.selection,
            influence=config.influence,
            update=config.update,
            gradient_samples=config.removal.gradient_samples,
            train=config.train,
        )

    @property
    def weight_decay(self) -> float:
        """``wd`` of the trained objective: ``influence.weight_decay``, else
        ``train.weight_decay`` (``gifcli.runs`` resolves it from the checkpoint first)."""
        chosen = self.influence.weight_decay
        return self.train.weight_decay if chosen is None else chosen

    def problems(self) -> list[str]:
        problems = self.selection.problems() + self.influence.problems() + self.update.problems()
        problems += self.train.problems()
        # the removal section's own range for its one key the edit takes
        removal = replace(RemovalConfig(), gradient_samples=self.gradient_samples)
        return problems + range_problems(removal, "removal.")


@dataclass
class EditResult:
    """An edit: the edited ``model``, the raw update ``Δ`` (flat, the trainable parameters in
    ``named_parameters()`` order, zero outside the target mask for targeted methods), the
    chosen step ``scale`` (the edit is ``θ̂ + scale·Δ``), the target ``mask`` (one bool tensor
    per trainable parameter, CPU), the solve record, the validation sweep and the report."""

    model: nn.Module
    task: Task
    settings: Settings
    update: torch.Tensor
    scale: float
    mask: dict[str, torch.Tensor]
    solve: SolveResult
    sweep: list[SweepPoint]
    report: EditReport


EXTRAPOLATED = 3.0
"""A searched step more than this many times the influence step (scale 1) is noted: the
quadratic model the step comes from is then used far outside where it was taken."""


def edit(
    model: nn.Module,
    task: Task,
    data: DataSplits,
    settings: Settings | None = None,
    *,
    mask: dict[str, torch.Tensor] | None = None,
    oracle: nn.Module | None = None,
    progress: ProgressFactory = silent,
    inplace: bool = False,
    note: Callable[[str], None] = lambda message: None,
    rates_cache: Path | None = None,
) -> EditResult:
    """Make ``model`` forget ``task``'s removal set on ``data``; nothing is written.

    Args:
        model: the trained classifier, on the device to compute on.
        task: a ``Task`` (``RemoveClass``, ``RecoverBackdoor``).
        data: its training, validation and test splits (``DataSplits.from_tensors``).
        settings: selection, estimator and step settings (default: the config defaults).
        mask: a target mask (as saved by ``gif select-params``) instead of selecting anew.
        oracle: the retrained model, to report its metrics and the gap to it.
        progress: a progress hook (``gifcli.progress``); silent by default.
        inplace: edit ``model`` itself instead of a copy of it.
        note: hears one-line warnings: before the work, an edit predicted to cost more than
            one retraining; after the search, a step more than ``EXTRAPOLATED`` times the
            influence step.
        rates_cache: a file of the per-machine rates that convert the edit's work to sample
            passes (``gifcli.cost.rates_cache()``; the commands use it): read, or written
            once; None measures them for this edit and writes nothing.
    """
    settings = settings or Settings()
    _validate(settings)
    given_scale = settings.update.scale is not None
    if not given_scale:  # the task's rule
        settings = replace(settings, update=replace(settings.update, scale=task.step))
    device = next(model.parameters()).device
    if isinstance(settings.update.step, StepSearch) and len(data.val) == 0:
        raise ParameterError(
            "data.val_fraction",
            "update.scale auto searches the step on the validation split, which is empty; "
            "hold out a validation split or give a numeric update.scale",
        )
    model = (model if inplace else copy.deepcopy(model)).eval()
    stages = Stages()
    with stages.timed("removal_set"):
        removal = task.removal_set(
            data,
            device=device,
            model=model,
            search_samples=settings.update.search_samples,
            seed=settings.seed,
        )
    with stages.timed("probe"):
        retained = retained_sample(task, data, settings)
        plan = _plan(model, settings, task, data, removal, retained, mask=mask, note=note)
        settings = plan.settings
        rates, rates_cached = cached_rates(
            rates_cache,
            model,
            removal.retained,
            Probe(
                train=settings.train,
                batch_size=settings.influence.batch_size,
                device=device,
                curvature=settings.influence.curvature,
                hvp_mode=plan.hvp_mode,
            ),
        )
    influence = settings.influence
    by_gradient = settings.selection.method.endswith("gradients")
    with stages.timed(
        "selection", model=model, forward_passes=1.0 if by_gradient else rates.forward_passes
    ):
        selection = target_selection(model, removal, settings, mask=mask, device=device)
    target = mask_to_flat(model, selection.mask).to(device)
    averaged = seeded_subset(len(removal.x), settings.gradient_samples, seed=settings.seed)
    with (
        stages.timed("removal_gradient"),
        progress(f"{influence.gradient} gradient", 1) as advance,
    ):
        gradient = right_hand_side(model, removal, retained, averaged, settings)
        advance(1)
    stages.passes["removal_gradient"] = _gradient_passes(settings, removal, retained)
    sample = hessian_sample(removal.retained, size=influence.hessian_samples, seed=settings.seed)
    with stages.timed("solve"):
        path = solve_path(model, removal, sample, gradient, target, plan, progress)
    stages.passes["solve"] = path.record(0).hvps * len(sample) * rates.hvp_passes

    removal, calibrate = recalibrated(model, removal, sample, settings)
    theta = flatten_params(model)
    target_norm = float(theta[target].norm())
    with stages.timed("step_search", model=model, forward_passes=rates.forward_passes):
        delta, solve, scale, sweep = damping_and_step(
            model, theta, path, target, target_norm, removal, settings.update, progress
        )
    _check_finite(delta, solve, influence)
    if sweep and scale > EXTRAPOLATED:
        note(
            f"update.scale: the search chose {scale:.3g}x the influence step; past "
            f"{EXTRAPOLATED:g}x the quadratic model it comes from is being extrapolated"
        )

    new_theta = updated(theta, delta, target, scale)
    check_finite(new_theta, scale)
    with stages.timed("metrics", model=model, forward_passes=rates.forward_passes):
        metrics = measure(
            task, data, model, new_theta, oracle=oracle, seed=settings.seed, calibrate=calibrate
        )
    check_edited_outputs(model, data.test, device, scale=scale, searched=bool(sweep))

    changed = int((new_theta != theta).sum())
    report = EditReport(
        task=task.name,
        method=influence.method,
        removal=RemovalRecord(
            description=removal.description,
            samples=len(removal.x),
            train_samples=removal.n_train,
            hessian_samples=len(sample),
            gradient_samples=len(averaged),
        ),
        selection=SelectionRecord(
            method=settings.selection.method,
            ratio=settings.selection.ratio,
            mask=None,
            targets=int(target.sum()),
            units=selection.units,
        ),
        params=ParamsRecord(total=theta.numel(), changed=changed, fraction=changed / theta.numel()),
        solver=solver_record(solve, influence, settings.weight_decay),
        update=update_record(
            delta,
            scale,
            sweep,
            target_norm=target_norm,
            chosen_by="validation" if sweep else "config" if given_scale else "task",
        ),
        metrics=metrics,
        cost=cost_record(
            stages=stages,
            rates=rates,
            retrain=retrain_record(
                epochs=settings.train.epochs, samples=plan.retrain_samples, rates=rates
            ),
            budget=plan.budget,
            rates_cached=rates_cached,
        ),
    )
    return EditResult(
        model=model,
        task=task,
        settings=settings,
        update=delta,
        scale=scale,
        mask=selection.mask,
        solve=solve,
        sweep=sweep,
        report=report,
    )


def recalibrated(
    model: nn.Module, removal: RemovalSet, sample: Split, settings: Settings
) -> tuple[RemovalSet, Callable[[nn.Module], None] | None]:
    """With ``update.recalibrate_batchnorm`` and a model whose BatchNorm tracks statistics:
    the removal set whose validation objective scores each edited model with its statistics
    re-estimated on the Hessian sample, and the recalibration of the final model; else both
    as they are (and None)."""
    if not (settings.update.recalibrate_batchnorm and tracks_batch_statistics(model)):
        return removal, None
    batch_size = settings.influence.batch_size
    objective = recalibrating(removal.objective, sample.x, batch_size=batch_size)
    calibrate = functools.partial(recalibrate_batchnorm, x=sample.x, batch_size=batch_size)
    return replace(removal, objective=objective), calibrate


def update_record(
    delta: torch.Tensor,
    scale: float,
    sweep: list[SweepPoint],
    *,
    target_norm: float,
    chosen_by: str,
) -> UpdateRecord:
    """The step taken: its scale and who chose it, its length (raw, scaled and relative to
    ``|θ̂_t|``) and the validation sweep."""
    delta_norm = float(delta.norm())
    return UpdateRecord(
        scale=scale,
        chosen_by=chosen_by,
        norm=scale * delta_norm,
        raw_norm=delta_norm,
        relative_norm=scale * delta_norm / target_norm if target_norm else None,
        sweep=[point.to_dict() for point in sweep],
    )


@dataclass
class Plan:
    """The solve an edit will make, fixed before any of its work: ``settings`` with the
    Hessian sample and iterations the ``budget`` chose, the HVP mode of its products and the
    samples a retraining would train on."""

    settings: Settings
    budget: BudgetRecord
    hvp_mode: str
    retrain_samples: int


def _plan(
    model: nn.Module,
    settings: Settings,
    task: Task,
    data: DataSplits,
    removal: RemovalSet,
    retained: Split | None,
    *,
    mask: dict[str, torch.Tensor] | None,
    note: Callable[[str], None],
) -> Plan:
    """The solve's size under ``influence.budget``, before any of the edit's work
    (``retained``: the samples a retained gradient averages over); an edit predicted to cost
    more than one retraining is noted."""
    method = settings.selection.method
    selects = estimator(settings.influence.method).targeted and mask is None
    per_sample = 1.0 if method.endswith("gradients") else FORWARD_PASSES
    averaged = min(len(removal.x), settings.gradient_samples or len(removal.x))
    selection = averaged * per_sample if selects and method != "random" else 0.0
    retrain_samples = len(task.retrain_split(data))
    retrain_passes = float(settings.train.epochs * retrain_samples)
    validation = len(data.val)
    unknowns = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = plan_budget(
        settings.influence,
        settings.update,
        retrain_passes=retrain_passes,
        fixed_passes=selection + _gradient_passes(settings, removal, retained),
        validation=min(validation, settings.update.search_samples or validation),
        products=lambda iterations: _solve_products(
            settings.influence, removal, iterations, unknowns=unknowns
        ),
    )
    if budget.predicted_ratio > 1:
        note(
            f"influence: this edit is predicted to cost {budget.predicted_ratio:.1f}x one "
            f"retraining ({budget.predicted_passes:,.0f} sample passes against its "
            f"{retrain_passes * STEP_PASSES:,.0f}) "
            "and runs anyway; influence.hessian_samples=auto and influence.max_iter=auto size "
            "it to influence.budget"
        )
    influence = replace(
        settings.influence, hessian_samples=budget.hessian_samples, max_iter=budget.max_iter
    )
    return Plan(
        settings=replace(settings, influence=influence),
        budget=budget,
        hvp_mode=hvp_mode_for(_solve_products(influence, removal, unknowns=unknowns)),
        retrain_samples=retrain_samples,
    )


def _gradient_passes(settings: Settings, removal: RemovalSet, retained: Split | None) -> int:
    """Sample passes of the right-hand side: one gradient pass of each retained sample
    (``influence.gradient: retained``), or of each averaged removal point (twice for a
    backdoor's two label sets)."""
    if retained is not None:
        return len(retained)
    averaged = min(len(removal.x), settings.gradient_samples or len(removal.x))
    return averaged * (1 if removal.true_y is None else 2)


def retained_sample(task: Task, data: DataSplits, settings: Settings) -> Split | None:
    """The training data a retained gradient averages over (``influence.gradient:
    retained``; else None): the new training set, what a retraining trains on (the task's
    ``retrain_split``), or a seeded sample of ``influence.retained_samples`` of it."""
    if settings.influence.gradient != "retained":
        return None
    new_set = task.retrain_split(data)
    size = settings.influence.retained_samples
    if size is None or size >= len(new_set):
        return new_set
    return new_set.subset(seeded_subset(len(new_set), size, seed=settings.seed))


def measure(
    task: Task,
    data: DataSplits,
    model: nn.Module,
    new_theta: torch.Tensor,
    *,
    oracle: nn.Module | None,
    seed: int,
    calibrate: Callable[[nn.Module], None] | None = None,
) -> MetricsRecord:
    """The task's metrics of ``model`` as it is (before) and with ``new_theta`` written into
    it (after; the model keeps them, and ``calibrate``'s BatchNorm statistics when given),
    and of the oracle with the gap to it; with an oracle, each group's fidelity to it; the
    SalUn protocol of the groups where the task has one."""
    device = new_theta.device
    before = task.evaluate(model, data, device=device, seed=seed, oracle=oracle)
    assign_flat(model, new_theta)
    if calibrate is not None:
        calibrate(model)
    metrics = MetricsRecord(
        before=before,
        after=task.evaluate(model, data, device=device, seed=seed, oracle=oracle),
        train_samples=task.metrics_sample_size(data),
    )
    if oracle is not None:
        metrics.oracle = task.evaluate(oracle.eval(), data, device=device, seed=seed, oracle=oracle)
        metrics.gap = oracle_gap(metrics.after, metrics.oracle)
    metrics.salun = task.salun({"before": before, "after": metrics.after, "oracle": metrics.oracle})
    return metrics


def solver_record(
    solve: SolveResult, influence: InfluenceConfig, weight_decay: float
) -> SolverRecord:
    """The solve's diagnostics beside the objective, right-hand side and damping it used."""
    diagnostics = solve.to_dict()
    name = diagnostics.pop("solver")
    sigma_max = diagnostics.get("sigma_max")
    path = isinstance(influence.damping_setting, DampingPath)
    return SolverRecord(
        name=name,
        curvature=influence.curvature,
        weight_decay=weight_decay,
        gradient=influence.gradient,
        damping_form="tikhonov" if path else influence.damping_form,
        damping_relative=diagnostics["damping"] / sigma_max if sigma_max else None,
        damping_chosen_by="validation" if path else "config",
        **diagnostics,
    )


def _validate(settings: Settings) -> None:
    problems = settings.problems()
    if problems:
        raise GifError("settings: " + "; ".join(problems))


def select(
    model: nn.Module, removal: RemovalSet, settings: Settings, *, device: torch.device
) -> Selection:
    """The target parameters from this rank's share of the removal set's ``gradient_samples``
    subsample (statistics all-reduced across ranks under torchrun)."""
    averaged = seeded_subset(len(removal.x), settings.gradient_samples, seed=settings.seed)
    mine = averaged[distributed.shard(len(averaged))]
    chosen = settings.selection
    try:
        return select_targets(
            model,
            removal.x[mine],
            removal.y[mine],
            method=chosen.method,
            ratio=chosen.ratio,
            include=chosen.include,
            exclude=chosen.exclude,
            seed=settings.seed,
            batch_size=settings.influence.batch_size,
            device=device,
            reduce=distributed.all_reduce_sum,
        )
    except ParameterError as exc:
        raise exc.under(f"selection.{exc.parameter}") from None


def target_selection(
    model: nn.Module,
    removal: RemovalSet,
    settings: Settings,
    *,
    mask: dict[str, torch.Tensor] | None,
    device: torch.device,
) -> Selection:
    """The scope's parameters (``influence.scope``) for ``if``/``sif``; else the given mask,
    or a selection made anew."""
    if not estimator(settings.influence.method).targeted:
        return Selection(mask=scope_mask(model, settings.influence.scope))
    if mask is not None:
        check_mask(model, mask, source="mask")
        return Selection(mask=mask)
    return select(model, removal, settings, device=device)


def hessian_sample(retained: Split, *, size: int, seed: int) -> Split:
    """A seeded random subset of ``size`` retained training points (all when fewer), held in
    memory (a streamed split's pixels as stored): every product reads all of it."""
    return retained.subset(seeded_subset(len(retained), size, seed=seed)).in_memory()


def solve_path(
    model: nn.Module,
    removal: RemovalSet,
    sample: Split,
    gradient: torch.Tensor,
    target: torch.Tensor,
    plan: Plan,
    progress: ProgressFactory,
) -> UpdatePath:
    """The updates ``Δ`` of ``influence.method`` (flat, zero outside ``target``) for the
    right-hand side ``gradient``, as a path over the damping: one point for a fixed damping,
    the grid of ``influence.damping: auto``.

    Each rank streams its share of the Hessian sample and of the removal set; the engine
    all-reduces every product.
    """
    settings = plan.settings
    influence = settings.influence
    mine = distributed.shard(len(removal.x))
    local = sample.subset(distributed.shard(len(sample)))

    def curvature(x: torch.Tensor, y: torch.Tensor) -> CurvatureOperator:
        return CurvatureOperator(
            model=model,
            x=x,
            y=y,
            batch_size=influence.batch_size,
            curvature=influence.curvature,
            hvp_mode=plan.hvp_mode,
            cache_bytes=influence.cache_mb << 20,
        )

    try:
        removal_operator = (
            removal_curvature(
                curvature,
                removal.x[mine],
                removal.y[mine],
                true_labels=None if removal.true_y is None else removal.true_y[mine],
                curvature=influence.curvature,
            )
            if estimator(influence.method).uses_removal_curvature
            else None
        )
        with progress(f"solve ({influence.solver})", influence.max_iter) as advance:
            return estimate_update(
                method=influence.method,
                operator=curvature(local.inputs, local.y),
                gradient=gradient,
                target_flat=target,
                solver=influence.solver,
                damping=influence.damping,
                damping_relative=influence.damping_relative,
                damping_grid=damping_grid(
                    influence.damping_points, influence.damping_min, influence.damping_max
                ),
                max_iter=influence.max_iter,
                tol=influence.tol,
                weight_decay=settings.weight_decay,
                damping_form=influence.damping_form,
                removal_operator=removal_operator,
                removal_fraction=len(removal.x) / removal.n_train,
                scope_flat=mask_to_flat(model, scope_mask(model, influence.scope)).to(
                    target.device
                ),
                solver_options=influence.solver_options(),
                progress=lambda iteration, residual: advance(iteration, f"residual {residual:.2e}"),
            )
    except ParameterError as exc:
        raise exc.under(f"influence.{exc.parameter}") from None


def right_hand_side(
    model: nn.Module,
    removal: RemovalSet,
    retained: Split | None,
    averaged: torch.Tensor,
    settings: Settings,
) -> torch.Tensor:
    """``g = −∇R(θ̂)`` of ``influence.gradient`` (docs/design.md, "Notation"): over this rank's
    share of ``retained``, or from this rank's share of ``averaged``, the removal set's
    ``gradient_samples`` subsample (the ranks' gradients all-reduced)."""
    batch_size = settings.influence.batch_size
    averaged = averaged[distributed.shard(len(averaged))]
    if retained is not None:
        mine = retained.subset(distributed.shard(len(retained)))
        return retained_gradient(
            model,
            x=mine.inputs,
            y=mine.y,
            batch_size=batch_size,
            weight_decay=settings.weight_decay,
        )
    return removal_gradient(
        model,
        removal_x=removal.x[averaged],
        removal_y=removal.y[averaged],
        n_train=removal.n_train,
        batch_size=batch_size,
        true_labels=None if removal.true_y is None else removal.true_y[averaged],
        removal_size=len(removal.x),
        weight_decay=settings.weight_decay,
    )


def _solve_products(
    influence: InfluenceConfig,
    removal: RemovalSet,
    iterations: int | None = None,
    *,
    unknowns: int,
) -> int:
    """The curvature products of the solve run to ``iterations`` (default ``max_iter``), as the
    estimator makes them (``Estimator.products``); ``unknowns``: the model's trainable
    parameters, the most columns an ``exact`` solve builds."""
    # a backdoor's H_U is the difference of two label sets' curvatures: zero for a curvature
    # the labels do not enter
    backdoor = 0 if curvature_kind(influence.curvature).label_free else 2
    return estimator(influence.method).products(
        influence.solver,
        int(influence.max_iter if iterations is None else iterations),
        influence.damping_setting,
        unknowns=unknowns,
        removal_products=1 if removal.true_y is None else backdoor,
    )


def _check_finite(delta: torch.Tensor, solve: SolveResult, influence: InfluenceConfig) -> None:
    if not torch.isfinite(delta).all():
        raise GifError(
            f"influence.solver: the {influence.solver} solve produced NaN/Inf "
            f"({solve.message}); increase influence.damping or lower "
            f"influence.max_iter"
        )


def step_grid(
    delta: torch.Tensor, target_norm: float, update: UpdateConfig
) -> list[tuple[float, float]]:
    """The (scale, relative step) grid of ``update`` for the update ``delta``: the searched
    grid, or the one given scale."""
    step = update.step
    if isinstance(step, FixedStep):
        return [(step.scale, step.scale * float(delta.norm()) / (target_norm or 1.0))]
    return scale_grid(
        delta_norm=float(delta.norm()),
        target_norm=target_norm,
        points=step.points,
        smallest=step.smallest,
        largest=step.largest,
    )


def damping_and_step(
    model: nn.Module,
    theta: torch.Tensor,
    path: UpdatePath,
    target: torch.Tensor,
    target_norm: float,
    removal: RemovalSet,
    update: UpdateConfig,
    progress: ProgressFactory,
) -> tuple[torch.Tensor, SolveResult, float, list[SweepPoint]]:
    """The update, its solve record, the step scale and the validation sweep: the damping of
    ``path`` and the step chosen together on the validation split (a given ``update.scale``
    holds the step; with one damping as well there is nothing to search). ``target_norm`` is
    ``|θ̂_t|``, the reference of the relative steps."""
    step = update.step
    if len(path) == 1 and isinstance(step, FixedStep):
        return path.update(0), path.record(0), step.scale, []
    points = step.points if isinstance(step, StepSearch) else 1
    with progress("step search", len(path) * points) as advance:
        choice = search_step(
            model,
            theta=theta,
            path=path,
            target=target,
            grid_for=lambda delta: step_grid(delta, target_norm, update),
            objective=removal.objective,
            advance=advance,
        )
    return path.update(choice.index), path.record(choice.index), choice.scale, choice.sweep
