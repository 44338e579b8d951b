"""The influence step against the searched step, per task, judged by closeness to retraining.

For each task's digits config (remove-class: configs/digits.yaml; recover-backdoor:
configs/digits-backdoor.yaml; remove-samples: configs/digits-samples.yaml) and each seed, one
base model and its retrain oracle are trained (``gif train``), then GIF edits the base model
as:

- ``paper``: the paper's estimator as the tool had it (no weight decay in the curvature, the
  removal set's gradient, Tikhonov damping 0.01 on the squared system), step searched;
- ``trained-1``: the trained objective's curvature ``H + wd·I``, the retained gradient, no
  damping, the influence step (scale 1);
- ``trained-auto``: the same estimator, step searched on the validation split;
- ``first-order``: ``Δ = g`` on the targets (the retained gradient), step searched.

Each edit is judged on the test split and on the removal set by the mean KL(oracle ‖ edit) of
the predicted distributions and top-1 agreement with the oracle, beside the task's validation
F1 or match and its wall time against the report's estimate of one retraining.

    .venv/bin/python benchmarks/influence_step.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import Log, command_line, csv, machine, train, work_folder
from gifcli.config import load_config
from gifcli.context import prepare
from gifcli.runs import run_edit
from gifcli.tasks import task_from_config

ROOT = Path(__file__).resolve().parent.parent
TASKS = {
    "remove-class": ROOT / "configs" / "digits.yaml",
    "recover-backdoor": ROOT / "configs" / "digits-backdoor.yaml",
    "remove-samples": ROOT / "configs" / "digits-samples.yaml",
}
TRAINED = ["influence.gradient=removal", "influence.damping=0"]
"""The trained objective's estimator: ``H + wd·I``, the removal gradient, no damping."""
CLOSER = [*TRAINED, "influence.hessian_samples=1024", "influence.max_iter=50"]
VARIANTS = {
    "paper": [
        "influence.weight_decay=0",
        "influence.gradient=removal",
        "influence.damping_form=tikhonov",
        "influence.damping=0.01",
        "update.scale=auto",
    ],
    "trained-1": [*TRAINED, "update.scale=1.0"],
    "trained-auto": [*TRAINED, "update.scale=auto"],
    "first-order": ["influence.method=first-order", "update.scale=auto"],
    "first-order-1": ["influence.method=first-order", "update.scale=1.0"],
    # a closer solve: more Hessian samples and iterations, or every parameter a target
    "trained-1-long": [*CLOSER, "update.scale=1.0"],
    "trained-1-all": [*CLOSER, "selection.ratio=1.0", "update.scale=1.0"],
    # what each change does on its own
    "retained-1": ["influence.gradient=retained", "influence.damping=0", "update.scale=1.0"],
    "retained-auto": ["influence.gradient=retained", "influence.damping=0", "update.scale=auto"],
    "tikhonov-auto": [
        "influence.damping_form=tikhonov",
        "influence.damping=0.01",
        "update.scale=auto",
    ],
    "shift-0.01-1": ["influence.damping=0.01", "update.scale=1.0"],
    "shift-0.01-auto": ["influence.damping=0.01", "update.scale=auto"],
    "ggn-1": ["influence.curvature=ggn", "influence.damping=0", "update.scale=1.0"],
    "ggn-auto": ["influence.curvature=ggn", "influence.damping=0", "update.scale=auto"],
}


@torch.no_grad()
def fidelity(edited: torch.nn.Module, oracle: torch.nn.Module, x, batch_size: int = 512) -> dict:
    """Mean KL(oracle ‖ edited) of the predicted distributions and top-1 agreement (%)."""
    kl, agree, count = 0.0, 0, 0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        log_p, log_q = F.log_softmax(oracle(xb), 1), F.log_softmax(edited(xb), 1)
        kl += float((log_p.exp() * (log_p - log_q)).sum())
        agree += int((log_p.argmax(1) == log_q.argmax(1)).sum())
        count += len(xb)
    return {"kl": kl / count, "agreement": 100 * agree / count}


