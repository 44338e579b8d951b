"""The unlearning tasks, one ``Task`` class each, and which one a config describes.

- ``RemoveClass``: forget the training samples of some classes.
- ``RecoverBackdoor``: remove poisoned samples with their poisoned labels and re-add them with
  their true labels.
- ``RemoveSamples``: forget arbitrary training samples (a file of indices, or a random share).

Nothing outside this package asks which task it is: it calls the task's methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gifcli.errors import GifError
from gifcli.tasks.base import Objective, RemovalSet, Task
from gifcli.tasks.recover_backdoor import RecoverBackdoor
from gifcli.tasks.remove_class import RemoveClass
from gifcli.tasks.remove_samples import RemoveSamples

if TYPE_CHECKING:
    from gifcli.config import Config
    from gifcli.data import DataSplits

TASKS: tuple[type[Task], ...] = (RemoveSamples, RecoverBackdoor, RemoveClass)
"""In the order a config is matched against them (the last is the default): a removal set
named explicitly (``removal.indices``, ``removal.random``) wins over a poison scenario, which
may only describe the data a deletion request is made on."""
TASK_NAMES = tuple(task.name for task in TASKS)


def task_type(name: str) -> type[Task]:
    """The task class called ``name`` (a command name, e.g. ``remove-class``)."""
    for task in TASKS:
        if task.name == name:
            return task
    raise GifError(f"task: unknown {name!r}; use one of {', '.join(TASK_NAMES)}")


def described_task(config: Config) -> type[Task]:
    """The task class a config describes."""
    return next(task for task in TASKS if task.describes(config))


def check_task(config: Config, name: str, *, source: str = "the config") -> type[Task]:
    """The task class of command ``name``; a config describing another task is refused in one
    line, before any work."""
    wanted, described = task_type(name), described_task(config)
    if described is not wanted:
        raise GifError(
            f"{source}: describes a {described.name} task ({described.described_by}), not "
            f"{wanted.name}; run `gif {described.name}` or use a config for {wanted.name}"
        )
    return wanted


def task_from_config(config: Config, data: DataSplits, *, name: str | None = None) -> Task:
    """The task of ``config`` on its loaded ``data`` (checked against command ``name``)."""
    task = check_task(config, name) if name else described_task(config)
    return task.from_config(config, data)


__all__ = [
    "TASKS",
    "TASK_NAMES",
    "Objective",
    "RecoverBackdoor",
    "RemovalSet",
    "RemoveClass",
    "RemoveSamples",
    "Task",
    "check_task",
    "described_task",
    "task_from_config",
    "task_type",
]
