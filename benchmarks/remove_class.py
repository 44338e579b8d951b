"""Remove-class benchmark (results: BENCHMARKS.md, "Remove a class").

On a scenario (``configs/digits.yaml`` by default: TinyNet, forget class 3 of scikit-learn's
digits; ``--data FILE`` runs it on a ``tensors`` file), for each seed it trains one base model
and one retrain oracle, then measures in one run:

1. the estimators side by side, on the config's selection and ratio: gif, fif, pif,
   first-order on the same target mask; if and sif on every parameter; and the oracle;
2. the paper's Table 1: GIF with every selection method at every ratio, by retained test
   accuracy after forgetting (and the forget accuracy, to show that it forgot).

    .venv/bin/python benchmarks/remove_class.py                        # 7 min on 2 shared cores
    .venv/bin/python benchmarks/remove_class.py --seeds 0 --ratios 0.05 --selections random
    .venv/bin/python benchmarks/remove_class.py --data my.npz --set removal.classes=[7]
    .venv/bin/python benchmarks/remove_class.py --render               # markdown of the JSON

Writes benchmarks/results/remove_class.json (every per-seed number) and prints the markdown
section (``--markdown FILE`` writes it to a file).
"""

from __future__ import annotations

import argparse
import sys

from common import (
    SeedRuns,
    add_common_arguments,
    cell,
    csv,
    f1_verdict,
    fidelity_lines,
    how_measured,
    mean_std,
    measure_or_render,
    method_table,
    run_benchmark,
    table,
)

from gifcli.config import INFLUENCE_METHODS, SELECTION_METHODS
from gifcli.tasks import RemoveClass

METHODS = INFLUENCE_METHODS
RATIOS = (0.02, 0.05, 0.1, 0.2, 1.0)
COLUMNS = ("forget_acc_test", "retain_acc_test", "mia_efficacy", "f1")
LABELS = ("forget acc test", "retain acc test", "MIA efficacy", "F1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser, config="configs/digits.yaml", results="remove_class.json", methods=METHODS
    )
    add = parser.add_argument
    add(
        "--selections",
        type=csv(),
        default=list(SELECTION_METHODS),
        help="Table 1 selection methods, or none (default: all five)",
    )
    add(
        "--ratios",
        type=csv(float),
        default=list(RATIOS),
        help="Table 1 ratios, or none (default 0.02,0.05,0.1,0.2,1.0)",
    )
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    def body(runs: SeedRuns) -> dict:
        methods = {method: runs.run(method) for method in args.methods}
        finetune = runs.finetune(args.finetune)
        table1 = {
            selection: {str(ratio): runs.run("gif", selection, ratio) for ratio in args.ratios}
            for selection in args.selections
        }
        return {"methods": methods, "finetune": finetune, "table1": table1}

    return run_benchmark(
        args,
        argv,
        script="remove_class.py",
        task=RemoveClass.name,
        body=body,
        selections=args.selections,
        ratios=args.ratios,
    )


# --------------------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    s = results["settings"]
    scenario = f"Forget class {', '.join(map(str, s['classes']))} of `{s['dataset']}`"
    lines = [
        "## Remove a class",
        "",
        *how_measured(results, results.get("results_file", "remove_class.json"), scenario),
    ]
    if results["methods"]:
        lines += [
            f"### Estimators side by side ({s['selection']}, ratio {s['ratio']:g})",
            "",
            *method_table(results, COLUMNS, LABELS),
            "",
            "F1: harmonic mean of `100 − forget acc` and `retain acc` (the task's "
            "objective); MIA efficacy: % of the removed training samples that a confidence "
            "attack calls non-members (a retrained model scores near 100; its SVC is fit "
            "on members and non-members whose confidences are nearly all ≈ 1, so on a "
            "data set this small its call on the low-confidence removed samples can flip "
            "between 0 and 100 for similar confidences: read it with its std); mean gap: "
            "mean |edit − oracle| over the scalar metrics (train and test accuracies, F1, "
            "MIA).",
            "",
            f1_verdict(results),
            "",
            *fidelity_lines(results),
        ]
    if results["selections"] and results["ratios"]:
        lines += table1_section(results)
    return "\n".join(lines)


def table1_section(results: dict) -> list[str]:
    seeds = results["per_seed"]
    ratios = [str(r) for r in results["ratios"]]
    header = ["selection", *(f"{100 * float(r):g}%" for r in ratios)]

    def grid(key: str) -> list[list[str]]:
        return [
            [
                f"`{selection}`",
                *(
                    cell([r["table1"][selection][ratio]["metrics"][key] for r in seeds])
                    for ratio in ratios
                ),
            ]
            for selection in results["selections"]
        ]

    before = cell([r["before"]["retain_acc_test"] for r in seeds])
    oracle = cell([r["oracle_metrics"]["retain_acc_test"] for r in seeds])
    lines = [
        "### Table 1: selection method × ratio (GIF)",
        "",
        "Retained test accuracy after forgetting (higher is better); before the edit "
        f"{before}, retrain oracle {oracle}.",
        "",
        *table(header, grid("retain_acc_test")),
        "",
        "Forget test accuracy after forgetting (lower is better: did it forget?).",
        "",
        *table(header, grid("forget_acc_test")),
        "",
    ]
    if "1.0" in ratios:
        lines += [
            "At 100% every selection method selects every Linear/Conv2d parameter (the "
            "same mask), so that column is one run per seed; on an all-Linear/Conv2d "
            "model it is the `if` system.",
            "",
        ]
    best = []
    for ratio in (r for r in ratios if r != "1.0"):
        scores = {
            sel: mean_std([r["table1"][sel][ratio]["metrics"]["f1"] for r in seeds])[0]
            for sel in results["selections"]
        }
        winner = max(scores, key=scores.get)
        best.append(f"{100 * float(ratio):g}%: `{winner}` (F1 {scores[winner]:.1f})")
    if best:
        lines += ["Best selection by mean F1 at each ratio: " + "; ".join(best) + ".", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    measure_or_render(parse_args(argv), argv, measure, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
