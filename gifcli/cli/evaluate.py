"""``gif evaluate``: the task's metrics of any checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gifcli.checks import evaluate_report_schema
from gifcli.cli.common import (
    CONFIG_ARG,
    EVALUATE_CHECK_OPT,
    EVALUATE_EXIT_CODES,
    JSON_OPT,
    OVERRIDES_ARG,
    QUIET_OPT,
    checkpoint_option,
    console,
    handle_errors,
    parse_check_options,
    read_config,
    show_report,
)

EPILOG = """Examples:

  gif evaluate configs/digits.yaml \\
    --checkpoint runs/digits/forget-3/model.safetensors

  gif evaluate configs/digits.yaml -c runs/digits/base.safetensors \\
    --quiet --check 'acc_test>=95'
"""


@handle_errors
def evaluate(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    checkpoint: Path = checkpoint_option("Checkpoint to evaluate (.safetensors, .pt, .pth)."),
    json_output: bool = JSON_OPT,
    checks: list[str] = EVALUATE_CHECK_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Overall and per-class test accuracy, and the metrics of the config's task."""
    cfg = read_config(config, overrides)
    parse_check_options(checks)  # malformed: refused before the checkpoint is opened
    from gifcli.runs import evaluation_config, run_evaluate
    from gifcli.tasks import described_task

    given = any(o.startswith("removal.") for o in overrides or [])
    scored, _ = evaluation_config(cfg, checkpoint, removal_given=given)  # the task it scores
    kind = described_task(scored)
    schema = evaluate_report_schema(kind.metric_keys, salun=kind.salun_sources is not None)
    gates = parse_check_options(checks, schema)
    report = run_evaluate(config=cfg, checkpoint=checkpoint, checks=gates, removal_given=given)
    show_report(report, print_metrics, json_output=json_output, quiet=quiet)


def print_metrics(report: dict) -> None:
    # the path on a line of its own: a table title would wrap it to the table's width
    console.print(f"{report['checkpoint']} ({report['task']})", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report["metrics"].items():
        if key != "per_class_acc_test":
            table.add_row(key, f"{value:.2f}")
    for k, value in enumerate(report["metrics"]["per_class_acc_test"]):
        table.add_row(f"acc_test class {k}", f"{value:.2f}")
    for key, value in report.get("salun", {}).items():
        table.add_row(f"salun.{key}", f"{value:.2f}")
    console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("evaluate", epilog=f"{EPILOG}\n{EVALUATE_EXIT_CODES}")(evaluate)
