"""The two unlearning tasks: which one a config describes, its scenario, and its metrics.

- remove-class: forget the training samples of ``removal.classes``.
- recover-backdoor: poisoned training samples (known from ``data.poison`` or
  ``removal.poison_indices``) are removed with their poisoned labels and re-added with their
  true labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gifcli.checkpoint import sha256_file
from gifcli.config import Config, PoisonConfig
from gifcli.context import RunContext, prepare
from gifcli.data import TensorSplit, apply_trigger, read_poison_indices, to_split_positions
from gifcli.errors import GifError
from gifcli.metrics import backdoor_metrics, remove_class_metrics

REMOVE_CLASS = "remove-class"
RECOVER_BACKDOOR = "recover-backdoor"


def task_of(config: Config) -> str:
    """A config with a poison scenario or poisoned-index file is a backdoor task."""
    backdoor = config.data.poison is not None or config.removal.poison_indices is not None
    return RECOVER_BACKDOOR if backdoor else REMOVE_CLASS


@dataclass
class Backdoor:
    """Poisoned training samples (positions in the training split), their true labels, the
    backdoor's target label and its trigger. ``val_poisoned``: positions in the validation
    split of poisoned samples that the split put there (a user's own poisoned data); they are
    left out of every validation measurement."""

    poisoned: torch.Tensor
    true_labels: torch.Tensor
    target: int
    trigger: PoisonConfig
    val_poisoned: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def apply_trigger(self, ctx: RunContext, x: torch.Tensor) -> torch.Tensor:
        key = "removal.trigger" if ctx.config.removal.trigger else "data.poison"
        return apply_trigger(x, self.trigger, mean=ctx.data.mean, std=ctx.data.std, key=key)

    def clean_val(self, val: TensorSplit) -> TensorSplit:
        keep = torch.ones(len(val), dtype=torch.bool)
        keep[self.val_poisoned] = False
        return val.subset(torch.nonzero(keep).squeeze(1))


def backdoor_of(ctx: RunContext) -> Backdoor:
    config, data = ctx.config, ctx.data
    trigger = config.removal.trigger or config.data.poison
    target = config.backdoor_target
    if trigger is None or target is None:
        raise GifError(
            "data.poison: a backdoor task needs the trigger and target; set "
            "data.poison, or removal.trigger and removal.target"
        )
    if config.removal.poison_indices:
        return _listed_backdoor(ctx, trigger, target)
    if data.poison is None:
        raise GifError(
            "removal.poison_indices: the poisoned samples are unknown; give a file "
            "of poisoned training indices or a data.poison scenario"
        )
    return Backdoor(
        poisoned=data.poison.indices,
        true_labels=data.poison.true_labels,
        target=target,
        trigger=trigger,
    )


def _listed_backdoor(ctx: RunContext, trigger: PoisonConfig, target: int) -> Backdoor:
    """Poisoned samples from ``removal.poison_indices``: indices into the data set's full
    training set (before the validation split), with or without a true-label column."""
    data, path = ctx.data, ctx.config.removal.poison_indices
    indices, true_labels = read_poison_indices(
        path, len(data.train) + len(data.val), num_classes=ctx.config.model.num_classes
    )
    positions = to_split_positions(indices, data.train_source)
    if true_labels is None:
        true_labels = _known_true_labels(ctx, positions)
    in_train = positions >= 0
    if not in_train.any():
        raise GifError(
            f"{path}: every listed sample fell into the validation split; check the "
            f"indices (they count samples of the full training set from 0)"
        )
    return Backdoor(
        poisoned=positions[in_train],
        true_labels=true_labels[in_train],
        target=target,
        trigger=trigger,
        val_poisoned=to_split_positions(indices[~in_train], data.val_source),
    )


def _known_true_labels(ctx: RunContext, positions: torch.Tensor) -> torch.Tensor:
    poison = ctx.data.poison
    path = ctx.config.removal.poison_indices
    if poison is None:
        raise GifError(
            f"{path}: no true-label column; add one (`index label` per line) so the "
            f"samples can be relabelled"
        )
    lookup = dict(zip(poison.indices.tolist(), poison.true_labels.tolist(), strict=True))
    missing = [i for i in positions.tolist() if i not in lookup]
    if missing:
        raise GifError(
            f"{path}: a listed sample is not a poisoned sample of data.poison and "
            f"the file has no true-label column"
        )
    return torch.tensor([lookup[i] for i in positions.tolist()], dtype=torch.long)


def triggered_inputs(ctx: RunContext, split: TensorSplit, backdoor: Backdoor) -> TensorSplit:
    """``split``'s samples whose true class is not the target, with the trigger applied,
    labelled with their true class (ASR and robust accuracy are measured on these)."""
    keep = split.y != backdoor.target
    return TensorSplit(x=backdoor.apply_trigger(ctx, split.x[keep]), y=split.y[keep])


def retrain_split(ctx: RunContext) -> TensorSplit:
    """The training data of the retrain oracle: without the removed classes, or with the
    poisoned labels corrected."""
    train = ctx.data.train
    if task_of(ctx.config) == REMOVE_CLASS:
        keep = ~torch.isin(train.y, torch.tensor(ctx.config.removal.classes))
        return train.subset(torch.nonzero(keep).squeeze(1))
    backdoor = backdoor_of(ctx)
    y = train.y.clone()
    y[backdoor.poisoned] = backdoor.true_labels
    return TensorSplit(x=train.x, y=y)


def task_metrics(
    ctx: RunContext, model: torch.nn.Module, *, backdoor: Backdoor | None = None
) -> dict:
    """SPEC §5 metrics of ``model`` for the config's task."""
    data, config = ctx.data, ctx.config
    if task_of(config) == REMOVE_CLASS:
        return remove_class_metrics(
            model,
            train=data.train,
            test=data.test,
            classes=config.removal.classes,
            num_classes=config.model.num_classes,
            device=ctx.device,
            seed=config.seed,
        )
    backdoor = backdoor or backdoor_of(ctx)
    return backdoor_metrics(
        model,
        test=data.test,
        triggered_test=triggered_inputs(ctx, data.test, backdoor),
        train=data.train,
        poisoned=backdoor.poisoned,
        true_labels=backdoor.true_labels,
        target=backdoor.target,
        num_classes=config.model.num_classes,
        device=ctx.device,
    )


def evaluate_checkpoint(*, config: Config, checkpoint: Path) -> dict:
    """``gif evaluate``: overall and per-class test accuracy plus the task's metrics."""
    ctx = prepare(config)
    model = ctx.load_model(checkpoint)
    return {
        "task": task_of(config),
        "checkpoint": str(checkpoint),
        "sha256": sha256_file(checkpoint),
        "metrics": task_metrics(ctx, model),
    }
