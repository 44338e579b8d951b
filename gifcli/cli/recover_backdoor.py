"""``gif recover-backdoor``: repair a backdoored checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from gifcli.cli.common import (
    CONFIG_ARG,
    FORCE_OPT,
    JSON_OPT,
    MASK_OPT,
    ORACLE_OPT,
    OVERRIDES_ARG,
    handle_errors,
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
"""


@handle_errors
def recover_backdoor(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    mask: Path = MASK_OPT,
    oracle: Path = ORACLE_OPT,
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
) -> None:
    """Remove the backdoor: poisoned samples are removed with their poisoned labels and re-added
    with their true labels (known samples, or samples synthesised from the known trigger)."""
    cfg = read_config(config, overrides)
    report = run_unlearning(config=cfg, task=RECOVER_BACKDOOR, mask_path=mask, oracle=oracle,
                            force=force, progress=progress_factory(not json_output))
    if json_output:
        print_json(report)
    else:
        print_edit_report(report)


def register(app: typer.Typer) -> None:
    app.command("recover-backdoor", epilog=EPILOG)(recover_backdoor)
