"""Cost against quality: every way to forget, against one retraining of the same model.

For each task (remove-class, recover-backdoor), data set size and seed, one base model and one
retrain oracle are trained (``gif train``'s code, timed); then, on the same base model and in
one process, side by side:

- GIF over a grid of Hessian samples × iterations (× damping, × curvature), and with the
  budgeted default (the library's: Gauss-Newton curvature, whatever the config pins);
- first-order (the gradient step on the same mask), and FIF, PIF, IF at the default budget;
- fine-tuning on the retained data for k epochs (the practitioner's baseline; a benchmark
  baseline, not an edit method of the tool: it needs the whole retained set, which an edit
  does not), at a tenth of the training learning rate, cosine schedule;
- gradient ascent on the removal set (all parameters, SGD at a tenth of the training learning
  rate; the number of epochs, up to 5, chosen on the validation split by the task's
  objective);
- retraining itself (the oracle: gap 0 by definition, its measured training seconds).

Quality: F1 of the task (percent) and the mean absolute gap to the oracle over the task's
metrics. Cost: seconds of the edit (the report's ``cost.seconds.edit``: everything but the
evaluation) against the same seed's measured retraining seconds, and sample passes against
retraining's ``epochs × samples``. Sizes: ``digits`` itself and ``digits16`` files
(``benchmarks/digits16.py``) of the given numbers of training samples.

    .venv/bin/python benchmarks/frontier.py --work-dir runs/bench-frontier
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits16  # noqa: E402
from common import (  # noqa: E402
    FINETUNE_EPOCHS,
    RESULTS,
    ROOT,
    Log,
    cell,
    command_line,
    csv,
    emit,
    finetuned,
    finish,
    machine,
    mean_std,
    table,
    train,
    work_folder,
)

from gifcli.config import load_config  # noqa: E402
from gifcli.context import prepare  # noqa: E402
from gifcli.metrics import oracle_gap, scalar_metrics  # noqa: E402
from gifcli.pipeline import Settings, edit  # noqa: E402

CONFIGS = {
    "remove-class": "configs/digits.yaml",
    "recover-backdoor": "configs/digits-backdoor.yaml",
}
FULL_GRID = [
    (s, k, "0.01", "hessian")
    for s, k in (
        (64, 3),
        (64, 10),
        (128, 5),
        (128, 10),
        (256, 3),
        (256, 10),
        (256, 40),
        (1024, 10),
        (1024, 20),
        (2048, 10),
    )
] + [(256, 10, "auto", "hessian")]
"""(Hessian samples, iterations, damping, curvature) on digits."""
LADDER_GRID = [
    (s, k, "0.01", "hessian")
    for s, k in ((64, 3), (128, 5), (128, 10), (256, 10), (512, 10), (1024, 20))
]
"""The same on the larger sizes (GIF's cost does not depend on n: fewer points suffice)."""
ASCENT_STEPS = 30
LARGE_METHODS = ("first-order", "fif")
"""The other estimators beside GIF on digits16 (``pif``/``if`` only on digits)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--tasks", type=csv(), default=list(CONFIGS), help="tasks (default both)")
    add(
        "--sizes",
        type=csv(),
        default=["digits", "4000", "16000", "64000"],
        help="digits and/or digits16 training-set sizes (default digits,4000,16000,64000)",
    )
    add("--seeds", type=csv(int), default=[0, 1, 2], help="seeds (default 0,1,2)")
    add(
        "--large-seeds",
        type=csv(int),
        default=[0],
        help="seeds at sizes from --large-from on (default 0: one seed there)",
    )
    add("--large-from", type=int, default=64000, help="size from which --large-seeds apply")
    add(
        "--large-tasks",
        type=csv(),
        default=["remove-class"],
        help="tasks at sizes from --large-from on (default remove-class)",
    )
    add("--epochs", type=int, default=10, help="train.epochs on digits16 (default 10)")
    add("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    add("--work-dir", type=Path, help="keep data, checkpoints; reuse identical trainings")
    add("--output", type=Path, default=RESULTS / "frontier.json", help="results JSON")
    add("--plot", type=Path, default=ROOT / "benchmarks" / "results" / "frontier.png")
    add("--markdown", type=Path, help="write the markdown section here (default: stdout)")
    add("--render", action="store_true", help="only render the markdown and plot of --output")
    add(
        "--grid",
        type=csv(),
        help="only these GIF rungs (e.g. 512x10,512x20; 512x5:ggn on the Gauss-Newton curvature) "
        "and the default, no baselines: to add "
        "points to an earlier run (then --combine both; later files win)",
    )
    add(
        "--combine",
        type=Path,
        nargs="+",
        help="results files of runs made in parallel (different sizes): write them as one "
        "--output, then render",
    )
    parser.set_defaults(merge=False)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- measuring


def scenario(args: argparse.Namespace, task: str, size: str, seed: int, folder: Path) -> list[str]:
    overrides = [f"seed={seed}", f"checkpoint={folder / 'base.safetensors'}", "device=cpu"]
    if size != "digits":
        data = digits16.write(folder.parent.parent / f"digits16-{size}.npz", int(size))
        overrides += ["data.dataset=tensors", f"data.path={data}", f"train.epochs={args.epochs}"]
    return overrides


def quality(task, model, data, oracle_metrics: dict, seed: int) -> dict:
    metrics = task.metrics(model, data, device=torch.device("cpu"), seed=seed)
    return {
        "f1": metrics["f1"],
        "gap": oracle_gap(metrics, oracle_metrics)["mean"],
        "metrics": scalar_metrics(metrics),
    }


def _rung(rung: str) -> tuple[int, int, str, str]:
    """``SxK`` (Hessian samples × iterations) or ``SxK:ggn`` (on the Gauss-Newton curvature)."""
    size, _, curvature = rung.partition(":")
    samples, iterations = map(int, size.split("x"))
    return samples, iterations, "0.01", curvature or "hessian"


def gif_runs(args, config_path, overrides, size, model, task, data, oracle, log) -> list[dict]:
    grid = FULL_GRID if size == "digits" else LADDER_GRID
    if args.grid:
        grid = [_rung(rung) for rung in args.grid]
    # the library's defaults, whatever the shipped config pins (digits-backdoor.yaml: 1024×20,
    # Hessian, for the README's gates)
    budgeted = [
        "influence.hessian_samples=auto",
        "influence.max_iter=auto",
        "influence.curvature=ggn",
    ]
    variants = [("gif (default budget)", "gif", budgeted)]
    variants += [
        (
            f"gif {s}×{k} λ={damping}{' GGN' if curvature == 'ggn' else ''}",
            "gif",
            [
                f"influence.hessian_samples={s}",
                f"influence.max_iter={k}",
                f"influence.damping={damping}",
                f"influence.curvature={curvature}",
            ],
        )
        for s, k, damping, curvature in grid
    ]
    others = ("first-order", "fif", "pif", "if") if size == "digits" else LARGE_METHODS
    others = () if args.grid else others
    variants += [(method, method, budgeted) for method in others]
    rows = []
    for name, method, extra in variants:
        config = load_config(ROOT / config_path, [*overrides, f"influence.method={method}", *extra])
        result = edit(model, task, data, Settings.from_config(config), oracle=oracle)
        report = result.report.to_dict()
        cost = report["cost"]
        rows.append(
            {
                "name": name,
                "family": "gif" if method == "gif" and name != "gif (default budget)" else name,
                "f1": report["metrics"]["after"]["f1"],
                "gap": report["metrics"]["gap"]["mean"],
                "seconds": cost["seconds"]["edit"],
                "passes": cost["passes"]["edit"],
                "estimated_retrain_ratio": cost["seconds_ratio"],
                "hessian_samples": cost["budget"]["hessian_samples"],
                "max_iter": cost["budget"]["max_iter"],
                "stages": cost["seconds"],
            }
        )
        row = rows[-1]
        log(f"  {name}: F1 {row['f1']:.1f}, gap {row['gap']:.2f}, {row['seconds']:.1f} s")
    return rows


def finetune_runs(config, model, task, data, oracle_metrics, seed, log) -> list[dict]:
    retained = task.retrain_split(data)
    rows = []
    for epochs in FINETUNE_EPOCHS:
        tuned, seconds = finetuned(model, retained, config.train, epochs=epochs, seed=seed)
        rows.append(
            {
                "name": f"fine-tune {epochs} epoch{'s' if epochs > 1 else ''}",
                "family": "fine-tune",
                **quality(task, tuned, data, oracle_metrics, seed),
                "seconds": seconds,
                "passes": float(epochs * len(retained)),
            }
        )
        log(f"  {rows[-1]['name']}: F1 {rows[-1]['f1']:.1f}, {seconds:.1f} s")
    return rows


def ascent_run(config, model, task, data, oracle_metrics, seed, log) -> dict:
    """Gradient ascent on the removal loss (all parameters, SGD at the training learning rate,
    batches of the training batch size), one step at a time; the number of steps, up to
    ``ASCENT_STEPS``, with the best validation objective (the task's, as the step search
    uses) is kept."""
    started = time.perf_counter()
    removal = task.removal_set(data, device=torch.device("cpu"), model=model)
    ascended = copy.deepcopy(model).eval()
    params = [p for p in ascended.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.train.lr)
    batch = config.train.batch_size
    best, best_state, chosen = removal.objective(ascended)[0], None, 0
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, ASCENT_STEPS + 1):
        rows = torch.randint(len(removal.x), (min(batch, len(removal.x)),), generator=generator)
        loss = -F.cross_entropy(ascended(removal.x[rows]), removal.y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = removal.objective(ascended)[0]
        if value > best:
            best, best_state, chosen = value, copy.deepcopy(ascended.state_dict()), step
    ascended.load_state_dict(best_state if best_state is not None else model.state_dict())
    seconds = time.perf_counter() - started
    row = {
        "name": "gradient ascent",
        "family": "gradient ascent",
        **quality(task, ascended, data, oracle_metrics, seed),
        "seconds": seconds,
        "passes": float(ASCENT_STEPS * min(batch, len(removal.x))),
        "steps_chosen": chosen,
    }
    log(f"  gradient ascent ({chosen} steps): F1 {row['f1']:.1f}, {seconds:.1f} s")
    return row


def measure_one(args, task_name: str, size: str, seed: int, work: Path, log: Log) -> dict:
    folder = work / task_name / size / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    overrides = scenario(args, task_name, size, seed, folder)
    config = load_config(ROOT / CONFIGS[task_name], overrides)
    base = train(config, folder / "base.safetensors", retrain=False)
    oracle_report = train(config, folder / "oracle.safetensors", retrain=True)
    log(
        f"{task_name} {size} seed {seed}: base {base['acc_test']:.1f}% ({base['seconds']:.1f} s), "
        f"oracle {oracle_report['acc_test']:.1f}% ({oracle_report['seconds']:.1f} s)"
    )
    ctx = prepare(config)
    task = ctx.task()
    model = ctx.load_model()
    oracle = ctx.load_model(folder / "oracle.safetensors", role="oracle")
    oracle_metrics = task.metrics(oracle, ctx.data, device=ctx.device, seed=seed)
    rows = gif_runs(args, CONFIGS[task_name], overrides, size, model, task, ctx.data, oracle, log)
    if not args.grid:
        rows += finetune_runs(config, model, task, ctx.data, oracle_metrics, seed, log)
        rows.append(ascent_run(config, model, task, ctx.data, oracle_metrics, seed, log))
    retrain_passes = float(config.train.epochs * oracle_report["train_samples"])
    rows.append(  # an added-points run repeats the oracle; --combine keeps one
        {
            "name": "retrain (oracle)",
            "family": "retrain",
            "f1": oracle_metrics["f1"],
            "gap": 0.0,
            "seconds": oracle_report["seconds"],
            "passes": retrain_passes,
        }
    )
    for row in rows:
        row["retrain_ratio"] = row["seconds"] / oracle_report["seconds"]
        row["passes_ratio"] = row["passes"] / retrain_passes
    return {
        "task": task_name,
        "size": size,
        "seed": seed,
        "train_samples": len(ctx.data.train),
        "retrain_seconds": oracle_report["seconds"],
        "retrain_passes": retrain_passes,
        "base_acc_test": base["acc_test"],
        "oracle_acc_test": oracle_report["acc_test"],
        "rows": rows,
    }


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    log = Log()
    torch.set_num_threads(args.threads)
    importlib.import_module("torch._dynamo")  # the optimiser imports it once: not in a timing

    results = {
        "benchmark": "frontier",
        "command": command_line("frontier.py", argv),
        "machine": machine(args.threads),
        "runs": [],
    }
    with work_folder(args.work_dir) as work:
        for size in args.sizes:
            large = size != "digits" and int(size) >= args.large_from
            for task_name in args.large_tasks if large else args.tasks:
                for seed in args.large_seeds if large else args.seeds:
                    results["runs"].append(measure_one(args, task_name, size, seed, work, log))
                    args.output.parent.mkdir(parents=True, exist_ok=True)
                    args.output.write_text(json.dumps(results, indent=1) + "\n")
    finish(args, results, log)
    return results


# --------------------------------------------------------------------------- reporting


def combined_runs(parts: list[dict]) -> list[dict]:
    """The runs of several results files, one per (task, size, seed); a row of a later file
    replaces the row of the same name of an earlier one."""
    runs: dict[tuple, dict] = {}
    for part in parts:
        for run in part["runs"]:
            key = (run["task"], run["size"], run["seed"])
            if key not in runs:
                runs[key] = {**run, "rows": list(run["rows"])}
                continue
            rows = {row["name"]: row for row in runs[key]["rows"]}
            rows.update({row["name"]: row for row in run["rows"]})
            runs[key]["rows"] = list(rows.values())
    return list(runs.values())


def grouped(results: dict) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(task, size) -> row name -> that row of every seed."""
    out: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for run in results["runs"]:
        rows = out.setdefault((run["task"], run["size"]), {})
        for row in run["rows"]:
            rows.setdefault(row["name"], []).append(row)

    def order(key: tuple[str, str]) -> tuple[int, str]:
        return (0 if key[1] == "digits" else int(key[1]), key[0] != "remove-class")

    return {key: out[key] for key in sorted(out, key=order)}


def size_label(size: str, results: dict) -> str:
    runs = [r for r in results["runs"] if r["size"] == size]
    n = runs[0]["train_samples"] if runs else "?"
    return f"digits (n = {n:,})" if size == "digits" else f"digits16 (n = {n:,})"


def markdown(results: dict) -> str:
    lines = [
        "## Cost against retraining",
        "",
        "```",
        *([results["command"]] if isinstance(results["command"], str) else results["command"]),
        "```",
        "",
        "Per task, size and seed, one base model and one retrain oracle (`gif train`'s code, "
        "timed), then every method on the same base model in one process: GIF over a grid of "
        "Hessian samples × iterations (λ = 0.01 unless `auto`; the Hessian curvature, the "
        "Gauss-Newton one where a row says GGN), GIF with the budgeted default "
        "(`hessian_samples`/`max_iter: auto`, `influence.budget` 0.5 in the runs before the budget "
        "counted a training step as 2 passes, 0.25 since (the same rungs), Gauss-Newton curvature "
        "in the rows measured since it became the default: the last three runs), first-order, "
        "FIF, PIF and IF at the default budget (only FIF beside them on digits16), fine-tuning "
        "on the retained data (k epochs at a tenth of the training learning rate), gradient ascent "
        "on the removal set (up to 30 steps, the number chosen on the validation split) and "
        "retraining. Seconds: an edit's `cost.seconds.edit` (everything but the evaluation), "
        "fine-tuning's and ascent's training loop, retraining's measured training. `× retrain` "
        "divides by the same seed's measured retraining seconds, taken when that model was "
        "trained and so under another load than the edit; `report's estimate` is the edit's "
        "own `cost.seconds_ratio`, whose timed training steps run moments before the edit. "
        "Passes: sample passes, retraining = epochs × retained samples. F1 and the mean gap to "
        "the oracle "
        "(percentage points over the task's metrics), mean ± std over seeds. One thread.",
        "",
        f"Raw results: `benchmarks/results/{Path(results['output']).name}`; plot: "
        f"`benchmarks/results/frontier.png`. Wall time {results['wall_seconds']:.0f} s, "
        f"load average {results['load_average_1min']['mean']:.1f}.",
        "",
        "![frontier](benchmarks/results/frontier.png)",
        "",
    ]
    for (task_name, size), rows in grouped(results).items():
        seeds = len(next(iter(rows.values())))
        lines += [f"### {task_name}, {size_label(size, results)}, {seeds} seed(s)", ""]
        body = []
        for name, per_seed in rows.items():
            body.append(
                [
                    name,
                    cell([r["f1"] for r in per_seed]),
                    cell([r["gap"] for r in per_seed], 2),
                    cell([r["seconds"] for r in per_seed], 2),
                    cell([r["retrain_ratio"] for r in per_seed], 2),
                    cell([r.get("estimated_retrain_ratio") or math.nan for r in per_seed], 2)
                    if "estimated_retrain_ratio" in per_seed[0]
                    else "—",
                    f"{mean_std([r['passes'] for r in per_seed])[0]:,.0f}",
                    cell([r["passes_ratio"] for r in per_seed], 3),
                ]
            )
        lines += table(
            [
                "method",
                "F1",
                "gap to oracle",
                "seconds",
                "× retrain",
                "report's estimate",
                "sample passes",
                "passes × retrain",
            ],
            body,
        )
        lines.append("")
    lines += flat_table(results)
    lines += verdict_table(results)
    return "\n".join(lines)


OLD_DEFAULT = "gif 1024×20 λ=0.01"
"""The fixed default before the budget (1,024 Hessian samples, 20 iterations, λ 0.01)."""


def verdict_table(results: dict) -> list[str]:
    """The budgeted default against the old fixed default and against first-order: F1
    differences paired over the seeds both have, and the default's cost."""
    body = []
    for (task_name, size), rows in grouped(results).items():
        default = rows.get("gif (default budget)")
        if not default:
            continue
        cells = [task_name, size_label(size, results)]
        for other in (OLD_DEFAULT, "first-order"):
            if other not in rows:
                cells.append("n/a")
                continue
            ours = {
                r["seed"]: r["f1"] for r in seeded(results, task_name, size, default[0]["name"])
            }
            theirs = {r["seed"]: r["f1"] for r in seeded(results, task_name, size, other)}
            common = sorted(ours.keys() & theirs.keys())
            diff, std = mean_std([ours[s] - theirs[s] for s in common])
            cells.append(f"{diff:+.1f} ± {std:.1f} ({len(common)})")
        budget = {(r["hessian_samples"], r["max_iter"]) for r in default}
        cells.append(", ".join(f"{s}×{k}" for s, k in sorted(budget)))
        cells.append(cell([r["retrain_ratio"] for r in default], 2))
        body.append(cells)
    return [
        "### The budgeted default against the old default and first-order",
        "",
        "F1 of the default minus F1 of the other, paired by seed (mean ± std, seeds):",
        "",
        *table(
            [
                "task",
                "data",
                "− old default (1024×20)",
                "− first-order",
                "rung the budget took",
                "default × retrain",
            ],
            body,
        ),
        "",
    ]


def seeded(results: dict, task: str, size: str, name: str) -> list[dict]:
    """The row ``name`` of every seed of (task, size), with its seed."""
    out = []
    for run in results["runs"]:
        if run["task"] == task and run["size"] == size:
            out += [{**row, "seed": run["seed"]} for row in run["rows"] if row["name"] == name]
    return out


FLAT_ROWS = ("gif (default budget)", "gif 128×10 λ=0.01", OLD_DEFAULT, "first-order")
"""The edits whose cost is tabled against n: the default and fixed settings."""


def flat_table(results: dict) -> list[str]:
    """Sample passes of the default and of fixed settings against retraining's, as n grows."""
    body = []
    for (task_name, size), rows in grouped(results).items():
        oracle = rows.get("retrain (oracle)", [])
        if not oracle:
            continue
        cells = [task_name, size_label(size, results)]
        for name in FLAT_ROWS:
            edits = rows.get(name, [])
            cells.append(f"{mean_std([r['passes'] for r in edits])[0]:,.0f}" if edits else "—")
        cells.append(f"{mean_std([r['passes'] for r in oracle])[0]:,.0f}")
        default = rows.get("gif (default budget)", [])
        cells.append(cell([r.get("estimated_retrain_ratio") or math.nan for r in default], 2))
        body.append(cells)
    return [
        "### Cost as n grows",
        "",
        "Sample passes of each edit (mean over seeds) against one retraining's; the last "
        "column is the default edit's own estimate of its cost against retraining, in seconds.",
        "",
        *table(
            [
                "task",
                "data",
                "default",
                "128×10",
                "1024×20",
                "first-order",
                "retraining",
                "default × retrain (s, est.)",
            ],
            body,
        ),
        "",
    ]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(results)
    tasks = sorted({task for task, _ in groups})
    sizes = list(dict.fromkeys(size for _, size in groups))
    figure, axes = plt.subplots(
        len(tasks), len(sizes), figsize=(4 * len(sizes), 3.4 * len(tasks)), squeeze=False
    )
    markers = {"gif": "o", "first-order": "s", "fine-tune": "^", "gradient ascent": "v"}
    colours = {
        "gif": "tab:blue",
        "gif (default budget)": "tab:red",
        "first-order": "tab:green",
        "fine-tune": "tab:orange",
        "gradient ascent": "tab:purple",
        "retrain": "black",
    }
    for i, task_name in enumerate(tasks):
        for j, size in enumerate(sizes):
            axis = axes[i][j]
            if (task_name, size) not in groups:
                axis.set_visible(False)
                continue
            for per_seed in groups[(task_name, size)].values():
                family = per_seed[0]["family"]
                x = mean_std([r["retrain_ratio"] for r in per_seed])[0]
                y = mean_std([r["f1"] for r in per_seed])[0]
                if math.isnan(x) or math.isnan(y):
                    continue
                axis.scatter(
                    max(x, 1e-3),
                    y,
                    marker=markers.get(family, "*"),
                    color=colours.get(family, "tab:grey"),
                    s=60 if family != "gif" else 25,
                    label=family if family != "gif" else "gif grid",
                )
            axis.set_xscale("log")
            axis.axvline(1.0, color="grey", lw=0.8, ls="--")
            axis.set_title(f"{task_name}, {size_label(size, results)}", fontsize=9)
            axis.set_xlabel("seconds × retraining")
            axis.set_ylabel("F1 (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    figure.legend(unique.values(), unique.keys(), loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        results = {
            **parts[0],
            "command": [command_line("frontier.py", part["command"].split()[2:]) for part in parts],
            "runs": combined_runs(parts),
            "wall_seconds": max(part.get("wall_seconds", 0) for part in parts),
            "load_average_1min": {
                "mean": statistics.fmean(
                    p["load_average_1min"]["mean"] for p in parts if "load_average_1min" in p
                )
            },
        }
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    elif args.render:
        results = json.loads(args.output.read_text())
    else:
        results = measure(args, argv)
    results["output"] = str(args.output)
    plot(results, args.plot)
    emit(args, markdown(results))


if __name__ == "__main__":
    main()
