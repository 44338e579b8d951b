"""What every command shares: stderr console, error handling, config arguments, progress.

The command modules import the engine (torch and everything built on it) inside the functions
that run it, once the config is read, never at the top: ``gif --help``, ``gif COMMAND --help``,
``gif --version``, ``gif configs`` and ``gif init`` then start without torch (tests/test_cli.py
checks it), and a config error is reported before torch is loaded.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_type_hints

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gifcli import distributed, outputs
from gifcli.checks import (
    Check,
    CheckError,
    edit_report_schema,
    failed_checks,
    parse_checks,
    validate_checks,
)
from gifcli.cli.failures import unexpected_error_line
from gifcli.config import Config, load_config
from gifcli.errors import GifError, UsageError
from gifcli.records import format_value

# Rich prints plain text without escape codes when stderr is not a terminal, and honours
# NO_COLOR and FORCE_COLOR. Under torchrun only rank 0 prints (``speak_for_rank``); the other
# ranks speak up only to report an error (it may be theirs alone), naming their rank.
console = Console(stderr=True)
error_console = Console(stderr=True)


def speak_for_rank() -> None:
    """Quiet every rank but rank 0 (called as each command starts, not at import)."""
    console.quiet = not distributed.is_main()


def error_prefix() -> str:
    return "error:" if distributed.is_main() else f"error (rank {distributed.rank()}):"


EXIT_CODES = (
    "Exit codes: 0 success, every --check holds; 1 a problem with the inputs or the "
    "run; 2 usage error (also a malformed --check or an unknown report path); 3 the "
    "run finished and wrote its outputs, but a --check failed."
)
EVALUATE_EXIT_CODES = (
    "Exit codes: 0 success, every --check holds; 1 a problem with the inputs; 2 usage error "
    "(also a malformed --check or an unknown metric); 3 the metrics were measured (and "
    "printed), but a --check failed."
)

CONFIG_ARG = typer.Argument(
    ...,
    metavar="CONFIG",
    help="YAML config (`gif configs` lists the shipped ones).",
    show_default=False,
)
OVERRIDES_ARG = typer.Argument(
    None,
    metavar="KEY=VALUE",
    help="Dotted config overrides, e.g. selection.ratio=0.1.",
    show_default=False,
)
JSON_OPT = typer.Option(False, "--json", help="Print the report as JSON on stdout only.")
FORCE_OPT = typer.Option(False, "--force", help="Overwrite existing outputs.")
MASK_OPT = typer.Option(
    None, "--mask", help="Target mask saved by `gif select-params` (instead of selecting anew)."
)
ORACLE_OPT = typer.Option(
    None,
    "--oracle",
    help="Retrain-oracle checkpoint (`gif train --retrain`): adds its metrics and the gap on each.",
)
OUTPUT_DIR_OPT = typer.Option(
    None, "-o", "--output-dir", help="Folder for the outputs; overrides output.dir."
)
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="Print only errors and failed checks.")


def check_option(gated: str, examples: str) -> Any:
    """The repeatable ``--check EXPR`` option of a command whose ``gated`` output it gates."""
    return typer.Option(
        None,
        "--check",
        metavar="EXPR",
        help=f"Gate on the {gated} (repeatable), e.g. {examples}: exit code 3 when one fails.",
        show_default=False,
    )


def checkpoint_option(help: str) -> Any:
    """The required ``--checkpoint``/``-c`` option of a command that reads one."""
    return typer.Option(..., "--checkpoint", "-c", help=help, show_default=False)


CHECK_OPT = check_option("report", "'after.forget_acc_test<=1', 'gap.mean<=2', 'solver.ok==true'")
EVALUATE_CHECK_OPT = check_option("metrics", "'acc_test>=95', 'per_class_acc_test.3<=1'")


def _plain_flags(params: list) -> list:
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""  # a flag takes no value: no ``<bool>`` beside it
    return params


class Command(typer.core.TyperCommand):
    """Usage and help as users read them: ``CONFIG [KEY=VALUE]...`` (a required argument
    plain, not ``{CONFIG}``) and no value type beside a flag."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]

    def get_params(self, ctx: Any) -> list:
        return _plain_flags(super().get_params(ctx))


