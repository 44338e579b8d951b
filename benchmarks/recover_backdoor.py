"""Backdoor-recovery benchmark (results: BENCHMARKS.md, "Recover from a backdoor").

The rows of the paper's Table 3 on a backdoor scenario (``configs/digits-backdoor.yaml`` by
default: TinyNet on scikit-learn's digits, 10% of the training samples carry a checkerboard
trigger and label 4; ``--data FILE`` runs it on a ``tensors`` file): for each seed one
backdoored base model and one retrain oracle (trained on the corrected labels), then GIF, FIF
and PIF on the config's selection and ratio (5% top-outputs), first-order on the same mask, IF
and SIF on every parameter. The known poisoned samples are removed with their poisoned labels
and re-added with their true labels.

    .venv/bin/python benchmarks/recover_backdoor.py                    # 3 min on 2 shared cores
    .venv/bin/python benchmarks/recover_backdoor.py --seeds 0 --methods gif,first-order
    .venv/bin/python benchmarks/recover_backdoor.py --data poisoned.npz --set data.poison.target=0
    .venv/bin/python benchmarks/recover_backdoor.py --render           # markdown of the JSON

Writes benchmarks/results/recover_backdoor.json (every per-seed number) and prints the markdown
section (``--markdown FILE`` writes it to a file).
"""

from __future__ import annotations

import argparse
import sys

from common import (
    SeedRuns,
    add_common_arguments,
    cell,
    f1_verdict,
    fidelity_lines,
    how_measured,
    mean_std,
    measure_or_render,
    method_table,
    metric_of,
    paired,
    run_benchmark,
)

from gifcli.config import INFLUENCE_METHODS
from gifcli.tasks import RecoverBackdoor

METHODS = INFLUENCE_METHODS  # the masked ones share gif's mask
COLUMNS = tuple(key for key in RecoverBackdoor.metric_keys if key != "acc_test")
LABELS = (
    "clean acc test",
    "ASR test",
    "robust acc test",
    "relabel acc train",
    "corrupt acc train",
    "clean acc train",
    "F1",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser,
        config="configs/digits-backdoor.yaml",
        results="recover_backdoor.json",
        methods=METHODS,
    )
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    def body(runs: SeedRuns) -> dict:
        methods = {method: runs.run(method) for method in args.methods}
        return {"methods": methods, "finetune": runs.finetune(args.finetune)}

    return run_benchmark(
        args, argv, script="recover_backdoor.py", task=RecoverBackdoor.name, body=body
    )


# --------------------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    s = results["settings"]
    poison = s["poison"] or {}
    scenario = f"Repair a backdoored model on `{s['dataset']}`" + (
        f": {100 * poison['rate']:g}% of the training samples carry the "
        f"`{poison['trigger']}` trigger and label {poison['target']} (drawn from "
        f"each seed's training split with poison seed {poison['seed']})"
        if poison
        else ""
    )
    lines = [
        "## Recover from a backdoor",
        "",
        *how_measured(results, results.get("results_file", "recover_backdoor.json"), scenario),
    ]
    if results["methods"]:
        lines += [
            f"### Table 3 rows ({s['selection']}, ratio {s['ratio']:g} for the masked methods)",
            "",
            *method_table(results, COLUMNS, LABELS),
            "",
            "Test split: clean accuracy; ASR, % of triggered test inputs of the other "
            "classes predicted as the target; robust accuracy, % of them predicted as "
            "their true class. Training split: relabel acc, % of the poisoned samples "
            "predicted as their true label; corrupt acc, as the target; clean acc, "
            "accuracy on the clean samples. F1: harmonic mean of clean and robust test "
            "accuracy (the task's objective); mean gap: mean |edit − oracle| over these "
            "metrics.",
            "",
            f1_verdict(results) + " " + asr_verdict(results),
            "",
            *fidelity_lines(results),
        ]
    return "\n".join(lines)


def asr_verdict(results: dict) -> str:
    """The lowest ASR, and what it cost in clean test accuracy (paired over seeds)."""
    asr = {m: metric_of(results, m, "asr_test") for m in results["methods"]}
    before_clean = metric_of(results, "before", "clean_acc_test")
    cost = {
        m: paired(before_clean, metric_of(results, m, "clean_acc_test")) for m in results["methods"]
    }
    ranked = sorted(asr, key=lambda m: mean_std(asr[m])[0])
    best = ranked[0]

    def describe(method: str) -> str:
        return (
            f"`{method}` ASR {cell(asr[method])}% at a clean-accuracy cost of "
            f"{cost[method][0]:.1f} ± {cost[method][1]:.1f} points"
        )

    text = (
        f"By ASR (from {cell(metric_of(results, 'before', 'asr_test'))}% before; oracle "
        f"{cell(metric_of(results, 'oracle', 'asr_test'))}%), the lowest is " + describe(best)
    )
    if len(ranked) > 1:
        text += "; next " + describe(ranked[1])
    if "gif" in asr and "gif" not in ranked[:2]:
        text += "; " + describe("gif")
    return text + " (cost: clean test accuracy before minus after, paired over seeds)."


def main(argv: list[str] | None = None) -> None:
    measure_or_render(parse_args(argv), argv, measure, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
