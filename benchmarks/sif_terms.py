"""The two terms of ``sif`` on the task benchmarks' models (results: BENCHMARKS.md, "Remove a
class" and "Recover from a backdoor").

``sif``'s update is ``Δ = ((1 − 2p)/(1 − p)) Δ₁ + (p/(1 − p)) H_S⁻¹ H_D Δ₁``: a first-order
term and a second-order correction. Basu et al.'s expansion holds while the correction is small
next to the first term. For each task scenario (``configs/digits.yaml``,
``configs/digits-backdoor.yaml``) and seed, on the base model the task benchmark trains, this
measures with the config's solver: ``‖H_D Δ₁‖ / ‖g‖``, the length of the correction over the
first term, and the cosines of the first term, the correction and ``Δ`` with IF's update. The
terms come from the estimators themselves: ``Δ₁`` is IF's solve with ``H_S`` for ``H``, and
the correction is ``sif``'s ``Δ`` minus the first term.

    .venv/bin/python benchmarks/sif_terms.py                     # about 5 minutes on 2 shared cores
    .venv/bin/python benchmarks/sif_terms.py --seeds 0 --tasks recover-backdoor
    .venv/bin/python benchmarks/sif_terms.py --render

Writes benchmarks/results/sif_terms.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, ROOT, Log, csv, machine, table, train, work_folder

from gifcli.config import load_config
from gifcli.context import prepare
from gifcli.influence import CurvatureOperator, estimate_update, removal_gradient
from gifcli.influence.operators import Combination, removal_curvature
from gifcli.pipeline import hessian_sample
from gifcli.tasks import RecoverBackdoor, RemoveClass

SCENARIOS = {
    RemoveClass.name: "configs/digits.yaml",
    RecoverBackdoor.name: "configs/digits-backdoor.yaml",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--tasks", type=csv(), default=list(SCENARIOS), help="remove-class, recover-backdoor")
    add("--seeds", type=csv(int), default=[0, 1, 2], help="config seeds (default 0,1,2)")
    add("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    add("--work-dir", type=Path, help="keep (and reuse) the trained base models here")
    add("--output", type=Path, default=RESULTS / "sif_terms.json", help="results JSON")
    add("--render", action="store_true", help="only render the markdown of --output")
    return parser.parse_args(argv)


def terms(task: str, seed: int, folder: Path) -> dict:
    """The measures of the module docstring on one seed's base model."""
    checkpoint = folder / "base.safetensors"
    config = load_config(ROOT / SCENARIOS[task], [f"seed={seed}", f"checkpoint={checkpoint}"])
    train(config, checkpoint, retrain=False)
    ctx = prepare(config)
    model = ctx.load_model()
    removal = ctx.task().removal_set(ctx.data, device=ctx.device, model=model)
    influence = config.influence
    sample = hessian_sample(removal.retained, size=influence.hessian_samples, seed=seed)

    def curvature_of(x: torch.Tensor, y: torch.Tensor) -> CurvatureOperator:
        return CurvatureOperator(model=model, x=x, y=y, batch_size=influence.batch_size)

    hessian = curvature_of(sample.x, sample.y)
    h_u = removal_curvature(curvature_of, removal.x, removal.y, true_labels=removal.true_y)
    gradient = removal_gradient(
        model,
        removal_x=removal.x,
        removal_y=removal.y,
        n_train=removal.n_train,
        batch_size=influence.batch_size,
        true_labels=removal.true_y,
    )
    p = len(removal.x) / removal.n_train
    everything = torch.ones(hessian.dim, dtype=torch.bool)

    def update(method: str, operator) -> torch.Tensor:
        delta, _ = estimate_update(
            method=method,
            operator=operator,
            gradient=gradient,
            target_flat=everything,
            solver=influence.solver,
            damping=influence.damping,
            max_iter=influence.max_iter,
            tol=influence.tol,
            removal_operator=h_u,
            removal_fraction=p,
        ).fixed()
        return delta

    first_order = update("if", Combination([(1 - p, hessian), (p, h_u)]))
    first = (1 - 2 * p) / (1 - p) * first_order
    sif, plain = update("sif", hessian), update("if", hessian)
    second = sif - first

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a, b, dim=0))

    return {
        "task": task,
        "seed": seed,
        "p": p,
        "change_over_gradient": float(h_u.matvec(first_order).norm() / gradient.norm()),
        "second_over_first": float(second.norm() / first.norm()),
        "cos_first_if": cosine(first, plain),
        "cos_second_if": cosine(second, plain),
        "cos_sif_if": cosine(sif, plain),
    }


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    log = Log()
    torch.set_num_threads(args.threads)
    rows = []
    with work_folder(args.work_dir) as work:
        for task in args.tasks:
            for seed in args.seeds:
                folder = work / task / f"seed-{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                rows.append(terms(task, seed, folder))
                log(f"{task} seed {seed}: {rows[-1]}")
    arguments = list(sys.argv[1:] if argv is None else argv)
    results = {
        "command": " ".join([".venv/bin/python", "benchmarks/sif_terms.py", *arguments]),
        "machine": machine(args.threads),
        "wall_seconds": log.elapsed(),
        "rows": rows,
    }
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    return results


def markdown(results: dict) -> str:
    header = [
        "task",
        "seed",
        "p",
        "‖H_D Δ₁‖ / ‖g‖",
        "‖correction‖ / ‖first term‖",
        "cos(first term, IF)",
        "cos(correction, IF)",
        "cos(sif, IF)",
    ]
    rows = [
        [
            r["task"],
            str(r["seed"]),
            f"{r['p']:.3f}",
            f"{r['change_over_gradient']:.3g}",
            f"{r['second_over_first']:.3g}",
            f"{r['cos_first_if']:.2f}",
            f"{r['cos_second_if']:.2f}",
            f"{r['cos_sif_if']:.2f}",
        ]
        for r in results["rows"]
    ]
    minutes, seconds = divmod(round(results["wall_seconds"]), 60)
    return "\n".join(
        [
            "```",
            results["command"],
            "```",
            "",
            *table(header, rows),
            "",
            f"Raw numbers: `benchmarks/results/sif_terms.json` ({minutes} min {seconds:02d} s).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = json.loads(args.output.read_text()) if args.render else measure(args, argv)
    print(markdown(results))


if __name__ == "__main__":
    main(sys.argv[1:])
