"""``recover-backdoor``: remove poisoned samples with their poisoned labels and re-add them
with their true labels.

The poisoned samples are known (``data.poison``'s scenario, or a file of training indices),
or only the trigger is: then ``synthetic_samples`` clean training samples are given the trigger
and treated as poisoned (removed with the target label, re-added with their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from gifcli.config import TriggerConfig
from gifcli.data import (
    DataSplits,
    Split,
    apply_trigger,
    read_poison_indices,
    to_split_positions,
)
from gifcli.errors import GifError
from gifcli.metrics import backdoor_metrics, harmonic_mean, percent, predict
from gifcli.tasks.base import Objective, Scoring, Task

if TYPE_CHECKING:
    from gifcli.config import Config
    from gifcli.data.splits import LazyInputs


@dataclass
class RecoverBackdoor(Task):
    """Repair a backdoor whose ``trigger`` flips inputs to ``target``.

    ``poisoned``: positions in the training split of the poisoned samples, ``true_labels``
    their labels before poisoning. ``val_poisoned``: positions in the validation split of
    poisoned samples the split put there (a user's own poisoned data); they are left out of
    every validation measurement. ``synthetic_samples``: instead of the poisoned samples,
    this many clean training samples (drawn with ``seed``) given the trigger.
    ``trigger_key``: the config section of the trigger, for messages.
    Validation objective: the harmonic mean of clean accuracy and robust accuracy (triggered
    inputs predicted as their true class).
    """

    trigger: TriggerConfig
    target: int
    poisoned: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    true_labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    val_poisoned: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    synthetic_samples: int | None = None
    seed: int = 0
    trigger_key: str = "removal.trigger"
    train_samples: int | None = None

    name: ClassVar[str] = "recover-backdoor"
    described_by: ClassVar[str] = "data.poison or removal.poison_indices"
    headline: ClassVar[tuple[str, ...]] = ("clean_acc_test", "asr_test")
    metric_keys: ClassVar[tuple[str, ...]] = (
        "clean_acc_test",
        "asr_test",
        "robust_acc_test",
        "relabel_acc_train",
        "corrupt_acc_train",
        "clean_acc_train",
        "f1",
        "acc_test",
    )

    def __post_init__(self) -> None:
        if len(self.poisoned) == 0 and self.synthetic_samples is None:
            raise GifError(
                "poisoned: no poisoned training sample is known; give their positions or "
                "synthetic_samples (clean samples to trigger)"
            )
        if len(self.true_labels) != len(self.poisoned):
            raise GifError(
                f"true_labels: {len(self.true_labels)} labels for {len(self.poisoned)} "
                f"poisoned samples; give one per sample"
            )

    # -------------------------------------------------------------------------- from a config

    @classmethod
    def describes(cls, config: Config) -> bool:
        return config.data.poison is not None or config.removal.poison_indices is not None

    @classmethod
    def from_config(cls, config: Config, data: DataSplits) -> RecoverBackdoor:
        trigger = config.removal.trigger or config.data.poison
        target = config.backdoor_target
        if trigger is None or target is None:
            raise GifError(
                "data.poison: a backdoor task needs the trigger and target; set "
                "data.poison, or removal.trigger and removal.target"
            )
        common = {
            "trigger": trigger,
            "target": target,
            "synthetic_samples": config.removal.synthetic_samples,
            "seed": config.seed,
            "trigger_key": "removal.trigger" if config.removal.trigger else "data.poison",
            "train_samples": config.metrics.train_samples,
        }
        if config.removal.poison_indices:
            return cls(**common, **_listed_poison(config, data))
        if data.poison is None:
            raise GifError(
                "removal.poison_indices: the poisoned samples are unknown; give a file "
                "of poisoned training indices or a data.poison scenario"
            )
        return cls(**common, poisoned=data.poison.indices, true_labels=data.poison.true_labels)

    # -------------------------------------------------------------------------- the task

    @property
    def description(self) -> str:
        if self.synthetic_samples is not None:
            return f"{self.synthetic_samples} clean samples with the known trigger"
        return f"{len(self.poisoned)} known poisoned samples"

    def triggered(self, data: DataSplits, x: torch.Tensor) -> torch.Tensor:
        """``x`` (normalised like ``data``) with the trigger applied."""
        return apply_trigger(x, self.trigger, mean=data.mean, std=data.std, key=self.trigger_key)

    def triggered_inputs(self, data: DataSplits, split: Split) -> Split:
        """``split``'s samples whose true class is not the target, with the trigger applied,
        labelled with their true class (ASR and robust accuracy are measured on these)."""
        return split.subset(split.y != self.target).with_trigger(lambda x: self.triggered(data, x))

    def validation_split(self, data: DataSplits) -> Split:
        """``data.val`` without the poisoned samples a user's split put there."""
        keep = torch.ones(len(data.val), dtype=torch.bool)
        keep[self.val_poisoned] = False
        return data.val.subset(torch.nonzero(keep).squeeze(1))

    def removal_points(
        self, data: DataSplits, removed: torch.Tensor
    ) -> tuple[torch.Tensor | LazyInputs, torch.Tensor, torch.Tensor]:
        """The poisoned samples with their poisoned labels, re-added with their true labels;
        with ``synthetic_samples``, that many clean training samples of another class than
        the target (drawn with ``seed``) given the trigger and the target label instead."""
        train = data.train
        if self.synthetic_samples is None:
            poisoned = train.subset(self.poisoned)
            return poisoned.inputs, poisoned.y, self.true_labels
        candidates = torch.nonzero(~removed & (train.y != self.target)).squeeze(1)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(candidates), generator=generator)
        chosen = candidates[order[: self.synthetic_samples]]
        x = self.triggered(data, train.take(chosen))
        return x, torch.full((len(chosen),), self.target), train.y[chosen]

    def validation_objective(self, scoring: Scoring) -> Objective:
        val, device = scoring.val, scoring.device
        triggered_val = self.triggered_inputs(scoring.data, val)

        def objective(model: nn.Module) -> tuple[float, dict]:
            clean_pred, _ = predict(model, val, device=device)
            triggered_pred, _ = predict(model, triggered_val, device=device)
            clean_acc = percent(clean_pred == val.y)
            robust = percent(triggered_pred == triggered_val.y)
            return harmonic_mean(clean_acc, robust), {
                "clean_acc_val": clean_acc,
                "robust_acc_val": robust,
                "asr_val": percent(triggered_pred == self.target),
            }

        return objective

    def metrics(
        self, model: nn.Module, data: DataSplits, *, device: torch.device, seed: int
    ) -> dict:
        train, positions = self.metrics_train(data, seed=seed)
        poisoned = to_split_positions(self.poisoned, positions)  # -1: not in the sample
        return backdoor_metrics(
            model,
            test=data.test,
            triggered_test=self.triggered_inputs(data, data.test),
            train=train,
            poisoned=poisoned[poisoned >= 0],
            true_labels=self.true_labels[poisoned >= 0],
            target=self.target,
            num_classes=data.num_classes,
            device=device,
        )

    def removed_mask(self, data: DataSplits) -> torch.Tensor:
        """The known poisoned samples (none when only the trigger is known)."""
        removed = torch.zeros(len(data.train), dtype=torch.bool)
        removed[self.poisoned] = True
        return removed

    def retrain_split(self, data: DataSplits) -> Split:
        y = data.train.y.clone()
        y[self.poisoned] = self.true_labels
        return data.train.with_labels(y)


