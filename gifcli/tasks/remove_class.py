"""``remove-class``: forget every training sample of one or more classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from gifcli.data import DataSplits, class_removal_mask
from gifcli.metrics import forget_retain, harmonic_mean, predict, remove_class_metrics
from gifcli.tasks.base import Objective, Scoring, Task

if TYPE_CHECKING:
    from gifcli.config import Config


@dataclass
class RemoveClass(Task):
    """Forget ``classes``: the removal set is their training samples, the retained set every
    other one. Validation objective: the harmonic mean of ``100 − forget`` and ``retain``
    accuracy on the validation split."""

    classes: list[int]
    train_samples: int | None = None

    name: ClassVar[str] = "remove-class"
    described_by: ClassVar[str] = "removal.classes"
    headline: ClassVar[tuple[str, ...]] = ("forget_acc_test", "retain_acc_test")
    metric_keys: ClassVar[tuple[str, ...]] = (
        "forget_acc_test",
        "retain_acc_test",
        "forget_acc_train",
        "retain_acc_train",
        "f1",
        "mia_efficacy",
        "acc_test",
    )
    salun_sources: ClassVar[tuple[str, str, str, str]] = (
        "forget_acc_train",
        "retain_acc_train",
        "retain_acc_test",  # TA on the retained classes: the removed ones are never learnt
        "mia_efficacy",
    )

    def __post_init__(self) -> None:
        self.classes = [int(k) for k in self.classes]

    @classmethod
    def describes(cls, config: Config) -> bool:
        return True  # the default task: a config naming no other removal set

    @classmethod
    def from_config(cls, config: Config, data: DataSplits) -> RemoveClass:
        return cls(classes=list(config.removal.classes), train_samples=config.metrics.train_samples)

    @property
    def description(self) -> str:
        return f"classes {self.classes}"

    def validation_objective(self, scoring: Scoring) -> Objective:
        val, device = scoring.val, scoring.device

        def objective(model: nn.Module) -> tuple[float, dict]:
            predicted, _ = predict(model, val, device=device)
            forget, retain = forget_retain(predicted, val.y, self.classes)
            return harmonic_mean(100 - forget, retain), {
                "forget_acc_val": forget,
                "retain_acc_val": retain,
            }

        return objective

    def metrics(
        self, model: nn.Module, data: DataSplits, *, device: torch.device, seed: int
    ) -> dict:
        train, _ = self.metrics_train(data, seed=seed)
        return remove_class_metrics(
            model,
            train=train,
            test=data.test,
            classes=self.classes,
            num_classes=data.num_classes,
            device=device,
            seed=seed,
        )

    def removed_mask(self, data: DataSplits) -> torch.Tensor:
        """The training samples of ``classes``; refused when a class has none."""
        return class_removal_mask(data.train, self.classes)
