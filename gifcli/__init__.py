"""gif: make a trained classifier forget training data with Generalized Influence Functions.

The library under the ``gif`` command::

    import gifcli

    data = gifcli.DataSplits.from_tensors(train=(x, y), test=(x_test, y_test))
    result = gifcli.edit(model, gifcli.RemoveClass(classes=[3]), data)
    result.model                      # the edited copy of ``model``
    result.report.metrics.after       # the task's metrics after the edit
    gifcli.write_outputs(result, "runs/forget-3")   # optional: the CLI's files

Names are imported on first use, so ``import gifcli`` (and ``gif --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "edit": "gifcli.pipeline",
    "EditResult": "gifcli.pipeline",
    "Settings": "gifcli.pipeline",
    "write_outputs": "gifcli.report",
    "Task": "gifcli.tasks",
    "RemoveClass": "gifcli.tasks",
    "RecoverBackdoor": "gifcli.tasks",
    "RemoveSamples": "gifcli.tasks",
    "DataSplits": "gifcli.data",
    "TensorSplit": "gifcli.data",
    "GifError": "gifcli.errors",
    "ParameterError": "gifcli.errors",
    "SelectionConfig": "gifcli.config",
    "InfluenceConfig": "gifcli.config",
    "UpdateConfig": "gifcli.config",
    "TriggerConfig": "gifcli.config",
}
__all__ = [
    "__version__",
    "edit",
    "EditResult",
    "Settings",
    "write_outputs",
    "Task",
    "RemoveClass",
    "RecoverBackdoor",
    "RemoveSamples",
    "DataSplits",
    "TensorSplit",
    "GifError",
    "ParameterError",
    "SelectionConfig",
    "InfluenceConfig",
    "UpdateConfig",
    "TriggerConfig",
]

if TYPE_CHECKING:
    from gifcli.config import InfluenceConfig, SelectionConfig, TriggerConfig, UpdateConfig
    from gifcli.data import DataSplits, TensorSplit
    from gifcli.errors import GifError, ParameterError
    from gifcli.pipeline import EditResult, Settings, edit
    from gifcli.report import write_outputs
    from gifcli.tasks import RecoverBackdoor, RemoveClass, RemoveSamples, Task


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gifcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The lazy exports too, so that ``dir(gifcli)`` and tab completion find them."""
    return sorted({*globals(), *__all__})
