"""The package's layers (docs/design.md, "Pipeline"): no module imports from a higher layer,
and no module outside ``gifcli/tasks`` asks which task it is running."""

import ast
from pathlib import Path

import pytest

from gifcli.tasks import TASK_NAMES

PACKAGE = Path(__file__).resolve().parents[1] / "gifcli"
LAYERS = {
    0: {"", "errors", "inputs", "config", "progress", "records"},
    1: {
        "data",
        "models",
        "checkpoint",
        "device",
        "distributed",
        "influence",
        "selection",
        "update",
        "metrics",
        "checks",
        "outputs",
        "cost",
        "membership",
    },
    2: {"tasks"},
    3: {"pipeline", "context", "report", "train", "runs", "shipped", "audit"},
    4: {"cli", "__main__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE
    )


def top(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported(path: Path) -> set[str]:
    """The first component under ``gifcli`` of every gifcli import in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "gifcli"
        ):
            parts = node.module.split(".")
            names.add(parts[1] if len(parts) > 1 else "")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gifcli":
                    names.add(parts[1] if len(parts) > 1 else "")
    return names


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_from_a_higher_layer(path):
    own = LAYER_OF[top(path)]
    higher = sorted(name for name in imported(path) if LAYER_OF[name] > own)
    assert not higher, f"{path.name} (layer {own}) imports {higher}"


def test_checks_depend_only_on_the_report_types():
    assert imported(PACKAGE / "checks.py") <= {"errors", "records"}


def test_only_the_task_package_names_tasks():
    """A task's name appears as a string only in its own class."""
    offenders = []
    for path in modules():
        if top(path) == "tasks":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders


STRATEGY_WORDS = {
    *("gif", "fif", "pif", "if", "sif", "first-order"),
    *("shift", "tikhonov"),
    *("hessian", "ggn"),
}
"""Names of an estimator, of a damping form and of a curvature."""
STRATEGY_KEYS = ("method", "damping", "scale", "step")
"""What a compared ``"auto"`` must not be: a damping mode or a step rule."""


def _strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return {s for element in node.elts for s in _strings(element)}
    return set()


def test_strategies_are_asked_as_objects_not_compared_as_strings():
    """An estimator, a curvature, a damping mode or a step rule is compared as a string only
    where the config is parsed (``config.py``); everywhere else the code asks the registries
    (``influence.estimators.estimator``, ``influence.hvp.curvature_kind``) or the typed
    settings (``Damping``, ``Step``)."""
    offenders = []
    for path in modules():
        if path == PACKAGE / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            words = set().union(*(_strings(o) for o in operands))
            text = ast.unparse(node)
            if words & STRATEGY_WORDS or (
                "auto" in words and any(key in text for key in STRATEGY_KEYS)
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text}")
    assert not offenders, "\n".join(offenders)


def test_the_registries_hold_what_the_config_accepts():
    from gifcli.config import CURVATURE_NAMES, INFLUENCE_METHODS, SOLVER_NAMES
    from gifcli.influence.estimators import ESTIMATORS
    from gifcli.influence.hvp import CURVATURES_BY_NAME
    from gifcli.influence.solvers import SOLVERS

    assert tuple(ESTIMATORS) == INFLUENCE_METHODS
    assert tuple(CURVATURES_BY_NAME) == CURVATURE_NAMES
    assert tuple(SOLVERS) == SOLVER_NAMES
