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
