"""``--check`` gates: small comparisons on a report that decide a CI build, never ``eval``.

Grammar (spaces are ignored)::

    check := sum OP sum                   OP: <  <=  >  >=  ==  !=
    sum   := term (('+' | '-') term)*
    term  := ['-'] number | true | false | path
    path  := name ('.' (name | index))*   name: [A-Za-z_][A-Za-z0-9_]*, index: 0, 1, ...

A path is looked up from the report's root (``params.fraction``, ``solver.converged``); when its
first name is not a root key it is looked up under ``metrics``, so in an edit report
``after.f1`` is ``metrics.after.f1`` and ``gap.mean`` is ``metrics.gap.mean``, and in
``gif evaluate``'s report ``acc_test`` is ``metrics.acc_test``. An index picks a list element
(``after.per_class_acc_test.3``). Booleans compare only with ``==`` and ``!=`` and take no
arithmetic; ``==`` on numbers is exact.

Paths are checked twice: before a run against the report's known structure (a schema, so that a
typo fails at once rather than after the solve), and after it against the report itself.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gifcli.errors import GifError
from gifcli.records import FIDELITY_KEYS, SALUN_KEYS, AuditReport, EditReport, EvaluateReport

COMPARISONS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
EXAMPLE = "a check looks like 'after.forget_acc_test<=1'"

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<path>[A-Za-z_][A-Za-z0-9_]*(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|\d+))*)
  | (?P<op><=|>=|==|!=|<|>)
  | (?P<sign>[+-])
""",
    re.VERBOSE,
)


class CheckError(GifError):
    """A check that cannot be parsed, names a path the report does not have, or compares values
    of different kinds: a usage error (exit code 2)."""


@dataclass(frozen=True)
class ReportPath:
    """A dotted path into a report: names (dict keys) and indices (list positions)."""

    parts: tuple[str | int, ...]

    def __str__(self) -> str:
        return ".".join(str(part) for part in self.parts)


Term = int | float | bool | ReportPath
Sum = tuple[tuple[int, Term], ...]  # (sign, term) pairs


@dataclass(frozen=True)
class Check:
    """``left op right``, each side a sum of signed terms; ``expression`` as the user wrote it."""

    expression: str
    left: Sum
    op: str
    right: Sum


# -- parsing ------------------------------------------------------------------------------------


def parse_check(text: str) -> Check:
    """Parse one ``--check`` expression; raises CheckError naming it and the column at fault."""
    tokens = _tokenize(text)
    position = 0

    def fail(expected: str) -> CheckError:
        if position < len(tokens):
            _, value, column = tokens[position]
            return CheckError(
                f"{text!r}: expected {expected}, found {value!r} at column {column + 1}; {EXAMPLE}"
            )
        return CheckError(f"{text!r}: expected {expected} at the end; {EXAMPLE}")

    def accept(kind: str) -> str | None:
        nonlocal position
        if position < len(tokens) and tokens[position][0] == kind:
            position += 1
            return tokens[position - 1][1]
        return None

    def term() -> tuple[int, Term]:
        sign = -1 if accept("sign") == "-" else 1
        if (number := accept("number")) is not None:
            return sign, float(number) if any(c in number for c in ".eE") else int(number)
        if (path := accept("path")) is None:
            raise fail("a number, true, false or a report path")
        if path in ("true", "false"):
            if sign < 0:
                raise CheckError(f"{text!r}: {path} cannot be negated")
            return sign, path == "true"
        return sign, ReportPath(tuple(int(p) if p.isdigit() else p for p in path.split(".")))

    def total() -> Sum:
        terms = [term()]
        while (sign := accept("sign")) is not None:
            negate, value = term()
            terms.append((negate * (-1 if sign == "-" else 1), value))
        return tuple(terms)

    left = total()
    if (op := accept("op")) is None:
        raise fail("a comparison (< <= > >= == !=)")
    right = total()
    if position < len(tokens):
        raise fail("the end of the check")
    check = Check(expression=text.strip(), left=left, op=op, right=right)
    _compare_kinds(
        check,
        *(_side_kind(check, [(s, _literal_kind(t)) for s, t in side]) for side in (left, right)),
    )
    return check


