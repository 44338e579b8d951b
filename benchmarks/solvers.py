"""Solver and HVP benchmark of the influence engine (results: BENCHMARKS.md, "Solvers").

On a TinyNet trained on a data set (scikit-learn's digits by default, or any ``tensors`` .npz /
.pt file), with one class removed and a 5% top-outputs target mask, it measures in one run:

1. solvers: the HVPs LSQR and CG need to reach the relative normal residual that the paper's
   Neumann solver reaches in 200 iterations (GIF system ``H[:, t] x ≈ g``);
2. HVP throughput on one batch: the torch.func paths against the paper's double-backward HVP
   (``torch.autograd.grad`` twice), plus the end-to-end time of a 20-iteration LSQR solve;
3. peak memory of HVPs against the Hessian sample size at a fixed batch size (each point in a
   fresh process);
4. damping and iteration limit: update norms, residuals and the validation / test forgetting
   quality after the step-scale search, for a grid of dampings and max_iter;
5. the damping path: one LSQR run for a whole grid of dampings against one single-damping
   solve at the same iterations (wall time, side by side), its σ_max estimate, its float32
   agreement with lsqr with and without reorthogonalisation, and the joint (λ, s) search.

    .venv/bin/python benchmarks/solvers.py                   # digits, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/solvers.py --data my.npz --hessian-samples 2048
    .venv/bin/python benchmarks/solvers.py --sections path   # one section, merged into the JSON

Writes benchmarks/results/solvers.json and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp

from gifcli.config import DataConfig, TrainConfig
from gifcli.data import TensorSplit, load_dataset
from gifcli.influence import CurvatureOperator, estimate_path, estimate_update, removal_gradient
from gifcli.influence.estimators import UpdatePath, estimator
from gifcli.influence.hvp import flatten, trainable_parameters
from gifcli.influence.solvers import lsqr_path
from gifcli.models import TinyNet
from gifcli.selection import mask_to_flat, select_targets
from gifcli.train import train_model
from gifcli.update import (
    assign_flat,
    scale_grid,
    search_scale,
    search_step,
    updated,
)

RESULTS = Path(__file__).resolve().parent / "results" / "solvers.json"
SECTIONS = ("solvers", "throughput", "memory", "damping", "path")
TIMED_MODES = ("double-backward", "forward-over-reverse", "reverse-over-reverse", "linearize")
"""gifcli's ``HVP_MODES`` and reverse-over-reverse, which gifcli does not offer (slower)."""
MEMORY_VARIANTS = (  # (column, hvp_mode, linearisation cache budget in bytes)
    ("linearize (default, 1 GiB cache)", "linearize", 1 << 30),
    ("linearize, 48 MiB cache", "linearize", 48 << 20),
    ("forward-over-reverse", "forward-over-reverse", 0),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", default="digits", help="digits, or a tensors .npz/.pt file")
    add("--remove-class", type=int, default=3)
    add("--epochs", type=int, default=15, help="TinyNet training epochs")
    add("--hessian-samples", type=int, default=1024)
    add("--batch-size", type=int, default=256, help="HVP batch size")
    add("--ratio", type=float, default=0.05, help="top-outputs selection ratio")
    add("--neumann-iter", type=int, default=200, help="the paper's Neumann iterations")
    add("--compare-iter", type=int, default=150, help="LSQR/CG iteration cap in section 1")
    add("--repeats", type=int, default=15, help="timed products per HVP path (median)")
    add("--memory-sizes", default="256,640,1024", help="Hessian sample sizes, section 3")
    add("--dampings", default="0,1e-3,1e-2,1e-1,1", help="section 4")
    add("--max-iters", default="20,100", help="section 4")
    add("--path-iter", type=int, default=20, help="section 5: LSQR iterations")
    add("--path-repeats", type=int, default=9, help="section 5: timed runs of each (median)")
    add("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    add("--threads", type=int, default=1, help="torch intra-op threads (1: stable timings)")
    add("--seed", type=int, default=0)
    add("--output", type=Path, default=RESULTS)
    add("--memory-probe", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- setup


def load_splits(data: str, seed: int):
    config = (
        DataConfig(dataset="digits")
        if data == "digits"
        else DataConfig(dataset="tensors", path=data)
    )
    return load_dataset(config, seed=seed)


def build_tinynet(splits) -> nn.Module:
    return TinyNet(
        in_channels=splits.in_channels, image_size=splits.image_size, num_classes=splits.num_classes
    )


def setup(args: argparse.Namespace) -> dict:
    """Train TinyNet, build the removal set, Hessian sample, target mask and removal gradient."""
    splits = load_splits(args.data, args.seed)
    torch.manual_seed(args.seed)
    model = build_tinynet(splits)
    started = time.perf_counter()
    train_model(
        model,
        splits.train,
        config=TrainConfig(epochs=args.epochs, batch_size=32),
        seed=args.seed,
        device=torch.device("cpu"),
    )
    train_seconds = time.perf_counter() - started
    forget = splits.train.y == args.remove_class
    removal, retained = splits.train.subset(forget), splits.train.subset(~forget)
    order = torch.randperm(len(retained), generator=torch.Generator().manual_seed(args.seed))
    sample = retained.subset(order[: args.hessian_samples])
    mask = select_targets(
        model, removal.x, removal.y, method="top-outputs", ratio=args.ratio, seed=args.seed
    ).mask
    target = mask_to_flat(model, mask)
    g = removal_gradient(
        model,
        removal_x=removal.x,
        removal_y=removal.y,
        n_train=len(splits.train),
        batch_size=args.batch_size,
    )
    return {
        "splits": splits,
        "model": model,
        "removal": removal,
        "sample": sample,
        "target": target,
        "gradient": g,
        "train_seconds": train_seconds,
    }


class ReverseOverReverse(CurvatureOperator):
    """The Hessian product ``vjp(grad(L), θ)(v)``: builds and differentiates the graph of the
    gradient per product. Timed here only: gifcli's paths are faster."""

    def __init__(self, **kwargs) -> None:
        super().__init__(hvp_mode="forward-over-reverse", **kwargs)

    def _batch_product(self, index: int, xb: Tensor, yb: Tensor, v: dict) -> dict:
        grad_fn = torch.func.grad(self._loss.loss_sum)
        return vjp(lambda p: grad_fn(p, xb, yb), self._loss.params)[1](v)[0]


def hvp_operator(mode: str, **kwargs) -> CurvatureOperator:
    """The operator whose products take the path ``mode`` of ``TIMED_MODES``."""
    if mode == "reverse-over-reverse":
        return ReverseOverReverse(**kwargs)
    return CurvatureOperator(hvp_mode=mode, **kwargs)


def operator_for(ctx: dict, args: argparse.Namespace, **kwargs) -> CurvatureOperator:
    sample = ctx["sample"]
    return CurvatureOperator(
        model=ctx["model"], x=sample.x, y=sample.y, batch_size=args.batch_size, **kwargs
    )


def gif(
    ctx: dict, operator, *, solver: str, damping: float, max_iter: int, tol: float = 0.0, **options
):
    return estimate_update(
        method="gif",
        operator=operator,
        gradient=ctx["gradient"],
        target_flat=ctx["target"],
        solver=solver,
        damping=damping,
        max_iter=max_iter,
        tol=tol,
        solver_options=options or None,
    ).fixed()


# --------------------------------------------------------------------------- 1. solvers


def bench_solvers(
    ctx: dict,
    args: argparse.Namespace,
    damping: float,
    scale: float | None,
    operator: CurvatureOperator,
) -> dict:
    """``scale=None``: the paper's Neumann settings; else Neumann started at that ``c``."""
    atb_norm = float(operator.matvec(ctx["gradient"])[ctx["target"]].norm())
    options = {} if scale is None else {"scale": scale}
    _, neumann = gif(
        ctx, operator, solver="neumann", damping=damping, max_iter=args.neumann_iter, **options
    )
    level = neumann.normal_residual / atb_norm
    out = {
        "damping": damping,
        "neumann_scale": "paper (c=1, step 0.5)" if scale is None else f"tuned c={scale:.3g}",
        "neumann": {**_brief(neumann, atb_norm), "message": neumann.message},
    }
    for name in ("lsqr", "cg"):
        # tol = Neumann's level: the solver stops as soon as its normal residual reaches it
        # (its relative residual stays far above that level on this inconsistent system).
        _, run = gif(
            ctx, operator, solver=name, damping=damping, max_iter=args.compare_iter, tol=level
        )
        reached = run.normal_residual / atb_norm <= level * 1.01
        # HVP totals as reported, both including the 2-product residual check at the end.
        out[name] = {
            **_brief(run, atb_norm),
            "reached": reached,
            "hvps_to_reach": run.hvps if reached else None,
            "neumann_hvps_per_hvp": neumann.hvps / run.hvps if reached else None,
        }
    return out


def _brief(result, atb_norm: float) -> dict:
    return {
        "iterations": result.iterations,
        "hvps": result.hvps,
        "relative_residual": result.relative_residual,
        "relative_normal_residual": result.normal_residual / atb_norm,
        "converged": result.converged,
        "seconds": result.seconds,
    }


# --------------------------------------------------------------------------- 2. throughput


def double_backward_hvp(model: nn.Module, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """The paper's HVP: the gradient with ``create_graph``, then ``grad`` with ``grad_outputs``."""
    params = list(trainable_parameters(model).values())
    loss = F.cross_entropy(model(x), y, reduction="sum")
    grads = flatten(torch.autograd.grad(loss, params, create_graph=True))
    return flatten(torch.autograd.grad(grads, params, grad_outputs=v))


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_throughput(ctx: dict, args: argparse.Namespace) -> dict:
    sample, model = ctx["sample"], ctx["model"]
    x, y = sample.x[: args.batch_size], sample.y[: args.batch_size]
    v = torch.randn(sum(p.numel() for p in trainable_parameters(model).values()))
    out = {"batch": len(x), "seconds_per_product": {}, "linearize_setup_seconds": None}
    for mode in TIMED_MODES:
        operator = hvp_operator(mode, model=model, x=x, y=y, batch_size=len(x))
        started = time.perf_counter()
        operator.matvec(v)
        if mode == "linearize":
            out["linearize_setup_seconds"] = time.perf_counter() - started
        out["seconds_per_product"][mode] = median_seconds(
            lambda o=operator: o.matvec(v), args.repeats
        )
    ggn = CurvatureOperator(model=model, x=x, y=y, batch_size=len(x), curvature="ggn")
    out["seconds_per_product"]["ggn (jvp + vjp)"] = median_seconds(
        lambda: ggn.matvec(v), args.repeats
    )
    model.eval()
    out["seconds_per_product"]["double-backward (paper)"] = median_seconds(
        lambda: double_backward_hvp(model, x, y, v), args.repeats
    )
    base = out["seconds_per_product"]["double-backward (paper)"]
    out["speedup_vs_double_backward"] = {
        mode: base / seconds for mode, seconds in out["seconds_per_product"].items()
    }
    solves = {mode: _timed_solve(ctx, args, mode) for mode in TIMED_MODES}
    out["lsqr_20_iterations_seconds"] = solves
    return out


def _timed_solve(ctx: dict, args: argparse.Namespace, mode: str) -> float:
    """Operator construction plus a 20-iteration LSQR GIF solve over the Hessian sample."""
    started = time.perf_counter()
    sample = ctx["sample"]
    operator = hvp_operator(
        mode, model=ctx["model"], x=sample.x, y=sample.y, batch_size=args.batch_size
    )
    gif(ctx, operator, solver="lsqr", damping=1e-2, max_iter=20)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- 3. memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(path: Path) -> None:
    """Child process: peak resident memory of three products, above the state before them."""
    job = torch.load(path, weights_only=True)
    torch.set_num_threads(job["threads"])
    model = TinyNet(
        in_channels=job["in_channels"],
        image_size=tuple(job["image_size"]),
        num_classes=job["num_classes"],
    )
    model.load_state_dict(job["state"])
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    # One product on one point first, so torch's one-off initialisation is not measured.
    CurvatureOperator(
        model=model, x=job["x"][:1], y=job["y"][:1], batch_size=1, hvp_mode=job["mode"]
    ).matvec(v)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    baseline = _status_kib("VmRSS")
    operator = CurvatureOperator(
        model=model,
        x=job["x"],
        y=job["y"],
        batch_size=job["batch_size"],
        hvp_mode=job["mode"],
        cache_bytes=job["cache_bytes"],
    )
    for _ in range(3):
        operator.matvec(v)
    print(
        json.dumps(
            {
                "peak_mib": (_status_kib("VmHWM") - baseline) / 1024,
                "cached_batches": operator.cached_batches,
            }
        )
    )


def bench_memory(ctx: dict, args: argparse.Namespace) -> dict:
    splits, model = ctx["splits"], ctx["model"]
    sizes = [int(s) for s in args.memory_sizes.split(",")]
    pool = ctx["splits"].train.subset(ctx["splits"].train.y != args.remove_class)
    out = {"batch_size": args.batch_size, "peak_mib": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, mode, cap in MEMORY_VARIANTS:
            out["peak_mib"][variant] = {}
            for size in sizes:
                if size > len(pool):
                    continue
                job = {
                    "state": model.state_dict(),
                    "x": pool.x[:size],
                    "y": pool.y[:size],
                    "batch_size": args.batch_size,
                    "mode": mode,
                    "cache_bytes": cap,
                    "threads": args.threads,
                    "in_channels": splits.in_channels,
                    "image_size": list(splits.image_size),
                    "num_classes": splits.num_classes,
                }
                path = Path(tmp) / "job.pt"
                torch.save(job, path)
                done = subprocess.run(
                    [sys.executable, __file__, "--memory-probe", str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                out["peak_mib"][variant][size] = json.loads(done.stdout.splitlines()[-1])
    return out


# --------------------------------------------------------------------------- 4. damping


@torch.no_grad()
def accuracies(model: nn.Module, split: TensorSplit, forget_class: int) -> tuple[float, float]:
    """Accuracy (%) on the forgotten class and on the others."""
    model.eval()
    predicted = torch.cat([model(x).argmax(1) for x, _ in split.batches(512)])
    forget = split.y == forget_class
    hits = (predicted == split.y).float()
    return float(hits[forget].mean() * 100), float(hits[~forget].mean() * 100)


def f1(forget_acc: float, retain_acc: float) -> float:
    a, b = 100 - forget_acc, retain_acc
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def validation_objective(ctx: dict, args: argparse.Namespace):
    """The step search's objective: forgetting F1 on the validation split."""

    def objective(m: nn.Module) -> tuple[float, dict]:
        forget, retain = accuracies(m, ctx["splits"].val, args.remove_class)
        return f1(forget, retain), {"forget_val": forget, "retain_val": retain}

    return objective


def step_grid(ctx: dict, theta: Tensor):
    """``Δ ↦ `` its step grid: 48 relative steps ``|s·Δ| / |θ_t|`` from 1e-3 to 10."""
    target_norm = float(theta[ctx["target"]].norm())
    return lambda delta: scale_grid(
        delta_norm=float(delta.norm()),
        target_norm=target_norm,
        points=48,
        smallest=1e-3,
        largest=10.0,
    )


def metrics_on_test(
    ctx: dict, args: argparse.Namespace, theta: Tensor, delta: Tensor, scale: float
) -> dict:
    """Forget / retain accuracy and F1 on the test split at ``θ + s·Δ`` (model restored)."""
    model = ctx["model"]
    assign_flat(model, updated(theta, delta, ctx["target"], scale))
    forget, retain = accuracies(model, ctx["splits"].test, args.remove_class)
    assign_flat(model, theta)
    return {"forget_test": forget, "retain_test": retain, "f1_test": f1(forget, retain)}


def evaluate_update(ctx: dict, delta: Tensor, args: argparse.Namespace) -> dict:
    """Best scale on the validation split (``step_grid``), then the test metrics there."""
    model, target = ctx["model"], ctx["target"]
    theta = flatten(p.detach() for p in trainable_parameters(model).values()).clone()
    grid = step_grid(ctx, theta)(delta)
    scale, sweep = search_scale(
        model,
        theta=theta,
        delta=delta,
        target=target,
        grid=grid,
        objective=validation_objective(ctx, args),
    )
    best = next(p for p in sweep if p.scale == scale)
    return {
        "relative_step": best.relative_step,
        "f1_val": best.objective,
        **metrics_on_test(ctx, args, theta, delta, scale),
    }


def top_singular_value(operator, target: Tensor, iterations: int = 15) -> float:
    """σ_max(H[:, t]) by power iteration on ``H[t, :] H[:, t]``."""
    x = torch.randn(int(target.sum()), generator=torch.Generator().manual_seed(0))
    full = torch.zeros(operator.dim)
    for _ in range(iterations):
        full.zero_()
        full[target] = x / x.norm()
        x = operator.matvec(operator.matvec(full))[target]
    return math.sqrt(float(x.norm()))


def bench_damping(ctx: dict, args: argparse.Namespace) -> dict:
    operator = operator_for(ctx, args)
    theta_t = float(
        torch.cat([p.detach().reshape(-1) for p in ctx["model"].parameters()])[ctx["target"]].norm()
    )
    atb_norm = float(operator.matvec(ctx["gradient"])[ctx["target"]].norm())
    out = {"sigma_max": ctx["sigma_max"], "target_norm": theta_t, "runs": []}
    first_order = torch.where(ctx["target"], ctx["gradient"], 0.0)
    out["first_order"] = {
        "delta_norm": float(first_order.norm()),
        **evaluate_update(ctx, first_order, args),
    }
    for max_iter in (int(m) for m in args.max_iters.split(",")):
        for damping in (float(d) for d in args.dampings.split(",")):
            delta, result = gif(
                ctx, operator, solver="lsqr", damping=damping, max_iter=max_iter, tol=1e-6
            )
            out["runs"].append(
                {
                    "damping": damping,
                    "max_iter": max_iter,
                    "iterations": result.iterations,
                    "converged": result.converged,
                    "relative_residual": result.relative_residual,
                    "normal_residual": result.normal_residual,
                    "relative_normal_residual": result.normal_residual / atb_norm,
                    "delta_norm": float(delta.norm()),
                    **evaluate_update(ctx, delta, args),
                }
            )
    return out


# --------------------------------------------------------------------------- 5. damping path


def true_residuals(operator, ctx: dict, delta: Tensor, damping: float) -> tuple[float, float]:
    """GIF's relative residual ``‖H Δ − g‖/‖g‖`` and relative normal residual
    ``‖(H(g − HΔ))_t − λ²Δ_t‖ / ‖(H g)_t‖`` of a full-size ``Δ`` (2 HVPs, 3 with the norm)."""
    g, target = ctx["gradient"], ctx["target"]
    r = g - operator.matvec(delta)
    normal = operator.matvec(r)[target] - damping**2 * delta[target]
    atb = operator.matvec(g)[target]
    return float(r.norm() / g.norm()), float(normal.norm() / atb.norm())


def reorthogonalized_path(ctx: dict, operator: CurvatureOperator, max_iter: int) -> UpdatePath:
    """GIF's regularisation path as ``estimate_path`` runs it (default grid, ``tol`` 0), with
    the Krylov basis kept orthonormal (``lsqr_path(reorthogonalize=True)``)."""
    kind = estimator("gif")
    system = kind.system(operator, ctx["gradient"], ctx["target"], None)
    path = lsqr_path(*system.products, max_iter=max_iter, tol=0.0, reorthogonalize=True)
    return UpdatePath.along("gif", path, system.to_update)


def bench_path(ctx: dict, args: argparse.Namespace, operator: CurvatureOperator) -> dict:
    """One path run against one single-λ lsqr solve at the same iterations, interleaved."""
    common = {
        "method": "gif",
        "operator": operator,
        "gradient": ctx["gradient"],
        "target_flat": ctx["target"],
        "tol": 0.0,
    }
    operator.matvec(ctx["gradient"])  # trace the linearisation first: both runs replay it

    def single():
        return estimate_update(
            solver="lsqr", damping=1e-2, max_iter=args.path_iter, **common
        ).fixed()

    def path():  # every Δ_λ materialised once, as the joint search does
        run = estimate_path(max_iter=args.path_iter, **common)
        norms = [float(run.update(i).norm()) for i in range(len(run))]
        return run, norms

    # Wall time is what the user waits; on shared cores it is noisy, so the process CPU time
    # (one thread: the work itself) is recorded beside it.
    seconds: dict[str, list[float]] = {"lsqr": [], "path": []}
    cpu: dict[str, list[float]] = {"lsqr": [], "path": []}
    outputs = {}
    for repeat in range(args.path_repeats):
        runs = (("lsqr", single), ("path", path))
        for name, fn in runs if repeat % 2 == 0 else runs[::-1]:
            started, cpu_started = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            seconds[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
    (_, single_result), (run, norms) = outputs["lsqr"], outputs["path"]
    median = {name: statistics.median(times) for name, times in seconds.items()}
    fastest = {name: min(times) for name, times in seconds.items()}
    median_cpu = {name: statistics.median(times) for name, times in cpu.items()}
    out = {
        "iterations": args.path_iter,
        "repeats": args.path_repeats,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "median_seconds": median,
        "path_over_lsqr": median["path"] / median["lsqr"],
        "path_over_lsqr_fastest": fastest["path"] / fastest["lsqr"],
        "path_over_lsqr_cpu": median_cpu["path"] / median_cpu["lsqr"],
        "hvps": {"lsqr": single_result.hvps, "path": run.run.hvps},
        "sigma_max_path": run.run.sigma_max,
        "sigma_history": run.run.sigma_history,
        "sigma_max_power_iteration": ctx["sigma_max"],
        "agreement": float32_agreement(ctx, args, common),
        "grid": [],
    }
    reorthogonal = reorthogonalized_path(ctx, operator, args.path_iter)
    for i, damping in enumerate(run.lambdas):
        delta, other = run.update(i), reorthogonal.update(i)
        relative, normal = true_residuals(operator, ctx, delta, damping)
        _, normal_reorthogonal = true_residuals(operator, ctx, other, damping)
        out["grid"].append(
            {
                "relative_damping": run.relative[i],
                "damping": damping,
                "delta_norm": norms[i],
                "relative_residual": relative,
                "relative_normal_residual": normal,
                "relative_normal_residual_reorthogonalized": normal_reorthogonal,
                "cosine_to_reorthogonalized": float(
                    torch.dot(delta, other) / (delta.norm() * other.norm())
                ),
                **evaluate_update(ctx, delta, args),
            }
        )
    out["joint_search"] = [joint_search(ctx, args, run, stride) for stride in (1, 2, 3)]
    return out


def float32_agreement(ctx: dict, args: argparse.Namespace, common: dict) -> list[dict]:
    """Path against lsqr at one λ (float32, no reorthogonalisation), and the orthogonality
    lost by the Krylov vectors, at the benchmark's iterations and twice as many."""
    rows = []
    for iterations in (args.path_iter, 2 * args.path_iter):
        run = estimate_path(max_iter=iterations, grid=[1e-2], relative=False, **common)
        delta, _ = estimate_update(
            solver="lsqr", damping=1e-2, max_iter=iterations, **common
        ).fixed()
        basis = run.run.basis.double()
        eye = torch.eye(len(basis), dtype=torch.float64)
        rows.append(
            {
                "iterations": iterations,
                "relative_difference": float((run.update(0) - delta).norm() / delta.norm()),
                "orthogonality_loss": float((basis @ basis.T - eye).abs().max()),
            }
        )
    return rows


def joint_search(ctx: dict, args: argparse.Namespace, run, stride: int) -> dict:
    """``search_step`` on the validation split; test metrics at its choice."""
    model = ctx["model"]
    theta = flatten(p.detach() for p in trainable_parameters(model).values()).clone()
    started = time.perf_counter()
    choice = search_step(
        model,
        theta=theta,
        path=run,
        target=ctx["target"],
        grid_for=step_grid(ctx, theta),
        objective=validation_objective(ctx, args),
        coarse_stride=stride,
    )
    damping = run.lambdas[choice.index]
    chosen = next(p for p in choice.sweep if p.damping == damping and p.scale == choice.scale)
    return {
        "coarse_stride": stride,
        "evaluations": len(choice.sweep),
        "seconds": time.perf_counter() - started,
        "relative_damping": chosen.relative_damping,
        "damping": damping,
        "relative_step": chosen.relative_step,
        "f1_val": choice.objective,
        **metrics_on_test(ctx, args, theta, run.update(choice.index), choice.scale),
        # the full 2-D sweep (the heat map's data) once, at stride 1
        "sweep": [p.to_dict() for p in choice.sweep] if stride == 1 else None,
    }


# --------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    """The summary of every section in ``results``."""
    renderers = {
        "solvers": _markdown_solvers,
        "throughput": _markdown_throughput,
        "memory": _markdown_memory,
        "damping": _markdown_damping,
        "path": _markdown_path,
    }
    return "\n\n".join(
        render(results[name]) for name, render in renderers.items() if name in results
    )


def _markdown_solvers(s: list) -> str:
    lines = [
        "### 1. HVPs to reach the residual of the paper's Neumann solver",
        "",
        "| Neumann scale | damping | Neumann HVPs (iterations) | its relative normal "
        "residual | LSQR HVPs | CG HVPs | Neumann / LSQR |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in s:
        n = run["neumann"]
        lines.append(
            f"| {run['neumann_scale']} | {run['damping']:g} | {n['hvps']} ({n['iterations']}) | "
            f"{n['relative_normal_residual']:.2e} | {run['lsqr']['hvps_to_reach'] or '—'} | "
            f"{run['cg']['hvps_to_reach'] or '—'} | "
            f"{run['lsqr']['neumann_hvps_per_hvp'] or float('nan'):.1f}× |"
        )
    return "\n".join(lines)


def _markdown_throughput(t: dict) -> str:
    lines = [
        f"### 2. HVP throughput, one batch of {t['batch']}",
        "",
        "| path | ms / product | vs double-backward | LSQR 20 it. incl. setup, s |",
        "|---|---|---|---|",
    ]
    for mode, seconds in t["seconds_per_product"].items():
        solve = t["lsqr_20_iterations_seconds"].get(mode)
        lines.append(
            f"| {mode} | {seconds * 1e3:.2f} | "
            f"{t['speedup_vs_double_backward'][mode]:.2f}× | "
            f"{'' if solve is None else f'{solve:.2f}'} |"
        )
    lines.append(
        f"\nlinearize setup (trace + first product): {t['linearize_setup_seconds']:.2f} s per batch"
    )
    return "\n".join(lines)


def _markdown_memory(m: dict) -> str:
    lines = [
        f"### 3. Peak memory above baseline (MiB), batch size {m['batch_size']}",
        "",
        "| Hessian samples | " + " | ".join(m["peak_mib"]) + " |",
        "|---|" + "---|" * len(m["peak_mib"]),
    ]
    sizes = sorted({size for runs in m["peak_mib"].values() for size in runs}, key=int)
    for size in sizes:
        cells = [
            f"{runs[size]['peak_mib']:.1f} ({runs[size]['cached_batches']} cached)"
            if size in runs
            else ""
            for runs in m["peak_mib"].values()
        ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown_damping(d: dict) -> str:
    lines = [
        "### 4. Damping and max_iter (LSQR, GIF)",
        "",
        f"σ_max(H[:, t]) ≈ {d['sigma_max']:.3g}; ‖θ_t‖ = {d['target_norm']:.3g}",
        "",
        "| damping | max_iter | iterations | converged | rel. residual | rel. normal res. | "
        "‖Δ‖ | best rel. step | F1 val | forget test % | retain test % | F1 test |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["runs"]:
        lines.append(
            f"| {r['damping']:g} | {r['max_iter']} | {r['iterations']} | {r['converged']} | "
            f"{r['relative_residual']:.3f} | {r['relative_normal_residual']:.1e} | "
            f"{r['delta_norm']:.3g} | {r['relative_step']:.3g} | "
            f"{r['f1_val']:.1f} | {r['forget_test']:.1f} | {r['retain_test']:.1f} | "
            f"{r['f1_test']:.1f} |"
        )
    fo = d["first_order"]
    lines.append(
        f"| first-order | — | — | — | — | — | {fo['delta_norm']:.3g} | "
        f"{fo['relative_step']:.3g} | {fo['f1_val']:.1f} | {fo['forget_test']:.1f} | "
        f"{fo['retain_test']:.1f} | {fo['f1_test']:.1f} |"
    )
    return "\n".join(lines)


def _markdown_path(p: dict) -> str:
    median, hvps = p["median_seconds"], p["hvps"]
    sigma = p["sigma_history"]
    steps = sorted({k for k in (1, 5, 10, len(sigma)) if 1 <= k <= len(sigma)})
    lines = [
        f"### 5. Damping path ({p['iterations']} LSQR iterations, GIF)",
        "",
        f"| run | median wall s ({p['repeats']} runs, interleaved) | fastest wall s | "
        "median CPU s | HVPs |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("lsqr", "lsqr, one λ = 1e-2"), ("path", "path, 8 λ, every Δ_λ built")):
        lines.append(
            f"| {label} | {median[name]:.2f} | {min(p['seconds'][name]):.2f} | "
            f"{statistics.median(p['cpu_seconds'][name]):.2f} | {hvps[name]} |"
        )
    lines += [
        "",
        f"path / lsqr: wall time {p['path_over_lsqr']:.3f} (median), "
        f"{p['path_over_lsqr_fastest']:.3f} (fastest); CPU time {p['path_over_lsqr_cpu']:.3f}",
        "",
        f"σ_max(B_k) at k = {', '.join(map(str, steps))}: "
        + ", ".join(f"{sigma[k - 1]:.4g}" for k in steps)
        + f"; power iteration (15 steps): {p['sigma_max_power_iteration']:.4g}",
        "",
        "| iterations | path vs lsqr at λ = 1e-2 (float32, relative) | max abs(VᵀV − I) |",
        "|---|---|---|",
    ]
    for row in p["agreement"]:
        lines.append(
            f"| {row['iterations']} | {row['relative_difference']:.1e} | "
            f"{row['orthogonality_loss']:.2f} |"
        )
    lines += [
        "",
        "| λ / σ_max | λ | ‖Δ‖ | rel. residual | rel. normal res. | same, reorthogonalised "
        "| cos to reorth. | best rel. step | F1 val | forget test % | retain test % | F1 test |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["grid"]:
        lines.append(
            f"| {r['relative_damping']:.2g} | {r['damping']:.3g} | {r['delta_norm']:.3g} | "
            f"{r['relative_residual']:.3f} | {r['relative_normal_residual']:.1e} | "
            f"{r['relative_normal_residual_reorthogonalized']:.1e} | "
            f"{r['cosine_to_reorthogonalized']:.4f} | {r['relative_step']:.3g} | "
            f"{r['f1_val']:.1f} | {r['forget_test']:.1f} | {r['retain_test']:.1f} | "
            f"{r['f1_test']:.1f} |"
        )
    lines += [
        "",
        "| joint search, coarse stride | evaluations | s | λ / σ_max | rel. step | F1 val | "
        "forget test % | retain test % | F1 test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for j in p["joint_search"]:
        lines.append(
            f"| {j['coarse_stride']} | {j['evaluations']} | {j['seconds']:.1f} | "
            f"{j['relative_damping']:.2g} | {j['relative_step']:.3g} | {j['f1_val']:.1f} | "
            f"{j['forget_test']:.1f} | {j['retain_test']:.1f} | {j['f1_test']:.1f} |"
        )
    return "\n".join(lines)


def _portable(value: object) -> str:
    """An argument as text, a path inside the repository relative to its root."""
    root = Path(__file__).resolve().parents[1]
    if isinstance(value, Path) and value.resolve().is_relative_to(root):
        return str(value.resolve().relative_to(root))
    return str(value)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    chosen = args.sections.split(",")
    if not set(chosen) <= set(SECTIONS):
        raise SystemExit(f"--sections: choose from {', '.join(SECTIONS)}, got {args.sections}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ctx = setup(args)
    print(
        f"trained TinyNet in {ctx['train_seconds']:.1f} s; |t| = {int(ctx['target'].sum())} "
        f"of {len(ctx['target'])}",
        file=sys.stderr,
    )
    run = {
        "command": " ".join(["benchmarks/solvers.py", *(argv or sys.argv[1:])]),
        "args": {k: _portable(v) for k, v in vars(args).items()},
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "processor": platform.processor(),
        },
        "setup": {
            "train_seconds": ctx["train_seconds"],
            "params": len(ctx["target"]),
            "targets": int(ctx["target"].sum()),
            "removal": len(ctx["removal"]),
            "hessian_samples": len(ctx["sample"]),
            "test_acc": accuracies(ctx["model"], ctx["splits"].test, -1)[1],
        },
    }
    # A subset of the sections updates them in the existing results; each records its run.
    partial = set(chosen) != set(SECTIONS) and args.output.exists()
    results = json.loads(args.output.read_text()) if partial else dict(run)
    operator = operator_for(ctx, args)
    ctx["sigma_max"] = top_singular_value(operator, ctx["target"])
    tuned = 0.75 * ctx["sigma_max"]  # c² = 0.56 σ_max² > σ_max² / 2: no restart needed
    solver_runs = ((None, 0.0), (tuned, 0.0), (tuned, 1e-2))  # (Neumann scale, damping)
    sections = (
        ("solvers", lambda: [bench_solvers(ctx, args, d, c, operator) for c, d in solver_runs]),
        ("throughput", lambda: bench_throughput(ctx, args)),
        ("memory", lambda: bench_memory(ctx, args)),
        ("damping", lambda: bench_damping(ctx, args)),
        ("path", lambda: bench_path(ctx, args, operator)),
    )
    for name, bench in sections:
        if name not in chosen:
            continue
        section_started = time.perf_counter()
        results[name] = bench()
        results.setdefault("section_runs", {})[name] = {
            **run,
            "seconds": time.perf_counter() - section_started,
        }
        print(f"{name}: {time.perf_counter() - section_started:.1f} s", file=sys.stderr)
    if not partial:
        results["total_seconds"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown({name: results[name] for name in chosen}))


if __name__ == "__main__":
    main()
