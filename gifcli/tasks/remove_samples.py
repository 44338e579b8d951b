"""``remove-samples``: forget arbitrary training samples (a deletion request, mislabelled data).

The removal set is a file of training indices (``removal.indices``) or a seeded random share
of the training split (``removal.random``). Success is judged against the retrain oracle, not
against accuracy 0: a model that never saw a sample still classifies most such samples
correctly. With no oracle at edit time, the step search asks instead that the removal set
*look unseen*: that the model's losses on it match its losses on the validation split, which
it never trained on either, while validation accuracy stays within ``tolerance`` of the
model's before the edit. See docs/design.md, "Tasks".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from gifcli.config import SAMPLE_OBJECTIVES
from gifcli.data import DataSplits, read_removal_indices, to_split_positions
from gifcli.errors import GifError
from gifcli.metrics import (
    ks_critical,
    ks_distance,
    percent,
    predict_loss,
    remove_samples_metrics,
)
from gifcli.tasks.base import Objective, Scoring, Task

if TYPE_CHECKING:
    from gifcli.config import Config


@dataclass
class RemoveSamples(Task):
    """Forget the training samples at positions ``forget`` of the training split.

    ``objective``: the step objective (``ks`` or ``mean-gap``, see ``match``); ``tolerance``:
    validation accuracy, in points, the step may lose against the model before the edit.
    ``source``: how the samples were chosen, for the description. A listed sample that a
    held-out validation split would hold is moved to the training split first
    (``data_for``): every listed sample is removed.
    """

    forget: torch.Tensor
    objective: str = "ks"
    tolerance: float = 1.0
    source: str = "listed samples"
    train_samples: int | None = None

    name: ClassVar[str] = "remove-samples"
    step: ClassVar[float | str] = 1.0  # the objective matches U to unseen data at s ≈ 0
    described_by: ClassVar[str] = "removal.indices or removal.random"
    headline: ClassVar[tuple[str, ...]] = ("forget_acc_train", "acc_test")
    metric_keys: ClassVar[tuple[str, ...]] = (
        "forget_acc_train",
        "acc_test",
        "mia_efficacy",
        "retain_acc_train",
    )
    salun_sources: ClassVar[tuple[str, str, str, str]] = (
        "forget_acc_train",
        "retain_acc_train",
        "acc_test",
        "mia_efficacy",
    )

    def __post_init__(self) -> None:
        self.forget = torch.as_tensor(self.forget, dtype=torch.long).flatten().sort().values
        if len(self.forget) == 0:
            raise GifError("forget: no training sample to forget; give at least one position")
        if bool((self.forget[1:] == self.forget[:-1]).any()):
            raise GifError("forget: a position is repeated; list each sample once")
        if self.objective not in SAMPLE_OBJECTIVES:
            raise GifError(
                f"objective: {self.objective!r} is not one of {', '.join(SAMPLE_OBJECTIVES)}"
            )
        if not self.tolerance >= 0:
            raise GifError(f"tolerance: must be non-negative, got {self.tolerance}")

    # -------------------------------------------------------------------------- from a config

    @classmethod
    def describes(cls, config: Config) -> bool:
        return config.removal.indices is not None or config.removal.random is not None

    @classmethod
    def data_for(cls, config: Config, data: DataSplits) -> DataSplits:
        """``data`` with the listed samples of ``removal.indices`` that the held-out validation
        split holds moved to the training split (a sample the user asks to remove is one the
        model was trained on); its ``validation`` line says how many."""
        if config.removal.indices is None:
            return data
        moved_data, moved = data.with_in_train(_read_listed(config.removal.indices, data))
        if moved == 0:
            return data
        return replace(
            moved_data,
            validation=f"{data.validation}; {moved} of the listed samples were in it: they are "
            "taken out of it and removed with the others",
        )

    @classmethod
    def from_config(cls, config: Config, data: DataSplits) -> RemoveSamples:
        removal = config.removal
        options = {
            "objective": removal.objective,
            "tolerance": removal.tolerance,
            "train_samples": config.metrics.train_samples,
        }
        if removal.random is not None:
            return cls.at_random(
                len(data.train), removal.random.fraction, seed=removal.random.seed, **options
            )
        return cls(**options, **_listed(removal.indices, data))

    @classmethod
    def at_random(cls, n_train: int, fraction: float, *, seed: int, **options) -> RemoveSamples:
        """``round(fraction · n_train)`` positions of the training split (at least one), drawn
        uniformly with ``seed``."""
        if not 0 < fraction < 1:
            raise GifError(f"removal.random.fraction: must be in (0, 1), got {fraction}")
        count = max(1, round(fraction * n_train))
        generator = torch.Generator().manual_seed(seed)
        forget = torch.randperm(n_train, generator=generator)[:count]
        source = f"random {100 * fraction:g}% of the training split (seed {seed})"
        return cls(forget=forget, source=source, **options)

    # -------------------------------------------------------------------------- the task

    @property
    def description(self) -> str:
        return f"{len(self.forget)} training samples: {self.source}"

    def removed_mask(self, data: DataSplits) -> torch.Tensor:
        """A boolean mask over the training split, True on the removal set."""
        n = len(data.train)
        outside = self.forget[(self.forget < 0) | (self.forget >= n)]
        if len(outside):
            raise GifError(
                f"forget: position {int(outside[0])} is out of range 0..{n - 1} (the "
                f"training split has {n} samples)"
            )
        removed = torch.zeros(n, dtype=torch.bool)
        removed[self.forget] = True
        return removed

    def match(
        self, forget_loss: torch.Tensor, val_loss: torch.Tensor, accuracy_gap: float
    ) -> tuple[float, dict]:
        """How alike the removal set and the validation split look to the model, 0-100, and
        its parts for the sweep.

        ``ks``: the Kolmogorov-Smirnov distance between the per-sample losses of the two
        (unchanged by any monotone transform of the loss, so the same on true-class
        probabilities), counted only above the distance a two-sample test at the 5% level
        tolerates for these sizes: ``100 · (1 − max(0, KS − KS_5%))``. Every step that makes
        the two indistinguishable scores 100 and the smallest of them wins, so an edit stops
        as soon as the removal set looks unseen (at once, if it already does).
        ``mean-gap``: 100 minus the mean of the accuracy gap and the mean true-class
        probability gap, both in points: it matches the two sets' means, however noisy.
        """
        if self.objective == "ks":
            distance = ks_distance(forget_loss, val_loss)
            excess = max(0.0, distance - ks_critical(len(forget_loss), len(val_loss)))
            return 100 * (1 - excess), {"ks_val": 100 * distance}
        confidence_gap = 100 * abs(
            float(torch.exp(-forget_loss).mean()) - float(torch.exp(-val_loss).mean())
        )
        return 100 - (accuracy_gap + confidence_gap) / 2, {"confidence_gap_val": confidence_gap}

    def validation_objective(self, scoring: Scoring) -> Objective:
        val, device = scoring.val, scoring.device
        scored = scoring.searched(scoring.data.train.subset(scoring.removed))
        # val is empty only with a given step, which needs no objective
        predicted, _ = predict_loss(scoring.model, val, device=device)
        floor = percent(predicted == val.y) - self.tolerance

        def objective(edited: nn.Module) -> tuple[float, dict]:
            forget_pred, forget_loss = predict_loss(edited, scored, device=device)
            val_pred, val_loss = predict_loss(edited, val, device=device)
            forget_acc, val_acc = percent(forget_pred == scored.y), percent(val_pred == val.y)
            match, parts = self.match(forget_loss, val_loss, abs(forget_acc - val_acc))
            # a step that costs more validation accuracy than the tolerance ranks below every
            # step that does not (the smallest steps are about the unedited model, so one
            # always qualifies), and the less it costs, the higher
            shortfall = max(0.0, floor - val_acc)
            value = match - (100 + shortfall if shortfall > 0 else 0.0)
            return value, {
                "match_val": match,
                **parts,
                "acc_val": val_acc,
                "forget_acc_train": forget_acc,
            }

        return objective

    def metrics(
        self, model: nn.Module, data: DataSplits, *, device: torch.device, seed: int
    ) -> dict:
        train, positions = self.metrics_train(data, seed=seed)
        return remove_samples_metrics(
            model,
            train=train,
            test=data.test,
            removed=self.removed_mask(data)[positions],
            num_classes=data.num_classes,
            device=device,
            seed=seed,
        )


def _read_listed(path: str, data: DataSplits) -> torch.Tensor:
    """The indices of a ``removal.indices`` file, into the data set's full training set."""
    return read_removal_indices(path, data.full_train_size, key="removal.indices")


def _listed(path: str, data: DataSplits) -> dict:
    """The samples of a ``removal.indices`` file: indices into the data set's full training
    set (before a validation split is held out), mapped to positions in the training split,
    which holds every one of them once ``data_for`` has moved those of the validation split."""
    positions = to_split_positions(_read_listed(path, data), data.train_source)
    if bool((positions < 0).any()):
        raise GifError(
            f"{path}: {int((positions < 0).sum())} listed samples are in the validation split; "
            "load the data with RemoveSamples.data_for(config, data), which moves them to the "
            "training split"
        )
    return {"forget": positions, "source": f"listed in {path}"}
