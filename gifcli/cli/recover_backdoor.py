"""``gif recover-backdoor``: repair a backdoored checkpoint."""

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
from gifcli.tasks import RECOVER_BACKDOOR
from gifcli.unlearn import run_unlearning

EPILOG = """Examples:

  gif recover-backdoor configs/digits-backdoor.yaml

  gif recover-backdoor configs/digits-backdoor.yaml removal.poison_indices=poisoned.txt

  gif recover-backdoor configs/digits-backdoor.yaml removal.synthetic_samples=200 --force

  gif recover-backdoor configs/digits-backdoor.yaml --quiet --check 'after.asr_test<=5' \\
    --check 'after.clean_acc_test>=before.clean_acc_test-2'
"""


@handle_errors
def recover_backdoor(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    mask: Path = MASK_OPT,
    oracle: Path = ORACLE_OPT,
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
    checks: list[str] = CHECK_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Remove the backdoor: poisoned samples are removed with their poisoned labels and re-added
    with their true labels (known samples, or samples synthesised from the known trigger)."""
    cfg = read_config(config, overrides)
    schema = edit_report_schema(RECOVER_BACKDOOR, oracle=oracle is not None)
    gates = parse_check_options(checks, schema)
    report = run_unlearning(config=cfg, task=RECOVER_BACKDOOR, mask_path=mask, oracle=oracle,
                            force=force, progress=progress_factory(not (json_output or quiet)),
                            checks=gates)
    if json_output:
        print_json(report)
    elif not quiet:
        print_edit_report(report)
    finish_checks(report["checks"], table=not (json_output or quiet))


def register(app: typer.Typer) -> None:
    app.command("recover-backdoor", epilog=f"{EPILOG}\n{EXIT_CODES}")(recover_backdoor)