def _listed_poison(config: Config, data: DataSplits) -> dict:
    """Poisoned samples from ``removal.poison_indices``: indices into the data set's full
    training set (before the validation split), with or without a true-label column."""
    path = config.removal.poison_indices
    indices, true_labels = read_poison_indices(
        path, data.full_train_size, num_classes=config.model.num_classes
    )
    positions = to_split_positions(indices, data.train_source)
    in_train = positions >= 0
    if not in_train.any():
        raise GifError(
            f"{path}: every listed sample fell into the validation split; check the "
            f"indices (they count samples of the full training set from 0)"
        )
    if true_labels is None:
        true_labels = _known_true_labels(data, path, positions)
    return {
        "poisoned": positions[in_train],
        "true_labels": true_labels[in_train],
        "val_poisoned": to_split_positions(indices[~in_train], data.val_source),
    }


def _known_true_labels(data: DataSplits, path: str, positions: torch.Tensor) -> torch.Tensor:
    poison = data.poison
    if poison is None:
        raise GifError(
            f"{path}: no true-label column; add one (`index label` per line) so the "
            f"samples can be relabelled"
        )
    lookup = dict(zip(poison.indices.tolist(), poison.true_labels.tolist(), strict=True))
    if any(i not in lookup for i in positions.tolist() if i >= 0):
        raise GifError(
            f"{path}: a listed sample is not a poisoned sample of data.poison and "
            f"the file has no true-label column"
        )
    return torch.tensor([lookup.get(i, -1) for i in positions.tolist()], dtype=torch.long)
