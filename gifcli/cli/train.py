"""``gif train``: train the base model, or the retrain oracle with ``--retrain``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gifcli.cli.common import (
    CONFIG_ARG,
    FORCE_OPT,
    JSON_OPT,
    OVERRIDES_ARG,
    QUIET_OPT,
    console,
    handle_errors,
    progress_factory,
    read_config,
    show_report,
)

EPILOG = """Examples:

  gif train configs/digits.yaml -o runs/digits/base.safetensors

  gif train configs/digits.yaml --retrain -o runs/digits/oracle.safetensors
"""


@handle_errors
def train(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    output: Path = typer.Option(
        None,
        "-o",
        "--output",
        help="Checkpoint to write (.safetensors); default: the config's `checkpoint`.",
    ),
    retrain: bool = typer.Option(
        False,
        "--retrain",
        help="Train the retrain oracle: without "
        "removal.classes, with the poisoned labels corrected, or without the samples of "
        "removal.indices / removal.random.",
    ),
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Train model.arch on the config's data set and write a safetensors checkpoint."""
    cfg = read_config(config, overrides)
    from gifcli.train import run_train

    report = run_train(
        config=cfg,
        output=output,
        retrain=retrain,
        force=force,
        progress=progress_factory(not (json_output or quiet)),
    )
    show_report(report, print_train_report, json_output=json_output, quiet=quiet)


def print_train_report(report: dict) -> None:
    oracle = report["task"] == "retrain"
    table = Table(title=f"gif {report['task']}", show_header=False)
    table.add_row("checkpoint", report["checkpoint"])
    samples = f"{report['train_samples']}"
    if oracle:
        samples += f" (without {report['task_removal']}: the retrain oracle's data)"
    table.add_row("training samples", samples)
    table.add_row("test accuracy", f"{report['acc_test']:.2f}% (every test sample)")
    for key, value in report["task_metrics"].items():
        table.add_row(key, f"{value:.2f}%")
    if "poisoned" in report:
        table.add_row("poisoned samples", f"{report['poisoned']} (for removal.poison_indices)")
    table.add_row("seconds", f"{report['seconds']:.1f}")
    console.print(table)
    for line in report["notes"]:
        console.print(f"note: {line}", highlight=False, markup=False, soft_wrap=True)
    if oracle:
        console.print(
            f"The oracle never saw {report['task_removal']}: its low accuracy there is the "
            "target an edit is compared with.",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("train", epilog=EPILOG)(train)