def one_seed(task: str, seed: int, folder: Path, variants: list[str], log: Log) -> dict:
    config = load_config(TASKS[task], [f"seed={seed}", f"checkpoint={folder / 'base.safetensors'}"])
    base = train(config, folder / "base.safetensors", retrain=False)
    train(config, folder / "oracle.safetensors", retrain=True)
    ctx = prepare(config)
    oracle = ctx.load_model(folder / "oracle.safetensors")
    model = ctx.load_model()
    removal = task_from_config(config, ctx.data).removal_set(
        ctx.data, device=ctx.device, model=model
    )
    removal_x = removal.x[torch.arange(len(removal.x))]
    test_x = ctx.data.test.x
    out = {
        "base": {
            "test": fidelity(model, oracle, test_x),
            "removal": fidelity(model, oracle, removal_x),
        }
    }
    out["base"]["acc_test"] = base["acc_test"]
    for name in variants:
        edit_config = load_config(
            TASKS[task],
            [
                f"seed={seed}",
                f"checkpoint={folder / 'base.safetensors'}",
                f"output.dir={folder / name}",
                *VARIANTS[name],
            ],
        )
        report = run_edit(config=edit_config, command=task, force=True)
        edited = ctx.load_model(folder / name / "model.safetensors")
        after = report["metrics"]["after"]
        out[name] = {
            "test": fidelity(edited, oracle, test_x),
            "removal": fidelity(edited, oracle, removal_x),
            "scale": report["update"]["scale"],
            "relative_norm": report["update"]["relative_norm"],
            "metrics": {k: v for k, v in after.items() if isinstance(v, int | float)},
            "edit_seconds": report["cost"]["seconds"]["edit"],
            "retrain_ratio": report["cost"]["retrain_ratio"],
            "seconds": report["cost"]["seconds"],
        }
        log(
            f"{task} seed {seed} {name}: KL test {out[name]['test']['kl']:.4f} "
            f"(base {out['base']['test']['kl']:.4f}), KL removal "
            f"{out[name]['removal']['kl']:.4f} (base {out['base']['removal']['kl']:.4f}), "
            f"scale {report['update']['scale']:.3g}, {report['cost']['retrain_ratio']:.2f}x"
        )
    return out


def render(results: dict) -> str:
    lines = []
    for task, seeds in results["runs"].items():
        lines += [
            f"**{task}** (seeds {', '.join(map(str, seeds))}; mean ± sd)",
            "",
            "| edit | seeds | KL test | agree test % | KL removal | agree removal % | scale "
            "| edit / retrain |",
            "|---|---|---|---|---|---|---|---|",
        ]
        names = list(dict.fromkeys(n for seed in seeds.values() for n in seed if n != "base"))
        for name in ["base", *names]:
            rows = [seed[name] for seed in seeds.values() if name in seed]

            def cell(values, digits=4):
                values = [v for v in values if v is not None]
                if not values:
                    return "–"
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"

            lines.append(
                f"| {name} | {len(rows)} | {cell([r['test']['kl'] for r in rows])} "
                f"| {cell([r['test']['agreement'] for r in rows], 1)} "
                f"| {cell([r['removal']['kl'] for r in rows])} "
                f"| {cell([r['removal']['agreement'] for r in rows], 1)} "
                f"| {cell([r.get('scale') for r in rows], 3)} "
                f"| {cell([r.get('retrain_ratio') for r in rows], 2)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=csv(), default=list(TASKS))
    parser.add_argument("--seeds", type=csv(int), default=[0, 1, 2])
    parser.add_argument("--variants", type=csv(), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "influence_step.json"
    )
    parser.add_argument("--render", action="store_true", help="only print the tables of --output")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.output.read_text())))
        return
    torch.set_num_threads(args.threads)
    log = Log()
    results = {
        "command": command_line("influence_step.py", argv),
        "machine": machine(args.threads),
        "runs": {},
    }
    with work_folder(args.work_dir) as work:
        for task in args.tasks:
            results["runs"][task] = {}
            for seed in args.seeds:
                folder = work / task / f"seed{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                results["runs"][task][seed] = one_seed(task, seed, folder, args.variants, log)
                args.output.write_text(json.dumps(results, indent=1))
    results["load"] = {"mean": statistics.mean(log.load), "max": max(log.load)}
    args.output.write_text(json.dumps(results, indent=1))
    print(render(results))


if __name__ == "__main__":
    sys.exit(main())