def parse_checks(texts: Iterable[str] | None) -> list[Check]:
    return [parse_check(text) for text in texts or ()]


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, column) triples; raises CheckError at the first character that fits none."""
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or (match.lastgroup == "op" and text.startswith("=", match.end())):
            column = position if match is None else match.end()
            hint = "; compare with '=='" if text[column] == "=" and match is None else ""
            raise CheckError(
                f"{text!r}: unexpected {text[column]!r} at column {column + 1}{hint}; {EXAMPLE}"
            )
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group(), position))
        position = match.end()
    if not tokens:
        raise CheckError(f"{text!r}: empty check; {EXAMPLE}")
    return tokens


# -- kinds: 'number', 'boolean', or None (not known before the run) ---------------------------


def _literal_kind(term: Term) -> str | None:
    if isinstance(term, ReportPath):
        return None
    return "boolean" if isinstance(term, bool) else "number"


def _value_kind(value: Any) -> str | None:
    if value is None:
        return None
    return "boolean" if isinstance(value, bool) else "number"


def _side_kind(check: Check, side: list[tuple[int, str | None]]) -> str | None:
    """The kind of a sum of (sign, kind) terms; booleans stand alone."""
    if any(kind == "boolean" for _, kind in side) and (len(side) > 1 or side[0][0] < 0):
        raise CheckError(f"{check.expression!r}: booleans take no arithmetic")
    return side[0][1] if len(side) == 1 else "number"


def _compare_kinds(check: Check, left: str | None, right: str | None) -> None:
    """Raise CheckError unless ``left op right`` compares like with like."""
    if "boolean" in (left, right) and check.op not in ("==", "!="):
        raise CheckError(f"{check.expression!r}: booleans compare only with == or !=")
    if {left, right} == {"boolean", "number"}:
        raise CheckError(f"{check.expression!r}: compares a boolean with a number")


# -- report structure ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A schema's value: 'number', 'boolean', 'text', or 'open' (anything, checked after)."""

    kind: str


@dataclass(frozen=True)
class ListOf:
    """A schema's list, any index of which is an ``item``."""

    item: Any


NUMBER, BOOLEAN, TEXT, OPEN = Leaf("number"), Leaf("boolean"), Leaf("text"), Leaf("open")


def _locate(path: ReportPath, root: dict) -> tuple[Any, ReportPath]:
    """Follow ``path`` from the root, or from ``metrics`` when its first name is not a root key;
    the node found (a report value, or a schema node) and the path from the root."""
    first, metrics = path.parts[0], root.get("metrics")
    if first not in root:
        if not isinstance(metrics, dict) or first not in metrics:
            hint = " (oracle and gap need --oracle)" if first in ("oracle", "gap") else ""
            groups = f"; metrics has {_names(metrics)}" if isinstance(metrics, dict) else ""
            raise CheckError(
                f"unknown report path {str(path)!r}: neither the report nor its "
                f"metrics have {first!r}{hint}; the report has {_names(root)}"
                f"{groups}"
            )
        path = ReportPath(("metrics", *path.parts))
    node = root
    for depth, part in enumerate(path.parts):
        where = str(ReportPath(path.parts[:depth])) or "the report"
        if node is OPEN:
            return OPEN, path
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, ListOf) and isinstance(part, int):
            node = node.item
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str):
            raise CheckError(
                f"unknown report path {str(path)!r}: {where} has no {part!r}; it has {_names(node)}"
            )
        elif isinstance(node, list | ListOf | dict):
            shape = (
                (f"has indices 0 to {len(node) - 1}" if node else "is empty")
                if isinstance(node, list)
                else "is a list; use an index"
                if isinstance(node, ListOf)
                else "is a group of values; use a name"
            )
            raise CheckError(f"unknown report path {str(path)!r}: {where} {shape}")
        else:
            raise CheckError(f"unknown report path {str(path)!r}: {where} is a single value")
    return node, path


def _names(node: dict) -> str:
    return ", ".join(map(str, node))


def _schema_kind(check: Check, term: ReportPath, schema: dict) -> str | None:
    node, path = _locate(term, schema)
    if node in (NUMBER, BOOLEAN):
        return node.kind
    if node is OPEN:
        return None
    shape = (
        "text"
        if node is TEXT
        else f"a list; add an index, e.g. {path}.0"
        if isinstance(node, ListOf)
        else f"a group of values; add one of {_names(node)}"
    )
    raise CheckError(f"report path {str(term)!r} is {shape}; checks compare numbers and booleans")


def validate_checks(checks: Sequence[Check], schema: dict) -> None:
    """Before a run: each path is in the report's ``schema`` (``edit_report_schema``,
    ``evaluate_report_schema``) and each check compares like with like; raises CheckError."""
    for check in checks:
        try:
            sides = [
                [
                    (
                        sign,
                        _schema_kind(check, term, schema)
                        if isinstance(term, ReportPath)
                        else _literal_kind(term),
                    )
                    for sign, term in side
                ]
                for side in (check.left, check.right)
            ]
        except CheckError as exc:
            raise CheckError(f"{check.expression!r}: {exc}") from None
        _compare_kinds(check, *(_side_kind(check, side) for side in sides))


