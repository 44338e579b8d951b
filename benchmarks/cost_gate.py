"""Cost gates under changing load (results: BENCHMARKS.md, "Cost gates").

One edit, rerun ``--runs`` times in fresh ``gif`` processes with the same ``--check`` on
``cost.retrain_ratio``, while busy processes load the machine's cores; the number of busy
processes changes from run to run (``--load``). Each busy process runs single-threaded float32
matrix products without pause. The first run finds an empty rates cache (a fresh
``XDG_CACHE_HOME``) and times the rates under its load; the others read them. Recorded per run:
the load, the gate's exit code, ``cost.retrain_ratio`` (counted passes: the gated figure),
``cost.seconds_ratio`` (seconds: information), the edit's and the probe's seconds.

    .venv/bin/python benchmarks/cost_gate.py            # about 3 minutes on 2 cores

Writes benchmarks/results/cost_gate.json and prints the markdown section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cost_gate.json"
BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """``command`` in the repository root; exits with its stderr unless it ran (0) or only a
    check failed (3)."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode not in (0, 3):
        sys.exit(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def gif() -> list[str]:
    script = Path(sys.executable).with_name("gif")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gifcli"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--check", default="cost.retrain_ratio<=0.25")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load", default="2,0,2,1,2", help="busy processes of each run")
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints/outputs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides of the edit")
    args = parser.parse_args(argv)
    loads = [int(n) for n in args.load.split(",")]
    loads = (loads * args.runs)[: args.runs]
    work = args.work or Path(tempfile.mkdtemp(prefix="gif-cost-gate-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XDG_CACHE_HOME": str(work / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    base = work / "base.safetensors"
    if not base.exists():
        subprocess.run(
            [*gif(), "train", args.config, "-o", str(base), "--quiet"], env=env, check=True
        )
    runs = []
    for index, load in enumerate(loads):
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            time.sleep(1.0 if load else 0.0)
            command = [
                *gif(),
                "remove-class",
                args.config,
                *args.overrides,
                f"checkpoint={base}",
                "-o",
                str(work / "edit"),
                "--force",
                "--json",
                "--check",
                args.check,
            ]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
        finally:
            for process in busy:
                process.kill()
                process.wait()
        if done.returncode not in (0, 3):
            sys.exit(f"run {index}: exit {done.returncode}: {done.stderr.strip()}")
        cost = json.loads(done.stdout)["cost"]
        runs.append(
            {
                "busy_processes": load,
                "exit_code": done.returncode,
                "retrain_ratio": cost["retrain_ratio"],
                "seconds_ratio": cost["seconds_ratio"],
                "edit_seconds": cost["seconds"]["edit"],
                "probe_seconds": cost["seconds"]["probe"],
                "rates_cached": cost["rates_cached"],
            }
        )
        print(json.dumps(runs[-1]), file=sys.stderr)
    results = {
        "command": "python benchmarks/cost_gate.py " + " ".join(shown_arguments(argv)),
        "config": args.config,
        "overrides": args.overrides,
        "check": args.check,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": runs,
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def shown_arguments(argv: list[str] | None) -> list[str]:
    """The command line without ``--work FOLDER`` (a path of this machine)."""
    given = list(argv if argv is not None else sys.argv[1:])
    if "--work" in given:
        at = given.index("--work")
        del given[at : at + 2]
    return [a for a in given if not a.startswith("--work=")]


def render(results: dict) -> str:
    rows = [
        "| run | busy processes | exit code | `cost.retrain_ratio` | `cost.seconds_ratio` | "
        "edit s | probe s (share of the edit) | rates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(results["runs"], start=1):
        share = run["probe_seconds"] / run["edit_seconds"]
        rows.append(
            f"| {i} | {run['busy_processes']} | {run['exit_code']} | "
            f"{run['retrain_ratio']:.4f} | {run['seconds_ratio']:.2f} | "
            f"{run['edit_seconds']:.1f} | {run['probe_seconds']:.3f} ({100 * share:.1f}%) | "
            f"{'cached' if run['rates_cached'] else 'measured'} |"
        )
    verdicts = {run["exit_code"] for run in results["runs"]}
    ratios = {round(run["retrain_ratio"], 12) for run in results["runs"]}
    return "\n".join(
        [
            f"`{results['command'].strip()}` on {results['machine']['cpus']} CPU cores; "
            f"`--check '{results['check']}'` on `{results['config']}` "
            f"{' '.join(results['overrides'])}: "
            f"{len(verdicts)} verdict(s), {len(ratios)} distinct `cost.retrain_ratio`.",
            "",
            *rows,
        ]
    )


if __name__ == "__main__":
    main()
