"""Why GIF needs a long step on a BatchNorm ResNet-18: one hypothesis per variant, measured.

On a config (default ``benchmarks/configs/shapes32-resnet18.yaml``: torchvision ResNet-18 on
the synthetic colour shapes, class 3 removed, 256 Hessian samples, 10 LSQR iterations), for
each variant one LSQR run gives the GIF update for every absolute damping ``λ`` of a grid
(the regularisation path, ``estimate_path``); each ``Δ_λ`` and the first-order update get the
step search on the validation split (the task's objective), and the chosen edit is scored on
the test split. Variants:

- ``eval-bn``: the tool's curvature (BatchNorm on its running statistics, as the model is
  evaluated); ``ggn``: the Gauss-Newton matrix instead; ``train-bn``: the Hessian with
  BatchNorm on each batch's statistics (running statistics left unchanged), the loss the
  network was trained on; ``bn-in-mask``: BatchNorm layers added to the target mask;
  ``samples-1024``, ``iter-30``: a larger Hessian sample, more iterations;
  ``recalibrate-bn``: the tool's update, but every edited model (in the step search and on
  test) gets its BatchNorm running statistics re-estimated on 1,024 retained training points;
  ``top-gradients``: the mask ranked by the removal loss's gradient instead of the mean
  convolution output (which BatchNorm subtracts again).

Per variant and ``λ``: ``λ / σ_max``, ``‖Δ‖``, the cosine of ``Δ`` with the first-order
direction ``g_t`` and with ``(H g)_t`` (the limit of GIF as ``λ → ∞``), the chosen relative
step and the test metrics.

    .venv/bin/python benchmarks/resnet_diagnosis.py --checkpoint runs/shapes32/base.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gifcli.config import load_config
from gifcli.context import prepare
from gifcli.influence.estimators import estimate_path, removal_gradient
from gifcli.influence.hvp import CurvatureOperator, flatten_params
from gifcli.metrics import forget_retain, harmonic_mean, predict
from gifcli.pipeline import hessian_sample
from gifcli.selection import mask_to_flat, select_targets
from gifcli.update import assign_flat, scale_grid, search_scale, updated

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = (
    "eval-bn",
    "ggn",
    "train-bn",
    "bn-in-mask",
    "samples-1024",
    "iter-30",
    "recalibrate-bn",
    "top-gradients",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--config", type=Path, default=ROOT / "benchmarks/configs/shapes32-resnet18.yaml")
    add("--checkpoint", type=Path, help="the base model (default: the config's)")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add("--variants", default=",".join(VARIANTS))
    add("--dampings", default="1e-4,1e-3,1e-2,1e-1,1,10", help="absolute λ grid")
    add("--grid-points", type=int, default=24, help="step-search points (relative 1e-3..10)")
    add("--output", type=Path, default=ROOT / "benchmarks/results/resnet_diagnosis.json")
    return parser.parse_args(argv)


class _TrainModeBatchNorm:
    """BatchNorm on each batch's statistics, running statistics neither used nor updated
    (``track_running_stats`` off while in train mode), for the ``train-bn`` curvature."""

    def __init__(self, model: nn.Module) -> None:
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        for m in self.norms:
            m.track_running_stats = False
            m.train()

    def __exit__(self, *exc: object) -> None:
        for m in self.norms:
            m.track_running_stats = True
            m.eval()


def test_scores(model: nn.Module, data, classes: list[int], device) -> dict:
    predicted, _ = predict(model, data.test, device=device)
    forget, retain = forget_retain(predicted, data.test.y, classes)
    return {
        "forget_acc_test": forget,
        "retain_acc_test": retain,
        "f1": harmonic_mean(100 - forget, retain),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    overrides = list(args.overrides)
    if args.checkpoint:
        overrides.append(f"checkpoint={args.checkpoint}")
    config = load_config(args.config, overrides)
    context = prepare(config)
    device, data = context.device, context.data
    model = context.load_model()
    task = context.task()
    removal = task.removal_set(data, device=device, model=model)
    theta = flatten_params(model)
    g = removal_gradient(
        model,
        removal_x=removal.x,
        removal_y=removal.y,
        n_train=removal.n_train,
        batch_size=config.influence.batch_size,
    )
    before = test_scores(model, data, task.classes, device)
    dampings = [float(v) for v in args.dampings.split(",")]
    results = {
        "command": " ".join([".venv/bin/python", "benchmarks/resnet_diagnosis.py", *(argv or [])]),
        "config": str(
            args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
        ),
        "before": before,
        "parameters": theta.numel(),
        "g_norm": float(g.norm()),
        "variants": {},
    }

    calibration = hessian_sample(removal.retained, size=1024, seed=config.seed + 1).x

    def search(delta: torch.Tensor, target: torch.Tensor, recalibrate: bool = False) -> dict:
        objective = removal.objective
        if recalibrate:

            def objective(model: nn.Module) -> tuple[float, dict]:
                with recalibrated(model, calibration):
                    return removal.objective(model)

        target_norm = float(theta[target].norm())
        grid = scale_grid(
            delta_norm=float(delta.norm()),
            target_norm=target_norm,
            points=args.grid_points,
            smallest=1e-3,
            largest=10.0,
        )
        scale, sweep = search_scale(
            model, theta=theta, delta=delta, target=target, grid=grid, objective=objective
        )
        chosen = next(p for p in sweep if p.scale == scale)
        new = updated(theta, delta, target, scale)
        assign_flat(model, new)
        with recalibrated(model, calibration) if recalibrate else _Nothing():
            scores = test_scores(model, data, task.classes, device)
        assign_flat(model, theta)
        return {
            "relative_step": chosen.relative_step,
            "objective_val": chosen.objective,
            "changed_fraction": float((new != theta).float().mean()),
            **scores,
        }

    def write() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")

    for variant in args.variants.split(","):
        clock = time.perf_counter()
        influence = config.influence
        samples, iterations, curvature = influence.hessian_samples, influence.max_iter, "hessian"
        selection = config.selection
        recalibrate = variant == "recalibrate-bn"
        if variant == "ggn":
            curvature = "ggn"
        if variant == "samples-1024":
            samples = 1024
        if variant == "iter-30":
            iterations = 30
        if variant == "top-gradients":
            selection = type(selection)(method="top-gradients", ratio=selection.ratio)
        if variant == "bn-in-mask":
            selection = type(selection)(
                method=selection.method,
                ratio=selection.ratio,
                include=["*"],  # every layer: BatchNorm too (drawn at random)
            )
        mask = select_targets(
            model,
            removal.x,
            removal.y,
            method=selection.method,
            ratio=selection.ratio,
            include=selection.include,
            seed=config.seed,
            batch_size=influence.batch_size,
            device=device,
        ).mask
        target = mask_to_flat(model, mask).to(device)
        sample = hessian_sample(removal.retained, size=samples, seed=config.seed)
        operator = CurvatureOperator(
            model=model,
            x=sample.x,
            y=sample.y,
            batch_size=influence.batch_size,
            curvature=curvature,
        )
        hg = None
        with _TrainModeBatchNorm(model) if variant == "train-bn" else _Nothing():
            hg = operator.matvec(g)
            path = estimate_path(
                method="gif",
                operator=operator,
                gradient=g,
                target_flat=target,
                max_iter=iterations,
                tol=influence.tol,
                grid=dampings,
                relative=False,
            )
        solve_seconds = time.perf_counter() - clock
        first = torch.where(target, g, torch.zeros_like(g))
        hg_t = torch.where(target, hg, torch.zeros_like(hg))
        record = {
            "targets": int(target.sum()),
            "target_norm": float(theta[target].norm()),
            "g_t_norm": float(first.norm()),
            "sigma_max": path.run.sigma_max,
            "hessian_samples": len(sample),
            "iterations": iterations,
            "curvature": curvature,
            "solve_seconds": solve_seconds,
            "first_order": search(first, target, recalibrate),
            "path": [],
        }
        for index, lam in enumerate(path.lambdas):
            delta = path.update(index)
            record["path"].append(
                {
                    "damping": lam,
                    "relative_damping": path.relative[index],
                    "delta_norm": float(delta.norm()),
                    "cos_first_order": _cos(delta, first),
                    "cos_hg": _cos(delta, hg_t),
                    "relative_residual": path.record(index).relative_residual,
                    **search(delta, target, recalibrate),
                }
            )
        record["seconds"] = time.perf_counter() - clock
        results["variants"][variant] = record
        write()
        print(
            f"{variant}: sigma_max {path.run.sigma_max:.3g}, {record['seconds']:.0f} s",
            file=sys.stderr,
        )
        for row in record["path"]:
            print(
                "  λ {damping:.0e} (λ/σ {relative_damping:.2g}) |Δ| {delta_norm:.3g} cos(g) "
                "{cos_first_order:.2f} cos(Hg) {cos_hg:.2f} step {relative_step:.3f} forget "
                "{forget_acc_test:.1f} retain {retain_acc_test:.1f} F1 {f1:.1f}".format(**row),
                file=sys.stderr,
            )
        fo = record["first_order"]
        print(
            f"  first-order step {fo['relative_step']:.3f} forget {fo['forget_acc_test']:.1f} "
            f"retain {fo['retain_acc_test']:.1f} F1 {fo['f1']:.1f}",
            file=sys.stderr,
        )


class recalibrated:  # noqa: N801 - used as a context, like torch.no_grad
    """BatchNorm running statistics re-estimated on ``x`` (cumulative average, train mode,
    no gradient) inside the block, the model's own restored on exit."""

    def __init__(self, model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
        self.model, self.x, self.batch_size = model, x, batch_size
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [
            (
                m.running_mean.clone(),
                m.running_var.clone(),
                m.num_batches_tracked.clone(),
                m.momentum,
            )
            for m in self.norms
        ]
        for m in self.norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for start in range(0, len(self.x), self.batch_size):
                self.model(self.x[start : start + self.batch_size])
        for m in self.norms:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, (mean, var, count, momentum) in zip(self.norms, self.saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den and math.isfinite(den) else math.nan


if __name__ == "__main__":
    main(sys.argv[1:])
