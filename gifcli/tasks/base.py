"""What every unlearning task provides: the ``Task`` interface and the ``RemovalSet``.

A task answers every question the pipeline would otherwise ask by name: which training
points are removed (and, for a backdoor, re-added with which labels), which retained points a
Hessian sample is drawn from, how the edit is judged on the validation split, which metrics it
reports, and what the retrain oracle trains on. The pipeline (``gifcli.pipeline``), the CLI and
``gif train --retrain`` only call these methods. See docs/design.md, "Tasks".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from gifcli.data import DataSplits, Split, seeded_subset
from gifcli.data.splits import LazyInputs
from gifcli.metrics import fidelity_metrics, salun_protocol
from gifcli.update import Objective

if TYPE_CHECKING:
    from gifcli.config import Config


@dataclass
class RemovalSet:
    """What a task removes, and how its edit is judged on the validation split.

    ``x``/``y``: the removal set ``U`` with the labels it was trained on (the removal loss and
    the selection statistics use them); ``x`` is a tensor, or a streamed split's ``inputs``,
    read batch by batch. ``true_y``: backdoor only, the labels the points are re-added with.
    ``n_train``: the size ``n`` of the training set. ``retained``: the points a Hessian sample
    is drawn from. ``objective``: the step search's validation objective.
    """

    x: torch.Tensor | LazyInputs
    y: torch.Tensor
    true_y: torch.Tensor | None
    n_train: int
    retained: Split
    objective: Objective
    description: str


def searched(split: Split, samples: int | None, seed: int) -> Split:
    """The seeded subsample of ``split`` a step-search objective scores (``update.
    search_samples``): all of it when ``samples`` is None or at least its size."""
    if samples is None or samples >= len(split):
        return split
    return split.subset(seeded_subset(len(split), samples, seed=seed))


@dataclass(frozen=True)
class Scoring:
    """What a task's validation objective is built from (``Task.validation_objective``)."""

    data: DataSplits
    removed: torch.Tensor
    """``removed_mask(data)``: the removal set's training samples."""
    val: Split
    """The searched sample of the task's ``validation_split``."""
    model: nn.Module
    """The model before the edit (an objective may be measured against it)."""
    device: torch.device
    search_samples: int | None
    seed: int
    """How ``val``, and any other split the objective scores, is sampled (``searched``)."""

    def searched(self, split: Split) -> Split:
        """The sample of ``split`` the objective scores, drawn as ``val`` was."""
        return searched(split, self.search_samples, self.seed)


