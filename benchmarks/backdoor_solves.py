"""Which solve the shipped backdoor config pins (results: BENCHMARKS.md, "The shipped backdoor
solve").

``gif recover-backdoor configs/digits-backdoor.yaml`` on the base model of each seed with
each candidate solve (Hessian samples × iterations, curvature; the config's Tikhonov damping
and searched step), in a fresh ``gif`` process, one thread. Recorded per run: the README's
gates (ASR on test at most 5%, clean test accuracy down by at most 2 points), the budget's
prediction against one retraining and the counted ratio.

    .venv/bin/python benchmarks/backdoor_solves.py      # about 8 minutes on 2 cores

Writes benchmarks/results/backdoor_solves.json and prints the markdown section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import csv, machine  # noqa: E402
from cost_gate import gif, run, shown_arguments  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/digits-backdoor.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "backdoor_solves.json"
CANDIDATES = (
    "1024x20:hessian",
    "1024x10:hessian",
    "512x20:hessian",
    "1024x20:ggn",
    "1536x5:ggn",
    "1024x8:ggn",
    "768x10:ggn",
    "auto:ggn",
)
"""``SAMPLESxITERATIONS:CURVATURE``; ``auto``: the budget's solve."""
MAX_ASR, MAX_CLEAN_DROP = 5.0, 2.0


def overrides(candidate: str) -> list[str]:
    solve, curvature = candidate.split(":")
    sized = ["auto", "auto"] if solve == "auto" else solve.split("x")
    return [
        f"influence.hessian_samples={sized[0]}",
        f"influence.max_iter={sized[1]}",
        f"influence.curvature={curvature}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=csv(int), default=[0, 1, 2, 3, 4])
    parser.add_argument("--candidates", type=csv(), default=list(CANDIDATES))
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints/outputs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gif-backdoor-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(work / "cache")}
    env["OMP_NUM_THREADS"] = "1"
    runs = []
    for seed in args.seeds:
        base = work / f"base-{seed}.safetensors"
        if not base.exists():
            run([*gif(), "train", CONFIG, f"seed={seed}", "-o", str(base), "--quiet"], env)
        for candidate in args.candidates:
            out = work / f"{candidate.replace(':', '-')}-{seed}"
            command = [*gif(), "recover-backdoor", CONFIG, f"seed={seed}"]
            command += [*overrides(candidate), f"checkpoint={base}", "-o", str(out)]
            report = json.loads(run([*command, "--force", "--json"], env).stdout)
            before, after = report["metrics"]["before"], report["metrics"]["after"]
            budget = report["cost"]["budget"]
            runs.append(
                {
                    "seed": seed,
                    "candidate": candidate,
                    "rung": [budget["hessian_samples"], budget["max_iter"]],
                    "asr_test": after["asr_test"],
                    "clean_drop": before["clean_acc_test"] - after["clean_acc_test"],
                    "predicted_ratio": budget["predicted_ratio"],
                    "retrain_ratio": report["cost"]["retrain_ratio"],
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr)
    results = {
        "command": "python benchmarks/backdoor_solves.py " + " ".join(shown_arguments(argv)),
        "machine": machine(1),
        "gates": {"max_asr": MAX_ASR, "max_clean_drop": MAX_CLEAN_DROP},
        "runs": runs,
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def passes(row: dict) -> bool:
    return row["asr_test"] <= MAX_ASR and row["clean_drop"] <= MAX_CLEAN_DROP


def render(results: dict) -> str:
    seeds = sorted({r["seed"] for r in results["runs"]})
    lines = [
        f"`{results['command']}`, one thread, {results['machine']['cpus']} CPU cores; per seed "
        "ASR on test % / clean test accuracy lost (points), ✓ where both README gates hold "
        f"(ASR ≤ {MAX_ASR:g}, drop ≤ {MAX_CLEAN_DROP:g}):",
        "",
        "| solve | " + " | ".join(f"seed {s}" for s in seeds) + " | gates held | predicted × "
        "retraining | counted × retraining |",
        "|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for candidate in dict.fromkeys(r["candidate"] for r in results["runs"]):
        rows = [r for r in results["runs"] if r["candidate"] == candidate]
        samples, iterations = rows[0]["rung"]
        name = candidate.replace("auto", f"budget ({samples}x{iterations})")
        cells = [
            f"{r['asr_test']:.1f} / {r['clean_drop']:.2f}{' ✓' if passes(r) else ''}" for r in rows
        ]
        held = sum(passes(r) for r in rows)
        predicted = statistics.fmean(r["predicted_ratio"] for r in rows)
        counted = statistics.fmean(r["retrain_ratio"] for r in rows)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {held} of {len(rows)} | {predicted:.2f} "
            f"| {counted:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
