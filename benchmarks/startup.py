"""Start-up benchmark of the ``gif`` command (results: BENCHMARKS.md, "Start-up").

Times, side by side in one run, fresh processes of:

1. the interpreter alone (``python -c pass``) and ``python -c "import torch"``: the floor, and
   what torch alone costs;
2. ``gif --version``, ``gif --help``, ``gif remove-class --help`` and ``gif configs``: commands
   that need neither torch nor the engine;
3. the time to first work of an edit: ``gif remove-class configs/digits.yaml`` with a ``--check``
   on a report path that does not exist. The command imports what an edit imports (torch and the
   engine), reads and validates the config, checks that it describes the command's task, and
   rejects the check (exit 2) at the point where a real run would start loading the data. So it
   times everything before the first piece of work; what a real edit adds later (scikit-learn
   with the data, matplotlib with ``sweep.png``) is work, not start-up.

Each command runs ``--runs`` times (after one untimed warm-up round), the commands taking turns
so that a change in load hits all of them alike; the table gives the median, the fastest and
the slowest run. One extra run per command with ``-X importtime`` records whether it imported
torch. ``gif`` is the console script beside the interpreter, run on this checkout's code
(``PYTHONPATH``); without that script, ``python -m gifcli``.

    .venv/bin/python benchmarks/startup.py             # about 1 minute on 2 cores

Writes benchmarks/results/startup.json and prints the markdown section.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "startup.json"
HEAVY = ("torch", "sklearn", "matplotlib", "torchvision")
UNKNOWN_CHECK = "no_such_path<=0"  # a report path no report has: exit 2 before any work


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--runs", type=int, default=15, help="timed runs per command (default 15)")
    add("--output", type=Path, default=RESULTS, help="results JSON")
    add("--markdown", type=Path, help="write the markdown section here (default: stdout)")
    add("--render", action="store_true", help="only render the markdown of --output")
    return parser.parse_args(argv)


def gif_command() -> tuple[list[str], str]:
    """The argv prefix that runs ``gif``, and how the results name it."""
    script = Path(sys.executable).parent / "gif"
    if script.exists():
        return [str(script)], "gif"
    return [sys.executable, "-m", "gifcli"], "python -m gifcli"


FIRST_WORK = f"gif remove-class configs/digits.yaml --check '{UNKNOWN_CHECK}'"


def commands() -> dict[str, dict]:
    """The command as the results show it -> its argv, what it shows, the exit code it must
    end with."""
    python, (gif, _) = [sys.executable], gif_command()
    return {
        "python -c pass": {"argv": [*python, "-c", "pass"], "what": "the interpreter alone"},
        "python -c 'import torch'": {
            "argv": [*python, "-c", "import torch"],
            "what": "torch alone",
        },
        "gif --version": {"argv": [*gif, "--version"], "what": "the version"},
        "gif --help": {"argv": [*gif, "--help"], "what": "the command list"},
        "gif remove-class --help": {
            "argv": [*gif, "remove-class", "--help"],
            "what": "one command's options",
        },
        "gif configs": {"argv": [*gif, "configs"], "what": "the shipped configs"},
        FIRST_WORK: {
            "argv": [*gif, "remove-class", "configs/digits.yaml", "--check", UNKNOWN_CHECK],
            "what": "time to first work of an edit: imports, config validated, check rejected",
            "exit_code": 2,
        },
    }


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIF_", "PYTHON"))}
    env.update(PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="100", OMP_NUM_THREADS="1")
    return env


def run_once(command: dict, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command["argv"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != command.get("exit_code", 0):
        raise SystemExit(
            f"{' '.join(command['argv'])}: exit {done.returncode}, expected "
            f"{command.get('exit_code', 0)}\n{done.stderr[-2000:]}"
        )
    return seconds


def imported_heavy(command: dict, env: dict[str, str]) -> list[str]:
    """The heavy top-level packages the command imports (from ``-X importtime``'s listing)."""
    done = subprocess.run(
        command["argv"],
        cwd=ROOT,
        env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True,
        text=True,
    )
    names = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines()}
    return [name for name in HEAVY if name in names]


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    env, timed = environment(), commands()
    load = [os.getloadavg()[0]]
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for round_ in range(args.runs + 1):  # round 0 warms the file cache and is not kept
        for name, command in timed.items():
            value = run_once(command, env)
            if round_:
                seconds[name].append(value)
        load.append(os.getloadavg()[0])
        print(f"  round {round_}/{args.runs}", file=sys.stderr)
    return {
        "command": " ".join([".venv/bin/python benchmarks/startup.py", *(argv or sys.argv[1:])]),
        "gif": gif_command()[1],
        "runs": args.runs,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": importlib.metadata.version("torch"),
        },
        "load_average_1min": {"min": min(load), "mean": statistics.fmean(load), "max": max(load)},
        "commands": {
            name: {
                "what": command["what"],
                "imports": imported_heavy(command, env),
                "seconds": seconds[name],
                "median": statistics.median(seconds[name]),
                "min": min(seconds[name]),
                "max": max(seconds[name]),
            }
            for name, command in timed.items()
        },
    }


def markdown(results: dict) -> str:
    rows, m, load = results["commands"], results["machine"], results["load_average_1min"]
    busy = (
        " (the cores were shared with other work, so every second is inflated; the rows were "
        "measured side by side)"
        if load["mean"] > 1.5
        else ""
    )
    lines = [
        "## Start-up",
        "",
        "How long `gif` takes before it does anything, and what torch costs of that.",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Fresh processes, {results['runs']} timed runs of each command taking turns (after "
        "one untimed warm-up round); the median, and the fastest and slowest run. "
        f"{m['cpus']} CPU cores, Python {m['python']}, torch {m['torch']}; 1-minute load "
        f"average {load['min']:.1f}-{load['max']:.1f}{busy}. The last row is the time to first "
        "work of an edit: it imports what an edit imports, validates the config and its "
        "task, and stops (exit 2, a `--check` on a path no report has) where a real run "
        "would start loading the data. Raw results: `benchmarks/results/startup.json`.",
        "",
        "| command | what it does | imports | median, s | fastest-slowest, s |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        imports = ", ".join(row["imports"]) or "—"
        lines.append(
            f"| `{name}` | {row['what']} | {imports} | {row['median']:.2f} | "
            f"{row['min']:.2f}-{row['max']:.2f} |"
        )
    floor = rows["python -c pass"]["median"]
    torch = rows["python -c 'import torch'"]["median"] - floor
    first_work = rows[FIRST_WORK]["median"]
    lines += [
        "",
        f"`gif --help` takes {rows['gif --help']['median']:.2f} s, "
        f"{rows['gif --help']['median'] - floor:.2f} s above the bare interpreter. An edit's "
        f"time to first work is {first_work:.2f} s ({first_work - floor:.2f} s above the "
        f"interpreter), of which importing torch, measured alone, is {torch:.2f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.render:
        results = measure(args, argv)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(json.loads(args.output.read_text()))
    if args.markdown:
        args.markdown.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
