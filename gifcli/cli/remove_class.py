"""``gif remove-class``: forget one or more classes."""

from __future__ import annotations

import typer

from gifcli.cli.common import EXIT_CODES, edit_command

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


@edit_command
def remove_class(
    classes: list[int] = typer.Option(
        None, "--class", "-k", help="Class to forget (repeatable); overrides removal.classes."
    ),
) -> list[str]:
    """Make the model forget the training samples of the given classes."""
    return [f"removal.classes={list(classes)}"] if classes else []


def register(app: typer.Typer) -> None:
    # named after the function, `remove-class`: the task's name (tests/test_cli.py checks it)
    app.command(epilog=f"{EPILOG}\n{EXIT_CODES}")(remove_class)