class Group(typer.core.TyperGroup):
    """``gif --help`` likewise."""

    def get_params(self, ctx: Any) -> list:
        return _plain_flags(super().get_params(ctx))


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """The outermost handler: a GifError is one line on stderr and exit code 1, a malformed
    override exit code 2, an interrupt says what was written, and any other exception is one
    line too (``GIF_DEBUG=1`` shows its traceback). Never a traceback otherwise."""

    def fail(message: str, code: int) -> typer.Exit:
        error_console.print(
            f"[bold red]{error_prefix()}[/] {escape(message)}", highlight=False, soft_wrap=True
        )
        return typer.Exit(code)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outputs.forget_history()
        speak_for_rank()
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_note
                return command(*args, **kwargs)
        except typer.Exit:
            raise
        except UsageError as exc:
            raise fail(str(exc), 2) from None
        except GifError as exc:
            raise fail(str(exc), 1) from None
        except KeyboardInterrupt as exc:
            console.print(
                f"[bold red]interrupted[/]: {escape(outputs.outcome())}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None
        except (typer.TyperException, typer.Abort):  # usage errors: Typer prints them, exit 2
            raise
        except Exception as exc:
            if os.environ.get("GIF_DEBUG") == "1":
                raise
            raise fail(unexpected_error_line(exc), 1) from None

    return wrapper


def _warning_note(
    message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
) -> None:
    """A library's warning (torch's UserWarning) as one plain note, not Python's two lines
    of source."""
    note(f"{category.__name__}: {' '.join(str(message).split())}")


def note(message: str) -> None:
    console.print(f"note: {message}", highlight=False, markup=False, soft_wrap=True)


def read_config(
    path: Path, overrides: list[str] | None, *, output_dir: Path | None = None
) -> Config:
    config = load_config(path, overrides or [])
    if output_dir is not None:
        config.output.dir = str(output_dir)
    return config


def print_json(report: dict) -> None:
    if not distributed.is_main():  # one report on stdout, however many ranks
        return
    sys.stdout.write(outputs.json_text(report))


@contextmanager
def progress_bar(
    description: str, total: int | None, *, enabled: bool = True
) -> Iterator[Callable[..., None]]:
    """A Rich progress bar on stderr; yields ``advance(completed=None, **fields)``."""
    if not enabled or not console.is_terminal or console.quiet:  # CI logs, pipes, rank > 0
        yield lambda *args, **kwargs: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(completed: int | None = None, info: str = "") -> None:
            if completed is None:
                bar.advance(task)
            else:
                bar.update(task, completed=completed)
            if info:
                bar.update(task, info=info)

        yield advance


def progress_factory(enabled: bool) -> Callable[[str, int | None], Any]:
    """The core's progress hook: ``factory(description, total)`` -> a progress context."""
    return lambda description, total: progress_bar(description, total, enabled=enabled)


def print_edit_report(report: dict) -> None:
    """The before/after(/oracle/gap) table of an edit, and where its outputs are."""
    from gifcli.report import metrics_rows, salun_rows, summary_lines

    tables = [(f"gif {report['task']} ({report['method']})", metrics_rows(report["metrics"]))]
    if (protocol := salun_rows(report["metrics"])) is not None:
        tables.append(("SalUn protocol", protocol))
    for title, (header, rows) in tables:
        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in summary_lines(report):
        console.print(line, highlight=False)
    console.print(f"outputs: {Path(report['checkpoint']['output']).parent}", highlight=False)


def parse_check_options(texts: list[str] | None, schema: dict | None = None) -> list[Check]:
    """Parse the --check options and find their paths in the report's schema (without one,
    only their syntax is checked), before the run: a malformed check or an unknown path is a
    usage error (exit 2)."""
    try:
        checks = parse_checks(texts)
        if schema is not None:
            validate_checks(checks, schema)
    except CheckError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--check'") from None
    return checks


def show_report(
    report: dict, printer: Callable[[dict], None], *, json_output: bool, quiet: bool
) -> None:
    """A command's report: as JSON on stdout (``--json``), else through ``printer`` unless
    ``--quiet``; then its checks (``finish_checks``), if it has any."""
    if json_output:
        print_json(report)
    elif not quiet:
        printer(report)
    finish_checks(report.get("checks", []), table=not (json_output or quiet))


def finish_checks(results: list[dict], *, table: bool) -> None:
    """Print the checks (a table of all, or only the failed ones) and exit 3 when one failed,
    2 when one names a path the report lacks."""
    if not results:
        return
    failures = failed_checks(results)
    if table:
        checks = Table(title="checks")
        for name in ("check", "left", "right", "result"):
            checks.add_column(name, justify="left" if name == "check" else "right", overflow="fold")
        for result in results:
            verdict = "[green]pass[/]" if result["passed"] else "[bold red]FAIL[/]"
            checks.add_row(
                escape(result["expression"]),
                format_value(result["left"]),
                format_value(result["right"]),
                verdict,
            )
        console.print(checks, highlight=False)
    else:
        for result in failures:
            if "error" not in result:
                console.print(
                    f"check failed: {result['expression']} (left "
                    f"{format_value(result['left'])}, right "
                    f"{format_value(result['right'])})",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
    errors = [result["error"] for result in results if "error" in result]
    for error in errors:
        console.print(
            f"[bold red]error:[/] --check {escape(error)}", highlight=False, soft_wrap=True
        )
    if errors:
        raise typer.Exit(2)
    if failures:
        if table:
            console.print(
                f"[bold red]{len(failures)} of {len(results)} checks failed[/]", highlight=False
            )
        raise typer.Exit(3)


def edit_command(options: Callable[..., list[str]]) -> Callable[..., None]:
    """The command ``gif TASK`` of the task named like ``options`` (``remove_class``: ``gif
    remove-class``), made from it: its docstring is the command's help, its parameters are the
    task's own options (after CONFIG and KEY=VALUE, before those every edit command shares) and
    it returns the config overrides they stand for. The command validates the checks, runs the
    edit, prints the report and exits by the checks' verdict."""
    task = options.__name__.replace("_", "-")
    own = inspect.signature(options).parameters
    hints = get_type_hints(options)
    shared = {
        "mask": (Path, MASK_OPT),
        "oracle": (Path, ORACLE_OPT),
        "output_dir": (Path, OUTPUT_DIR_OPT),
        "force": (bool, FORCE_OPT),
        "json_output": (bool, JSON_OPT),
        "checks": (list[str], CHECK_OPT),
        "quiet": (bool, QUIET_OPT),
    }
    parameters = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for name, (kind, default) in {
            "config": (Path, CONFIG_ARG),
            "overrides": (list[str], OVERRIDES_ARG),
            **{name: (hints[name], p.default) for name, p in own.items()},
            **shared,
        }.items()
    ]

    def command(**kwargs: Any) -> None:
        from gifcli.runs import run_edit
        from gifcli.tasks import task_type

        given = {name: kwargs.pop(name) for name in own}
        overrides = [*(kwargs["overrides"] or []), *options(**given)]
        config = read_config(kwargs["config"], overrides, output_dir=kwargs["output_dir"])
        quiet, json_output, oracle = kwargs["quiet"], kwargs["json_output"], kwargs["oracle"]
        kind = task_type(task)
        schema = edit_report_schema(
            kind.metric_keys, oracle=oracle is not None, salun=kind.salun_sources is not None
        )
        gates = parse_check_options(kwargs["checks"], schema)
        report = run_edit(
            config=config,
            command=task,
            mask_path=kwargs["mask"],
            oracle=oracle,
            force=kwargs["force"],
            progress=progress_factory(not (json_output or quiet)),
            checks=gates,
            note=(lambda message: None) if quiet else note,
        )
        show_report(report, print_edit_report, json_output=json_output, quiet=quiet)

    command.__name__ = command.__qualname__ = options.__name__
    command.__doc__ = options.__doc__
    command.__signature__ = inspect.Signature(parameters)  # what Typer reads
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return handle_errors(command)
