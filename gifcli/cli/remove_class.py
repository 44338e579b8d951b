"""``gif remove-class``: forget one or more classes."""

from __future__ import annotations

from pathlib import Path

import typer

from gifcli.cli.common import (
    CHECK_OPT,
    CONFIG_ARG,
    EXIT_CODES,
    FORCE_OPT,
    JSON_OPT,
    MASK_OPT,
    ORACLE_OPT,
    OUTPUT_DIR_OPT,
    OVERRIDES_ARG,
    QUIET_OPT,
    handle_errors,
    read_config,
    run_edit,
)

EPILOG = """Examples:

  gif remove-class configs/digits.yaml \\
    --oracle runs/digits/oracle.safetensors -o runs/digits/forget-3

  gif remove-class configs/digits.yaml --class 3 --class 5 \\
    influence.method=fif -o runs/digits/forget-3-5

  gif remove-class configs/digits.yaml \\
    --oracle runs/digits/oracle.safetensors -o runs/digits/gated \\
    --check 'after.forget_acc_test<=1' \\
    --check 'after.retain_acc_test>=before.retain_acc_test-2' \\
    --check 'gap.mean<=3' --check 'params.fraction<=0.05' \\
    --check 'solver.ok==true'
"""


@handle_errors
def remove_class(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    classes: list[int] = typer.Option(
        None, "--class", "-k", help="Class to forget (repeatable); overrides removal.classes."
    ),
    mask: Path = MASK_OPT,
    oracle: Path = ORACLE_OPT,
    output_dir: Path = OUTPUT_DIR_OPT,
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
    checks: list[str] = CHECK_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Make the model forget the training samples of the given classes."""
    extra = [f"removal.classes={list(classes)}"] if classes else []
    cfg = read_config(config, [*(overrides or []), *extra], output_dir=output_dir)
    from gifcli.tasks import RemoveClass

    run_edit(
        task=RemoveClass.name,
        config=cfg,
        mask=mask,
        oracle=oracle,
        force=force,
        json_output=json_output,
        checks=checks,
        quiet=quiet,
    )


def register(app: typer.Typer) -> None:
    # named after the function, `remove-class`: the task's name (tests/test_cli.py checks it)
    app.command(epilog=f"{EPILOG}\n{EXIT_CODES}")(remove_class)
