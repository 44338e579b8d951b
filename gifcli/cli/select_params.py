"""``gif select-params``: choose the target parameters and save them as a mask."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gifcli.cli.common import (
    CONFIG_ARG,
    FORCE_OPT,
    JSON_OPT,
    OVERRIDES_ARG,
    console,
    handle_errors,
    print_json,
    read_config,
)

EPILOG = """Examples:

  gif select-params configs/digits.yaml -o runs/digits/mask.safetensors

  gif select-params configs/digits.yaml selection.method=top-gradients \\
    selection.ratio=0.1 -o runs/digits/mask-gradients.safetensors --json
"""


@handle_errors
def select_params(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    output: Path = typer.Option(
        None, "-o", "--output", help="Mask to write; default: output.dir/mask.safetensors."
    ),
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
) -> None:
    """Select the target parameters from the removal set's statistics and save the mask."""
    cfg = read_config(config, overrides)
    from gifcli.runs import run_select

    report = run_select(config=cfg, output=output, force=force)
    if json_output:
        print_json(report)
        return
    table = Table(
        title=f"{report['selection']['method']} at ratio "
        f"{report['selection']['ratio']:g} ({report['removal']})"
    )
    for name in ("layer", "type", "parameters", "selected", "fraction", "units"):
        table.add_column(name, justify="left" if name in ("layer", "type") else "right")
    for row in report["layers"]:
        table.add_row(
            row["layer"],
            row["type"],
            str(row["parameters"]),
            str(row["selected"]),
            f"{100 * row['fraction']:.2f}%",
            "" if row["units"] is None else str(row["units"]),
        )
    table.add_row(
        "total",
        "",
        str(report["parameters"]),
        str(report["selected"]),
        f"{100 * report['fraction']:.2f}%",
        "",
        style="bold",
    )
    console.print(table)
    console.print(f"mask: {report['mask']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("select-params", epilog=EPILOG)(select_params)
