"""``gif recover-backdoor``: repair a backdoored checkpoint."""

from __future__ import annotations

import typer

from gifcli.cli.common import EXIT_CODES, edit_command

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


@edit_command
def recover_backdoor() -> list[str]:
    """Repair a backdoored model from its poisoned samples or its known trigger.

    The poisoned samples are removed with their poisoned labels and re-added with their true
    labels (known samples, or samples synthesised from the known trigger).
    """
    return []  # no option of its own: the config says what is known


def register(app: typer.Typer) -> None:
    # named after the function, `recover-backdoor`: the task's name (tests/test_cli.py checks it)
    app.command(epilog=f"{EPILOG}\n{EXIT_CODES}")(recover_backdoor)
