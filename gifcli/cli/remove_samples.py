"""``gif remove-samples``: forget arbitrary training samples."""

from __future__ import annotations

import json
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

  gif remove-samples configs/digits-samples.yaml \\
    --oracle runs/digits-samples/oracle.safetensors -o runs/digits-samples/random-5

  gif remove-samples configs/digits-samples.yaml \\
    --indices configs/digits-deletion-request.txt -o runs/digits-samples/request

  gif remove-samples configs/digits-samples.yaml -o runs/digits-samples/checked \\
    --oracle runs/digits-samples/oracle.safetensors --quiet \\
    --check 'gap.forget_acc_train<=3' --check 'after.acc_test>=before.acc_test-1'

Indices count the samples of the data set's training split from 0, before the validation
split is held out; every listed sample is removed (one that a held-out validation split would
hold is taken out of it).
"""


@handle_errors
def remove_samples(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    indices: Path = typer.Option(
        None,
        "--indices",
        help="File of training indices to forget (.txt one per line, .npy, .json); overrides "
        "removal.indices and removal.random.",
    ),
    mask: Path = MASK_OPT,
    oracle: Path = ORACLE_OPT,
    output_dir: Path = OUTPUT_DIR_OPT,
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
    checks: list[str] = CHECK_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Make the model forget a list of training samples, or a random share of them.

    Judged against the retrain oracle (`gif train --retrain`): the target of every metric is
    the oracle's value, not 0.
    """
    # a JSON string is a YAML string, so a path such as `123` or `yes.txt` stays a path
    extra = (
        [f"removal.indices={json.dumps(str(indices))}", "removal.random=null"] if indices else []
    )
    cfg = read_config(config, [*(overrides or []), *extra], output_dir=output_dir)
    from gifcli.tasks import RemoveSamples

    run_edit(
        task=RemoveSamples.name,
        config=cfg,
        mask=mask,
        oracle=oracle,
        force=force,
        json_output=json_output,
        checks=checks,
        quiet=quiet,
    )


def register(app: typer.Typer) -> None:
    # named after the function, `remove-samples`: the task's name (tests/test_cli.py checks it)
    app.command(epilog=f"{EPILOG}\n{EXIT_CODES}")(remove_samples)
