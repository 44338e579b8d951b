"""``gif remove-samples``: forget arbitrary training samples."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from gifcli.cli.common import EXIT_CODES, edit_command

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


@edit_command
def remove_samples(
    indices: Path = typer.Option(
        None,
        "--indices",
        help="File of training indices to forget (.txt one per line, .npy, .json); overrides "
        "removal.indices and removal.random.",
    ),
) -> list[str]:
    """Make the model forget a list of training samples, or a random share of them.

    Judged against the retrain oracle (`gif train --retrain`): the target of every metric is
    the oracle's value, not 0.
    """
    # a JSON string is a YAML string, so a path such as `123` or `yes.txt` stays a path
    return [f"removal.indices={json.dumps(str(indices))}", "removal.random=null"] if indices else []


def register(app: typer.Typer) -> None:
    # named after the function, `remove-samples`: the task's name (tests/test_cli.py checks it)
    app.command(epilog=f"{EPILOG}\n{EXIT_CODES}")(remove_samples)