# -- evaluation ----------------------------------------------------------------------------------


def evaluate_checks(checks: Sequence[Check], report: dict) -> list[dict]:
    """Evaluate each check on ``report``: ``{expression, left, right, passed}`` with the value of
    each side. A side that is missing (``None`` in the report) fails the check. A path the
    report lacks, or values that cannot be compared, fail it with ``error`` set (the CLI turns
    that into a usage error, exit code 2)."""
    results = []
    for check in checks:
        result = {"expression": check.expression, "left": None, "right": None, "passed": False}
        try:
            left, right = (
                _side_value(check, check.left, report),
                _side_value(check, check.right, report),
            )
            _compare_kinds(check, _value_kind(left), _value_kind(right))
        except CheckError as exc:
            result["error"] = str(exc)
        else:
            result.update(
                left=left,
                right=right,
                passed=left is not None
                and right is not None
                and bool(COMPARISONS[check.op](left, right)),
            )
        results.append(result)
    return results


def _side_value(check: Check, side: Sum, report: dict) -> int | float | bool | None:
    signed = []
    for sign, term in side:
        value = term
        if isinstance(term, ReportPath):
            try:
                value, _ = _locate(term, report)
            except CheckError as exc:
                raise CheckError(f"{check.expression!r}: {exc}") from None
            if value is not None and not isinstance(value, int | float | bool):
                raise CheckError(
                    f"{check.expression!r}: report path {str(term)!r} is "
                    f"{type(value).__name__}, not a number or boolean"
                )
        signed.append((sign, value))
    _side_kind(check, [(sign, _value_kind(value)) for sign, value in signed])
    if any(value is None for _, value in signed):
        return None
    if len(signed) == 1 and signed[0][0] > 0:
        return signed[0][1]
    return sum(sign * value for sign, value in signed)


def failed_checks(results: Sequence[dict]) -> list[dict]:
    return [result for result in results if not result["passed"]]


# -- report schemas: derived from the report dataclasses -----------------------------------------


def _schema_of(hint: Any) -> Any:
    """The schema node of a report field's type: a dataclass is a group of its fields."""
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return {f.name: _schema_of(hints[f.name]) for f in dataclasses.fields(hint)}
    options = [o for o in typing.get_args(hint) if o is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _schema_of(options[0]) if len(options) == 1 else OPEN
    origin = typing.get_origin(hint) or hint
    if origin is list:
        return ListOf(_schema_of(options[0]) if options else OPEN)
    if origin is bool:
        return BOOLEAN
    if origin in (int, float):
        return NUMBER
    if origin is str:
        return TEXT
    return OPEN


def metrics_schema(metric_keys: Sequence[str]) -> dict:
    """One metrics group of a task with scalar metrics ``metric_keys``."""
    return {**dict.fromkeys(metric_keys, NUMBER), "per_class_acc_test": ListOf(NUMBER)}


def edit_report_schema(metric_keys: Sequence[str], *, oracle: bool, salun: bool = False) -> dict:
    """The structure of an edit's report (``EditReport``) for a task's metrics; with an
    oracle, the fidelity metrics in every group, ``oracle`` and ``gap``; with ``salun`` (the
    task has the protocol), the ``salun`` group."""
    schema = _schema_of(EditReport)
    del schema["checks"]
    metrics = metrics_schema([*metric_keys, *(FIDELITY_KEYS if oracle else ())])
    groups = {"before": metrics, "after": metrics, "train_samples": NUMBER}
    if oracle:
        gap = {key: NUMBER for key, node in metrics.items() if node is NUMBER}
        groups.update(oracle=metrics, gap={**gap, "mean": NUMBER})
    if salun:
        protocol = dict.fromkeys(SALUN_KEYS, NUMBER)
        groups["salun"] = {"before": protocol, "after": protocol}
        if oracle:
            groups["salun"].update(oracle=protocol, gap={**protocol, "mean": NUMBER})
    schema["metrics"] = groups
    return schema


def evaluate_report_schema(metric_keys: Sequence[str], *, salun: bool = False) -> dict:
    """The structure of ``gif evaluate``'s report (``EvaluateReport``)."""
    schema = _schema_of(EvaluateReport)
    del schema["checks"]
    schema["metrics"] = metrics_schema(metric_keys)
    if salun:
        schema["salun"] = dict.fromkeys(SALUN_KEYS, NUMBER)
    else:
        del schema["salun"]
    return schema


def audit_report_schema() -> dict:
    """The structure of ``gif audit``'s report (``AuditReport``)."""
    schema = _schema_of(AuditReport)
    del schema["checks"]
    return schema
