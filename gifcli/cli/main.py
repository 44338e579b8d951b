"""``gif``: the Typer application; each command lives in its own module."""

from __future__ import annotations

import typer

from gifcli import __version__
from gifcli.cli import (
    audit,
    configs,
    evaluate,
    recover_backdoor,
    remove_class,
    remove_samples,
    restore_sigint,
    select_params,
    train,
)
from gifcli.cli.common import EXIT_CODES, Command, Group

app = typer.Typer(
    name="gif",
    cls=Group,
    help="Make a trained PyTorch classifier forget part of its training data with Generalized "
    "Influence Functions.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gif {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Exit codes: 0 success (and every --check holds), 1 a problem with the inputs or the run,
    2 usage error (also a malformed --check), 3 the run finished (an edit: its outputs written)
    but a --check failed."""


for module in (
    train,
    select_params,
    remove_class,
    recover_backdoor,
    remove_samples,
    evaluate,
    audit,
    configs,
):
    module.register(app)
for registered in app.registered_commands:  # every command's usage and help (Command)
    registered.cls = Command

restore_sigint()  # every command is imported: Ctrl-C is a KeyboardInterrupt again
