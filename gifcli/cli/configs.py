"""``gif configs`` and ``gif init``: the shipped configs, and a copy of one to edit."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gifcli.cli.common import FORCE_OPT, JSON_OPT, console, handle_errors, print_json
from gifcli.shipped import init_config, shipped_configs

CONFIGS_EPILOG = """Example:

  gif configs
"""
INIT_EPILOG = """Examples:

  gif init digits -o my-digits.yaml

  gif init digits-backdoor -o my-backdoor.yaml --force
"""


@handle_errors
def configs(json_output: bool = JSON_OPT) -> None:
    """List the configs shipped with gif (copy one to edit with `gif init NAME`)."""
    found = shipped_configs()
    if json_output:
        print_json([{"name": c.name, "path": str(c.path), "summary": c.summary} for c in found])
        return
    table = Table(title="shipped configs")
    table.add_column("name")
    table.add_column("what it runs")
    for config in found:
        table.add_row(config.name, config.summary)
    console.print(table)
    console.print("copy one to edit: gif init NAME -o my-config.yaml", highlight=False)


@handle_errors
def init(
    name: str = typer.Argument(
        ..., help="A shipped config (see `gif configs`).", show_default=False
    ),
    output: Path = typer.Option(
        None, "-o", "--output", help="Where to write the copy; default: NAME.yaml here."
    ),
    force: bool = FORCE_OPT,
) -> None:
    """Copy a shipped config to a file of your own, to edit."""
    written = init_config(name, output, force=force)
    console.print(f"wrote {written}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("configs", epilog=CONFIGS_EPILOG)(configs)
    app.command("init", epilog=INIT_EPILOG)(init)
