"""Remove-class benchmark (results: benchmarks/TASKS.md, "Remove a class").

On a scenario (``configs/digits.yaml`` by default: TinyNet, forget class 3 of scikit-learn's
digits; ``--data FILE`` runs it on a ``tensors`` file), for each seed it trains one base model
and one retrain oracle, then measures in one run:

1. the estimators side by side, on the config's selection and ratio: gif, fif, pif,
   first-order on the same target mask; if and sif on every parameter; and the oracle;
2. the paper's Table 1: GIF with every selection method at every ratio, by retained test
   accuracy after forgetting (and the forget accuracy, to show that it forgot).

    .venv/bin/python benchmarks/remove_class.py                        # about 12 min on 2 cores
    .venv/bin/python benchmarks/remove_class.py --seeds 0 --ratios 0.05 --selections random
    .venv/bin/python benchmarks/remove_class.py --data my.npz --set removal.classes=[7]
    .venv/bin/python benchmarks/remove_class.py --render               # markdown of the JSON

Writes benchmarks/results/remove_class.json (every per-seed number) and prints the markdown
section (``--markdown FILE`` writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import (
    Log,
    SeedRuns,
    add_common_arguments,
    cell,
    command_line,
    csv,
    emit,
    finish,
    machine,
    mean_std,
    measured_on,
    paired,
    seed_config,
    table,
    train_pair,
    work_folder,
)

from gifcli.config import SELECTION_METHODS
from gifcli.tasks import REMOVE_CLASS

METHODS = ("gif", "fif", "pif", "if", "sif", "first-order")
RATIOS = (0.02, 0.05, 0.1, 0.2, 1.0)
COLUMNS = ("forget_acc_test", "retain_acc_test", "mia_efficacy", "f1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, config="configs/digits.yaml", results="remove_class.json",
                         methods=METHODS)
    add = parser.add_argument
    add("--selections", type=csv(), default=list(SELECTION_METHODS),
        help="Table 1 selection methods, or none (default: all five)")
    add("--ratios", type=csv(float), default=list(RATIOS),
        help="Table 1 ratios, or none (default 0.02,0.05,0.1,0.2,1.0)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    log = Log()
    torch.set_num_threads(args.threads)
    results = {"benchmark": REMOVE_CLASS, "command": command_line("remove_class.py", argv),
               "config": str(args.config), "data": str(args.data) if args.data else None,
               "overrides": args.overrides, "seeds": args.seeds, "methods": args.methods,
               "selections": args.selections, "ratios": args.ratios,
               "machine": machine(args.threads), "per_seed": []}
    with work_folder(args.work_dir) as work:
        for seed in args.seeds:
            folder = work / f"seed-{seed}"
            folder.mkdir(exist_ok=True)
            config = seed_config(args, seed, folder)
            results["settings"] = settings(config)
            models = train_pair(args, seed, folder, log)
            runs = SeedRuns(args, seed, folder, oracle=folder / "oracle.safetensors",
                            task=REMOVE_CLASS, log=log)
            methods = {method: runs.run(method) for method in args.methods}
            grid = {selection: {str(ratio): runs.run("gif", selection, ratio)
                                for ratio in args.ratios} for selection in args.selections}
            results["settings"]["parameters"] = runs.total
            results["per_seed"].append({"seed": seed, **models, "before": runs.before,
                                        "oracle_metrics": runs.oracle_metrics,
                                        "methods": methods, "table1": grid})
    finish(args, results, log)
    return results


def settings(config) -> dict:
    influence = config.influence
    return {"classes": config.removal.classes, "dataset": config.data.dataset,
            "arch": config.model.arch, "selection": config.selection.method,
            "ratio": config.selection.ratio, "solver": influence.solver,
            "curvature": influence.curvature, "damping": influence.damping,
            "max_iter": influence.max_iter, "hessian_samples": influence.hessian_samples,
            "batch_size": influence.batch_size, "grid_points": config.update.grid_points,
            "scale": config.update.scale}


# --------------------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    s, seeds = results["settings"], results["per_seed"]
    total = s["parameters"]
    lines = [
        "## Remove a class", "",
        f"Forget class {', '.join(map(str, s['classes']))} of `{s['dataset']}` "
        f"(`{results['config']}`{', ' + results['data'] if results['data'] else ''}"
        f"{', ' + ' '.join(results['overrides']) if results['overrides'] else ''}), model "
        f"`{s['arch']}` ({total:,} parameters), one base model and one retrain oracle per seed "
        f"(trained with `run_train`; seed = config `seed`: training, validation split, "
        f"selection, Hessian sample). Every edit: `{s['curvature']}` curvature, "
        f"`{s['solver']}` solver (damping {s['damping']:g}, max_iter {s['max_iter']}), "
        f"Hessian sample {s['hessian_samples']} retained training points in batches of "
        f"{s['batch_size']} (the defaults), step scale `{s['scale']}`: searched over "
        f"{s['grid_points']} points on the validation split, never on test. Test-split "
        f"metrics in %, mean ± sample std over {len(seeds)} seed(s); seconds are the whole "
        f"`run_unlearning` call (data, selection, solve, step search, metrics), the oracle's "
        f"its training time. " + measured_on(results), "",
        "```", results["command"], "```", "",
        "Raw per-seed numbers: `benchmarks/results/remove_class.json`.", ""]
    if results["methods"]:
        lines += methods_section(results, total)
    if results["selections"] and results["ratios"]:
        lines += table1_section(results)
    return "\n".join(lines)


def methods_section(results: dict, total: int) -> list[str]:
    s, seeds = results["settings"], results["per_seed"]
    header = ["method", "parameters edited", "forget acc test", "retain acc test",
              "MIA efficacy", "F1", "mean gap to oracle", "seconds"]

    def row(name: str, per_seed: list[dict], targets: str, gap: str, seconds: str) -> list[str]:
        return [name, targets, *(cell([m[k] for m in per_seed]) for k in COLUMNS), gap, seconds]

    rows = [row("base model (before)", [r["before"] for r in seeds], "—", "—", "—")]
    for method in results["methods"]:
        records = [r["methods"][method] for r in seeds]
        targets = records[0]["targets"]
        where = (f"{targets:,} ({100 * targets / total:.1f}%, {s['selection']})"
                 if targets < total else f"all {total:,}")
        rows.append(row(f"`{method}`", [r["metrics"] for r in records], where,
                        cell([r["oracle_gap_mean"] for r in records]),
                        cell([r["seconds"] for r in records])))
    rows.append(row("retrain oracle", [r["oracle_metrics"] for r in seeds], "all (retrained)",
                    "0", cell([r["oracle"]["seconds"] for r in seeds])))
    lines = [f"### Estimators side by side ({s['selection']}, ratio {s['ratio']:g})", "",
             *table(header, rows), "",
             "F1: harmonic mean of `100 − forget acc` and `retain acc` (the task's objective); "
             "MIA efficacy: % of the removed training samples a confidence attack calls "
             "non-members (a retrained model scores near 100); mean gap: mean |edit − oracle| "
             "over the scalar metrics.", ""]
    return lines + verdict(results)


def verdict(results: dict) -> list[str]:
    """Which method wins by F1, and by how much (paired over seeds)."""
    seeds = results["per_seed"]
    f1 = {m: [r["methods"][m]["metrics"]["f1"] for r in seeds] for m in results["methods"]}
    oracle = [r["oracle_metrics"]["f1"] for r in seeds]
    ranked = sorted(f1, key=lambda m: -sum(f1[m]))
    best = ranked[0]
    text = [f"By F1, `{best}` is best ({cell(f1[best])})"]
    if len(ranked) > 1:
        diff, std = paired(f1[best], f1[ranked[1]])
        text.append(f"ahead of `{ranked[1]}` by {diff:.1f} ± {std:.1f} points (paired over "
                    f"seeds)")
    diff, std = paired(f1[best], oracle)
    text.append(f"and {'above' if diff >= 0 else 'below'} the retrain oracle "
                f"({cell(oracle)}) by {abs(diff):.1f} ± {std:.1f}.")
    lines = [" ".join(text)]
    if "gif" in f1 and best != "gif":
        diff, std = paired(f1[best], f1["gif"])
        lines.append(f"GIF loses to `{best}` by {diff:.1f} ± {std:.1f} F1 points.")
    if "gif" in f1:
        others = ", ".join(f"`{m}` {paired(f1['gif'], f1[m])[0]:+.1f} ± "
                           f"{paired(f1['gif'], f1[m])[1]:.1f}" for m in ranked if m != "gif")
        lines.append(f"GIF's F1 minus each other method's, per seed: {others}.")
    return [" ".join(lines), ""]


def table1_section(results: dict) -> list[str]:
    seeds = results["per_seed"]
    ratios = [str(r) for r in results["ratios"]]
    header = ["selection", *(f"{100 * float(r):g}%" for r in ratios)]

    def grid(key: str) -> list[list[str]]:
        return [[f"`{selection}`", *(cell([r["table1"][selection][ratio]["metrics"][key]
                                           for r in seeds]) for ratio in ratios)]
                for selection in results["selections"]]

    before = cell([r["before"]["retain_acc_test"] for r in seeds])
    oracle = cell([r["oracle_metrics"]["retain_acc_test"] for r in seeds])
    lines = ["### Table 1: selection method × ratio (GIF)", "",
             "Retained test accuracy after forgetting (higher is better); before the edit "
             f"{before}, retrain oracle {oracle}.", "", *table(header, grid("retain_acc_test")),
             "", "Forget test accuracy after forgetting (lower is better: did it forget?).", "",
             *table(header, grid("forget_acc_test")), ""]
    if "1.0" in ratios:
        lines += ["At 100% every selection method selects every Linear/Conv2d parameter (the "
                  "same mask), so that column is one run per seed; on an all-Linear/Conv2d "
                  "model it is the `if` system.", ""]
    best = []
    for ratio in ratios:
        scores = {sel: mean_std([r["table1"][sel][ratio]["metrics"]["f1"] for r in seeds])[0]
                  for sel in results["selections"]}
        winner = max(scores, key=scores.get)
        best.append(f"{100 * float(ratio):g}%: `{winner}` (F1 {scores[winner]:.1f})")
    lines += ["Best selection by mean F1 at each ratio: " + "; ".join(best) + ".", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = (json.loads(args.output.read_text()) if args.render else run(args, argv))
    emit(args, markdown(results))


if __name__ == "__main__":
    main(sys.argv[1:])
