"""Random-sample forgetting benchmark (results: BENCHMARKS.md, "Forget random samples").

On a scenario (``configs/digits-samples.yaml`` by default: TinyNet on scikit-learn's digits;
``--data FILE`` runs it on a ``tensors`` file), for each seed it trains one base model and,
for each removal fraction (1%, 5%, 10% of the training split, drawn with
``removal.random.seed``), one retrain oracle; then every method edits the base model under
each candidate step objective (``removal.objective``), the step searched on the validation
split. Success is the gap to the oracle, not accuracy 0: the oracle still classifies most
forgotten samples correctly.

    .venv/bin/python benchmarks/remove_samples.py                  # 13 min on 2 shared cores
    .venv/bin/python benchmarks/remove_samples.py --seeds 0 --fractions 0.05 --methods gif
    .venv/bin/python benchmarks/remove_samples.py --render         # markdown of the JSON

Writes benchmarks/results/remove_samples.json (every per-seed number) and prints the markdown
section (``--markdown FILE`` writes it to a file).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from common import (
    FIDELITY_COLUMNS,
    SeedRuns,
    add_common_arguments,
    cell,
    csv,
    fidelity_cell,
    fidelity_lines,
    how_measured,
    mean_std,
    measure_or_render,
    paired,
    run_benchmark,
    table,
    train,
)

from gifcli.config import SAMPLE_OBJECTIVES, Config
from gifcli.context import prepare
from gifcli.errors import GifError
from gifcli.metrics import ks_critical, ks_distance, predict_loss
from gifcli.tasks import RemoveSamples

METHODS = ("gif", "first-order", "fif", "pif", "if")
FRACTIONS = (0.01, 0.05, 0.1)
JUDGED = ("forget_acc_train", "acc_test", "mia_efficacy")  # the gap, averaged
COLUMNS = (*JUDGED, "retain_acc_train")
LABELS = ("forget acc train", "acc test", "MIA efficacy", "retain acc train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser, config="configs/digits-samples.yaml", results="remove_samples.json", methods=METHODS
    )
    add = parser.add_argument
    add(
        "--fractions",
        type=csv(float),
        default=list(FRACTIONS),
        help="shares of the training split to forget (default 0.01,0.05,0.1)",
    )
    add(
        "--objectives",
        type=csv(),
        default=list(SAMPLE_OBJECTIVES),
        help=f"step objectives compared (default {','.join(SAMPLE_OBJECTIVES)})",
    )
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    def body(runs: SeedRuns) -> dict:
        config = runs.config()
        if config.removal.random is None:
            raise GifError(
                f"{args.config}: this benchmark draws its removal sets; set removal.random"
            )
        fractions = {}
        for fraction in args.fractions:
            if fraction == config.removal.random.fraction:  # the seed's own base and oracle
                sub, folder = runs, runs.folder
            else:
                folder = runs.folder / f"fraction-{fraction:g}"
                folder.mkdir(exist_ok=True)
                scenario = [
                    f"removal.random.fraction={fraction}",
                    f"checkpoint={runs.folder / 'base.safetensors'}",  # one base model a seed
                ]
                sub = SeedRuns(
                    args,
                    runs.seed,
                    folder,
                    folder / "oracle.safetensors",
                    runs.task,
                    runs.log,
                    scenario=scenario,
                )
            oracle = train(sub.config(), folder / "oracle.safetensors", retrain=True)
            distances = unseen_distances(sub.config(), folder / "oracle.safetensors")
            methods = {
                method: {
                    objective: sub.run(method, options=[f"removal.objective={objective}"])
                    for objective in args.objectives
                }
                for method in args.methods
            }
            runs.total = sub.total
            tuned = sub.finetune(args.finetune)
            fractions[f"{fraction:g}"] = {
                "retained": oracle["train_samples"],
                "oracle_seconds": oracle["seconds"],
                "ks_distance": distances,
                "before": sub.before,
                "oracle_metrics": sub.oracle_metrics,
                "methods": methods,
                "finetune": tuned,
            }
        return {"fractions": fractions}

    return run_benchmark(
        args,
        argv,
        script="remove_samples.py",
        task=RemoveSamples.name,
        body=body,
        fractions=[f"{f:g}" for f in args.fractions],
        objectives=args.objectives,
    )


def unseen_distances(config: Config, oracle: Path) -> dict:
    """How unseen the removal set looks to the base model and to the oracle: the KS distance
    between its per-sample losses and the validation split's (what the ``ks`` objective
    measures), and the distance a 5% test tolerates for their sizes."""
    ctx = prepare(config)
    task = ctx.task()
    forget = ctx.data.train.subset(task.removed_mask(ctx.data))
    val = ctx.data.val
    distances = {"bound": ks_critical(len(forget), len(val))}
    for name, checkpoint in (("base", config.checkpoint), ("oracle", oracle)):
        model = ctx.load_model(checkpoint)
        _, forget_loss = predict_loss(model, forget, device=ctx.device)
        _, val_loss = predict_loss(model, val, device=ctx.device)
        distances[name] = ks_distance(forget_loss, val_loss)
    return distances


# --------------------------------------------------------------------------- statistics


def judged_gap(metrics: dict, oracle: dict) -> float:
    """Mean |metric − oracle| over forget_acc_train, acc_test and mia_efficacy."""
    gaps = [abs(metrics[k] - oracle[k]) for k in JUDGED]
    finite = [g for g in gaps if math.isfinite(g)]
    return sum(finite) / len(finite) if finite else math.nan


def scenario_records(results: dict, fraction: str) -> list[dict]:
    return [r["fractions"][fraction] for r in results["per_seed"]]


def fraction_runs(results: dict, fraction: str) -> list[dict]:
    """A fraction's per-seed records with each method's run of the first objective as its own
    (the shape ``fidelity_lines`` reads)."""
    objective = results["objectives"][0]
    return [
        {**r, "methods": {m: runs[objective] for m, runs in r["methods"].items()}}
        for r in scenario_records(results, fraction)
    ]


def gaps_of(results: dict, fraction: str, method: str, objective: str) -> list[float]:
    return [
        judged_gap(r["methods"][method][objective]["metrics"], r["oracle_metrics"])
        for r in scenario_records(results, fraction)
    ]


def retrain_ratios(results: dict, fraction: str, method: str, objective: str) -> list[float]:
    """Seconds of the edit over seconds of training the oracle, per seed."""
    return [
        r["methods"][method][objective]["seconds"] / r["oracle_seconds"]
        for r in scenario_records(results, fraction)
    ]


# --------------------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    s = results["settings"]
    scenario = (
        f"Forget a random {', '.join(f'{100 * float(f):g}%' for f in results['fractions'])} "
        f"of the training split of `{s['dataset']}`"
    )
    lines = [
        "## Forget random samples",
        "",
        *how_measured(results, results.get("results_file", "remove_samples.json"), scenario),
        "The removal set of each fraction is drawn from each seed's training split "
        "(`removal.random`, its own seed 0); one oracle is retrained without it. Every method "
        f"runs on the config's selection ({s['selection']}, ratio {s['ratio']:g}; `if` on every "
        "parameter) under each step objective. **gap (3)**: mean |edit − oracle| over "
        "forget acc train, acc test and MIA efficacy (the target of each is the oracle's "
        "value); **retrain ratio**: seconds of the edit (the report's `cost.seconds.edit`: "
        "everything but the evaluation) over the measured seconds of retraining the oracle; "
        "**`cost.seconds_ratio`**: the same ratio as the edit's own report estimates it, from "
        "timed training steps. Fine-tuning on the retained data (k epochs of `gif train`'s "
        "loop from the base model at a tenth of its learning rate) is the practitioner's "
        "baseline; its seconds are the training loop's.",
        "",
    ]
    for fraction in results["fractions"]:
        lines += fraction_section(results, fraction)
    lines += verdict(results)
    return "\n".join(lines)


def fraction_section(results: dict, fraction: str) -> list[str]:
    records = scenario_records(results, fraction)
    removed = results["per_seed"][0]["base"]["train_samples"] - records[0]["retained"]
    oracle = [r["oracle_metrics"] for r in records]
    fidelity = [(k, label) for k, label in FIDELITY_COLUMNS if k in records[0]["before"]]

    def row(name: str, metrics: list[dict], extra: list[str]) -> list[str]:
        gaps = [judged_gap(m, o) for m, o in zip(metrics, oracle, strict=True)]
        return [
            name,
            *(cell([m[k] for m in metrics]) for k in COLUMNS),
            *(fidelity_cell([m.get(k) for m in metrics], k) for k, _ in fidelity),
            cell(gaps),
            *extra,
        ]

    before = [r["before"] for r in records]
    rows = [row("no edit (before)", before, ["—", "—", "—", "—"])]
    for method in results["methods"]:
        for objective in results["objectives"]:
            runs = [r["methods"][method][objective] for r in records]
            rows.append(
                row(
                    f"`{method}`, `{objective}`",
                    [run["metrics"] for run in runs],
                    [
                        cell([run["relative_step"] for run in runs], 3),
                        cell([run["seconds"] for run in runs]),
                        cell(retrain_ratios(results, fraction, method, objective), 2),
                        cell([run["cost"]["retrain_ratio"] for run in runs], 2)
                        if all("cost" in run for run in runs)
                        else "—",
                    ],
                )
            )
    for epochs in records[0].get("finetune", {}):
        tuned = [r["finetune"][epochs] for r in records]
        ratios = [t["seconds"] / r["oracle_seconds"] for t, r in zip(tuned, records, strict=True)]
        rows.append(
            row(
                f"fine-tune on retained, {epochs} epoch{'s' if epochs != '1' else ''}",
                [t["metrics"] for t in tuned],
                ["—", cell([t["seconds"] for t in tuned]), cell(ratios, 2), "—"],
            )
        )
    rows.append(
        row(
            "retrain oracle",
            oracle,
            ["—", cell([r["oracle_seconds"] for r in records]), "1", "—"],
        )
    )
    header = [
        "method, objective",
        *LABELS,
        *(label for _, label in fidelity),
        "gap (3)",
        "relative step",
        "seconds",
        "retrain ratio",
        "`cost.seconds_ratio`",
    ]
    lines = [
        f"### {100 * float(fraction):g}% of the training split ({removed} samples)",
        "",
        *table(header, rows),
        "",
        *fidelity_lines(results, fraction_runs(results, fraction)),
    ]
    if all("ks_distance" in r for r in records):
        distance = {k: [r["ks_distance"][k] for r in records] for k in ("base", "oracle", "bound")}
        lines += [
            "KS distance between the removal set's and the validation split's losses: "
            f"unedited model {cell(distance['base'], 3)}, oracle {cell(distance['oracle'], 3)}; "
            f"the 5% bound of the `ks` objective {cell(distance['bound'], 3)}.",
            "",
        ]
    return lines


def verdict(results: dict) -> list[str]:
    """The best method and objective per fraction, GIF against first-order, and the
    objectives against each other (all by gap (3), paired over seeds)."""
    fractions, methods, objectives = results["fractions"], results["methods"], results["objectives"]
    lines = ["### Verdict", ""]
    for fraction in fractions:
        candidates = {(m, o): gaps_of(results, fraction, m, o) for m in methods for o in objectives}
        best = min(candidates, key=lambda k: mean_std(candidates[k])[0])
        none = [
            judged_gap(r["before"], r["oracle_metrics"])
            for r in scenario_records(results, fraction)
        ]
        diff, std = paired(candidates[best], none)
        lines.append(
            f"- {100 * float(fraction):g}%: smallest gap (3) `{best[0]}` with `{best[1]}` "
            f"({cell(candidates[best], 2)}); not editing at all: {cell(none, 2)} "
            f"(best minus no edit {diff:+.2f} ± {std:.2f})."
        )
    if {"gif", "first-order"} <= set(methods):
        for objective in objectives:
            for fraction in fractions:
                gif = gaps_of(results, fraction, "gif", objective)
                first = gaps_of(results, fraction, "first-order", objective)
                diff, std = paired(gif, first)
                word = "smaller" if diff <= -0.005 else "not smaller"  # as rounded below
                lines.append(
                    f"- GIF vs first-order, `{objective}`, {100 * float(fraction):g}%: gap (3) "
                    f"{cell(gif, 2)} vs {cell(first, 2)}, GIF's is {word} "
                    f"({diff:+.2f} ± {std:.2f} paired"
                    f"{'; within the seed-to-seed spread' if abs(diff) <= std else ''})."
                )
    for fraction in fractions:
        records = scenario_records(results, fraction)
        if "finetune" not in records[0] or "gif" not in methods:
            continue
        gif = gaps_of(results, fraction, "gif", objectives[0])
        for epochs in records[0]["finetune"]:
            tuned = [
                judged_gap(r["finetune"][epochs]["metrics"], r["oracle_metrics"]) for r in records
            ]
            diff, std = paired(gif, tuned)
            lines.append(
                f"- GIF (`{objectives[0]}`) vs fine-tuning {epochs} epoch(s), "
                f"{100 * float(fraction):g}%: gap (3) {cell(gif, 2)} vs {cell(tuned, 2)} "
                f"({diff:+.2f} ± {std:.2f} paired)."
            )
    if len(objectives) > 1:
        means = {}
        for objective in objectives:
            every = [gaps_of(results, f, m, objective) for f in fractions for m in methods]
            means[objective] = mean_std([gap for gaps in every for gap in gaps])[0]
        ranked = sorted(means, key=means.get)
        lines.append(
            "- Objectives, gap (3) over every method, fraction and seed: "
            + ", ".join(f"`{o}` {means[o]:.2f}" for o in ranked)
            + f"; `{ranked[0]}` is the better."
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    measure_or_render(parse_args(argv), argv, measure, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
