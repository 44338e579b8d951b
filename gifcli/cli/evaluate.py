"""``gif evaluate``: the task's metrics of any checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gifcli.cli.common import (
    CONFIG_ARG,
    JSON_OPT,
    OVERRIDES_ARG,
    console,
    handle_errors,
    print_json,
    read_config,
)
from gifcli.tasks import evaluate_checkpoint

EPILOG = """Example:

  gif evaluate configs/digits.yaml --checkpoint runs/base.safetensors --json
"""


@handle_errors
def evaluate(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Checkpoint to evaluate "
                                    "(.safetensors, .pt, .pth).", show_default=False),
    json_output: bool = JSON_OPT,
) -> None:
    """Overall and per-class test accuracy, and the metrics of the config's task."""
    cfg = read_config(config, overrides)
    report = evaluate_checkpoint(config=cfg, checkpoint=checkpoint)
    if json_output:
        print_json(report)
        return
    table = Table(title=f"{report['checkpoint']} ({report['task']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report["metrics"].items():
        if key != "per_class_acc_test":
            table.add_row(key, f"{value:.2f}")
    for k, value in enumerate(report["metrics"]["per_class_acc_test"]):
        table.add_row(f"acc_test class {k}", f"{value:.2f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("evaluate", epilog=EPILOG)(evaluate)
