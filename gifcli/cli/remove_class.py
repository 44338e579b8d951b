"""``gif remove-class``: forget one or more classes."""

from __future__ import annotations

from pathlib import Path

import typer

from gifcli.checks import edit_report_schema
from gifcli.cli.common import (
    CHECK_OPT,
    CONFIG_ARG,
    EXIT_CODES,
    FORCE_OPT,
    JSON_OPT,
    MASK_OPT,
    ORACLE_OPT,
    OVERRIDES_ARG,
    QUIET_OPT,
    finish_checks,
    handle_errors,
    parse_check_options,
    print_edit_report,
    print_json,
    progress_factory,
    read_config,
)
from gifcli.tasks import REMOVE_CLASS
from gifcli.unlearn import run_unlearning

EPILOG = """Examples:

  gif remove-class configs/digits.yaml

  gif remove-class configs/digits.yaml --class 3 --class 5 --oracle runs/oracle.safetensors

  gif remove-class configs/digits.yaml influence.method=fif selection.ratio=0.1 --force --json

  gif remove-class configs/digits.yaml --quiet --check 'after.forget_acc_test<=1' \\
    --check 'after.retain_acc_test>=before.retain_acc_test-1'
"""


@handle_errors
def remove_class(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    classes: list[int] = typer.Option(None, "--class", "-k", help="Class to forget "
                                      "(repeatable); overrides removal.classes."),
    mask: Path = MASK_OPT,
    oracle: Path = ORACLE_OPT,
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
    checks: list[str] = CHECK_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Make the model forget the training samples of the given classes."""
    extra = [f"removal.classes={list(classes)}"] if classes else []
    cfg = read_config(config, [*(overrides or []), *extra])
    schema = edit_report_schema(REMOVE_CLASS, oracle=oracle is not None)
    gates = parse_check_options(checks, schema)
    report = run_unlearning(config=cfg, task=REMOVE_CLASS, mask_path=mask, oracle=oracle,
                            force=force, progress=progress_factory(not (json_output or quiet)),
                            checks=gates)
    if json_output:
        print_json(report)
    elif not quiet:
        print_edit_report(report)
    finish_checks(report["checks"], table=not (json_output or quiet))


def register(app: typer.Typer) -> None:
    app.command("remove-class", epilog=f"{EPILOG}\n{EXIT_CODES}")(remove_class)