class Task(ABC):
    """One unlearning job. Subclasses set ``name`` (the command) and ``metric_keys``, and say
    which training samples are removed (``removed_mask``), how an edit is scored on the
    validation split (``validation_objective``) and what is measured (``metrics``). A task
    whose removal set is not simply its removed samples, whose objective must skip validation
    samples, or whose oracle trains on more than the rest overrides ``removal_points``,
    ``validation_split`` or ``retrain_split``."""

    name: ClassVar[str]
    metric_keys: ClassVar[tuple[str, ...]]
    """The scalar metrics of ``metrics`` (percent); ``per_class_acc_test`` comes besides."""
    headline: ClassVar[tuple[str, ...]]
    """The two or three metrics that say at a glance how a model does on this task."""
    described_by: ClassVar[str]
    """The config keys that make a config describe this task (for messages)."""
    step: ClassVar[float | str] = "auto"
    """``update.scale`` when the config leaves it null: ``auto`` (searched on the validation
    split) where the task's objective tells steps apart, else 1.0, the influence step (the
    reasons are in the config reference of ``update.scale``)."""
    train_samples: int | None = None
    """``metrics.train_samples``: the ``*_train`` metrics are measured on a seeded sample of
    this many training samples (None: all); each task declares it as a field."""
    salun_sources: ClassVar[tuple[str, str, str, str] | None] = None
    """The SalUn protocol's sources among ``metric_keys``: the accuracy on the removal set (UA
    is 100 minus it), RA, TA and MIA-efficacy; None where the protocol does not apply."""

    @classmethod
    @abstractmethod
    def describes(cls, config: Config) -> bool:
        """Whether ``config`` describes this task."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: Config, data: DataSplits) -> Task:
        """The task a config describes, on its loaded data."""

    @classmethod
    def data_for(cls, config: Config, data: DataSplits) -> DataSplits:
        """The splits the task of ``config`` runs on (``from_config`` and the edit take
        these): ``data`` itself, unless the task must move samples between splits."""
        del config
        return data

    @property
    @abstractmethod
    def description(self) -> str:
        """What is removed, in a few words (``classes [3]``)."""

    def removal_set(
        self,
        data: DataSplits,
        *,
        device: torch.device,
        model: nn.Module,
        search_samples: int | None = None,
        seed: int = 0,
    ) -> RemovalSet:
        """The removal set and the validation objective on ``data``; ``model`` is the model
        as it is before the edit (an objective may be measured against it). The objective
        scores at most ``search_samples`` samples of each split it reads (``searched``).

        Every task's is assembled alike: the points ``removal_points`` gives, every training
        sample ``removed_mask`` leaves as the retained set, and ``validation_objective`` on a
        searched sample of the task's ``validation_split``."""
        removed = self.removed_mask(data)
        x, y, true_y = self.removal_points(data, removed)
        val = searched(self.validation_split(data), search_samples, seed)
        scoring = Scoring(data, removed, val, model, device, search_samples, seed)
        return RemovalSet(
            x=x,
            y=y,
            true_y=true_y,
            n_train=len(data.train),
            retained=data.train.subset(~removed),
            objective=self.validation_objective(scoring),
            description=self.description,
        )

    def removal_points(
        self, data: DataSplits, removed: torch.Tensor
    ) -> tuple[torch.Tensor | LazyInputs, torch.Tensor, torch.Tensor | None]:
        """``x``, ``y`` and ``true_y`` of the removal set (``RemovalSet``), given ``removed``
        (``removed_mask(data)``): by default the removed training samples with the labels they
        were trained on, re-added with none."""
        forget = data.train.subset(removed)
        return forget.inputs, forget.y, None

    def validation_split(self, data: DataSplits) -> Split:
        """The validation samples the objective may score (before ``searched`` samples them):
        all of ``data.val``, unless the task must leave some out."""
        return data.val

    @abstractmethod
    def validation_objective(self, scoring: Scoring) -> Objective:
        """The step search's validation objective: an edited model's score (higher is
        better) and its parts for the sweep."""

    @abstractmethod
    def metrics(
        self, model: nn.Module, data: DataSplits, *, device: torch.device, seed: int
    ) -> dict:
        """The task's metrics of ``model`` in percent (``metric_keys`` and
        ``per_class_acc_test``); ``seed`` draws the membership-inference sample."""

    def retrain_split(self, data: DataSplits) -> Split:
        """The training data of the retrain oracle: by default every training sample but the
        removal set's (refused where ``removed_mask`` refuses ``data``)."""
        return data.train.subset(~self.removed_mask(data))

    @abstractmethod
    def removed_mask(self, data: DataSplits) -> torch.Tensor:
        """A boolean mask over ``data.train``, True on the removal set's training samples."""

    def evaluate(
        self,
        model: nn.Module,
        data: DataSplits,
        *,
        device: torch.device,
        seed: int,
        oracle: nn.Module | None = None,
    ) -> dict:
        """``metrics``, and with an ``oracle`` the fidelity to it (``FIDELITY_KEYS``) on the
        test split and on the removal set's samples among the ``*_train`` metrics' (all of
        them, or the ``train_samples`` sample), both models run on the same batches."""
        metrics = self.metrics(model, data, device=device, seed=seed)
        if oracle is not None:
            train, positions = self.metrics_train(data, seed=seed)
            removed = train.subset(self.removed_mask(data)[positions])
            metrics.update(
                fidelity_metrics(model, oracle, test=data.test, removed=removed, device=device)
            )
        return metrics

    def salun(self, groups: dict[str, dict | None]) -> dict | None:
        """The SalUn protocol of an edit's metrics groups (``before``, ``after``, ``oracle``:
        ``salun_protocol``); None where it does not apply."""
        if self.salun_sources is None:
            return None
        return salun_protocol(groups, self.salun_sources)

    def metrics_train(self, data: DataSplits, *, seed: int) -> tuple[Split, torch.Tensor]:
        """The training samples the ``*_train`` metrics are measured on, and their positions
        in ``data.train`` (sorted): all of them, or a sample of ``train_samples`` drawn with
        ``seed``."""
        size = self.metrics_sample_size(data)
        positions = seeded_subset(len(data.train), size, seed=seed)
        return (data.train if size is None else data.train.subset(positions)), positions

    def metrics_sample_size(self, data: DataSplits) -> int | None:
        """``train_samples`` when it samples ``data.train``, else None (all of it)."""
        size = self.train_samples
        return size if size is not None and size < len(data.train) else None
