"""``gif audit``: a per-sample membership audit of a checkpoint against reference models."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from gifcli.checks import audit_report_schema
from gifcli.cli.common import (
    CONFIG_ARG,
    EXIT_CODES,
    FORCE_OPT,
    JSON_OPT,
    OVERRIDES_ARG,
    QUIET_OPT,
    check_option,
    checkpoint_option,
    console,
    handle_errors,
    note,
    parse_check_options,
    progress_factory,
    read_config,
    show_report,
)

EPILOG = """Examples:

  gif audit configs/digits-samples.yaml \\
    --checkpoint runs/digits-samples/random-5/model.safetensors

  gif audit configs/digits-samples.yaml -c runs/digits-samples/base.safetensors \\
    -o runs/digits-samples/base-gated --quiet --check 'audit.auc<=retrained.auc+0.1'

Reference models are cached in audit.cache (default: references/ beside the output folder)
by content: another audit of the same config and removal set reuses them.
"""


@handle_errors
def audit(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    checkpoint: Path = checkpoint_option(
        "Checkpoint to audit (an edit's model.safetensors, or any checkpoint)."
    ),
    removed: Path = typer.Option(
        None,
        "--removed",
        help="File of removed training indices (as remove-samples --indices); default: the "
        "removal set the checkpoint was edited for, else the config's.",
    ),
    output_dir: Path = typer.Option(
        None,
        "-o",
        "--output-dir",
        help="Folder for the audit's outputs; default: DIR-audit beside an edit's folder DIR.",
    ),
    force: bool = FORCE_OPT,
    json_output: bool = JSON_OPT,
    checks: list[str] = check_option(
        "report", "'audit.auc<=retrained.auc+0.05', 'audit.forgetting_score>=0.5'"
    ),
    quiet: bool = QUIET_OPT,
) -> None:
    """Does the model still remember the removed samples? Each removed sample's confidence is
    scored against reference models trained with it and without it (a likelihood-ratio
    attack), beside what the retrained references score."""
    extra = (
        [f"removal.indices={json.dumps(str(removed))}", "removal.random=null"] if removed else []
    )
    cfg = read_config(config, [*(overrides or []), *extra])
    gates = parse_check_options(checks, audit_report_schema())
    from gifcli.audit import run_audit

    report = run_audit(
        config=cfg,
        checkpoint=checkpoint,
        output_dir=output_dir,
        force=force,
        progress=progress_factory(not (json_output or quiet)),
        checks=gates,
        removal_given=bool(removed) or any(o.startswith("removal.") for o in overrides or []),
        note=(lambda message: None) if quiet else note,
    )
    show_report(report, print_audit, json_output=json_output, quiet=quiet)


def print_audit(report: dict) -> None:
    from gifcli.audit import summary_rows

    refs = report["references"]
    table = Table(title=f"gif audit: {report['checkpoint']} ({report['task']})")
    for name in ("measure", "audited", "retrained"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(
        f"{refs['removed']} removed vs {refs['held_out']} held-out samples; {refs['count']} "
        f"references ({refs['trained']} trained, {refs['cached']} cached in {refs['cache']}); "
        f"{report['seconds']:.1f} s",
        highlight=False,
        markup=False,
    )
    console.print(f"outputs: {report['output']}", highlight=False, markup=False)
    for line in report["notes"]:
        console.print(f"note: {line}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("audit", epilog=f"{EPILOG}\n{EXIT_CODES}")(audit)
