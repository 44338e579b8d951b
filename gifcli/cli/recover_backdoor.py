"""``gif recover-backdoor``: repair a backdoored checkpoint."""

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

  gif recover-backdoor configs/digits-backdoor.yaml \\
    -o runs/digits-backdoor/known

  gif recover-backdoor configs/digits-backdoor.yaml \\
    removal.poison_indices=runs/digits-backdoor/base.poisoned.txt \\
    -o runs/digits-backdoor/listed

  gif recover-backdoor configs/digits-backdoor.yaml \\
    removal.synthetic_samples=200 -o runs/digits-backdoor/trigger-only

  gif recover-backdoor configs/digits-backdoor.yaml \\
    -o runs/digits-backdoor/checked --quiet --check 'after.asr_test<=5' \\
    --check 'after.clean_acc_test>=before.clean_acc_test-2'
"""


@handle_errors
def recover_backdoor(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    mask: Path = MASK_OPT,
    oracle: Path = ORACLE_OPT,
    output_dir: Path = OUTPUT_DIR_OPT,
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
    checks: list[str] = CHECK_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Repair a backdoored model from its poisoned samples or its known trigger.

    The poisoned samples are removed with their poisoned labels and re-added with their true
    labels (known samples, or samples synthesised from the known trigger).
    """
    cfg = read_config(config, overrides, output_dir=output_dir)
    from gifcli.tasks import RecoverBackdoor

    run_edit(
        task=RecoverBackdoor.name,
        config=cfg,
        mask=mask,
        oracle=oracle,
        force=force,
        json_output=json_output,
        checks=checks,
        quiet=quiet,
    )


def register(app: typer.Typer) -> None:
    # named after the function, `recover-backdoor`: the task's name (tests/test_cli.py checks it)
    app.command(epilog=f"{EPILOG}\n{EXIT_CODES}")(recover_backdoor)
