"""The budget's prediction against the edit's count (results: BENCHMARKS.md, "The budget's
prediction").

For each shipped walk-through config and each estimator, one edit with the budgeted solve
(``influence.hessian_samples=auto influence.max_iter=auto``) in a fresh ``gif`` process, one
thread. Recorded per edit: the rung the budget chose, its predicted ratio to one retraining
(``cost.budget.predicted_ratio``, fixed conversion factors), the counted one
(``cost.retrain_ratio``, this machine's cached rates), the curvature products the solve made
and the seconds ratio. The base models are trained once in the work folder.

    .venv/bin/python benchmarks/budget_prediction.py      # about 3 minutes on 2 cores

Writes benchmarks/results/budget_prediction.json and prints the markdown section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from cost_gate import gif, run, shown_arguments  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "budget_prediction.json"
TASKS = {  # command, config, extra arguments of the walk-through
    "remove-class": ("remove-class", "configs/digits.yaml", []),
    "remove-samples": (
        "remove-samples",
        "configs/digits-samples.yaml",
        ["--indices", "configs/digits-deletion-request.txt"],
    ),
    "recover-backdoor": ("recover-backdoor", "configs/digits-backdoor.yaml", []),
}
METHODS = ("gif", "fif", "pif", "if", "sif")
BUDGETED = ["influence.hessian_samples=auto", "influence.max_iter=auto"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints/outputs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gif-budget-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XDG_CACHE_HOME": str(work / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    rows = []
    for task in args.tasks.split(","):
        command, config, extra = TASKS[task]
        base = work / f"{task}.safetensors"
        if not base.exists():
            run([*gif(), "train", config, "-o", str(base), "--quiet"], env)
        for method in args.methods.split(","):
            out = work / f"{task}-{method}"
            done = run(
                [
                    *gif(),
                    command,
                    config,
                    *extra,
                    *BUDGETED,
                    f"influence.method={method}",
                    f"checkpoint={base}",
                    "-o",
                    str(out),
                    "--force",
                    "--json",
                ],
                env,
            )
            report = json.loads(done.stdout)
            cost, budget = report["cost"], report["cost"]["budget"]
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "rung": [budget["hessian_samples"], budget["max_iter"]],
                    "predicted_ratio": budget["predicted_ratio"],
                    "retrain_ratio": cost["retrain_ratio"],
                    "seconds_ratio": cost["seconds_ratio"],
                    "hvps": report["solver"]["hvps"],
                    "iterations": report["solver"]["iterations"],
                    "hvp_passes": cost["hvp_passes"],
                    "step_passes": cost["retrain"]["step_passes"],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    results = {
        "command": "python benchmarks/budget_prediction.py " + " ".join(shown_arguments(argv)),
        "machine": machine(1),
        "rows": rows,
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def render(results: dict) -> str:
    lines = [
        f"`{results['command']}`, one thread, {results['machine']['cpus']} CPU cores:",
        "",
        "| task | method | rung (samples × iterations) | products | predicted × retraining "
        "| counted × retraining | seconds × retraining | measured HVP / step passes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        samples, iterations = row["rung"]
        lines.append(
            f"| {row['task']} | {row['method']} | {samples} × {iterations} | {row['hvps']} "
            f"| {row['predicted_ratio']:.3f} | {row['retrain_ratio']:.3f} "
            f"| {row['seconds_ratio']:.2f} | {row['hvp_passes']:.2f} / {row['step_passes']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
