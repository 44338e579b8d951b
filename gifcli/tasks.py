"""The two unlearning tasks: which one a config describes, its scenario, and its metrics.

- remove-class: forget the training samples of ``removal.classes``.
- recover-backdoor: poisoned training samples (known from ``data.poison`` or
  ``removal.poison_indices``) are removed with their poisoned labels and re-added with their
  true labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gifcli.checkpoint import sha256_file
from gifcli.config import Config, PoisonConfig
from gifcli.context import RunContext, prepare
from gifcli.data import TensorSplit, apply_trigger, read_poison_indices
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
    """Poisoned training samples (indices into the training split), their true labels, the
    backdoor's target label and its trigger."""

    poisoned: torch.Tensor
    true_labels: torch.Tensor
    target: int
    trigger: PoisonConfig


def backdoor_of(ctx: RunContext) -> Backdoor:
    config, data = ctx.config, ctx.data
    trigger = config.removal.trigger or config.data.poison
    target = config.backdoor_target
    if trigger is None or target is None:
        raise GifError("data.poison: a backdoor task needs the trigger and target; set "
                       "data.poison, or removal.trigger and removal.target")
    if config.removal.poison_indices:
        poisoned, true_labels = read_poison_indices(config.removal.poison_indices,
                                                    len(data.train))
        if true_labels is None:
            true_labels = _known_true_labels(ctx, poisoned)
    elif data.poison is not None:
        poisoned, true_labels = data.poison.indices, data.poison.true_labels
    else:
        raise GifError("removal.poison_indices: the poisoned samples are unknown; give a file "
                       "of poisoned training indices or a data.poison scenario")
    return Backdoor(poisoned=poisoned, true_labels=true_labels, target=target, trigger=trigger)


def _known_true_labels(ctx: RunContext, poisoned: torch.Tensor) -> torch.Tensor:
    poison = ctx.data.poison
    if poison is None:
        raise GifError(f"{ctx.config.removal.poison_indices}: no true-label column; add one "
                       f"(`index label` per line) so the samples can be relabelled")
    lookup = dict(zip(poison.indices.tolist(), poison.true_labels.tolist(), strict=True))
    missing = [i for i in poisoned.tolist() if i not in lookup]
    if missing:
        raise GifError(f"{ctx.config.removal.poison_indices}: index {missing[0]} is not a "
                       f"poisoned sample of data.poison and the file has no true-label column")
    return torch.tensor([lookup[i] for i in poisoned.tolist()])


def triggered_inputs(ctx: RunContext, split: TensorSplit, backdoor: Backdoor) -> TensorSplit:
    """``split``'s samples whose true class is not the target, with the trigger applied,
    labelled with their true class (ASR and robust accuracy are measured on these)."""
    keep = split.y != backdoor.target
    x = apply_trigger(split.x[keep], backdoor.trigger, mean=ctx.data.mean, std=ctx.data.std)
    return TensorSplit(x=x, y=split.y[keep])


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


def task_metrics(ctx: RunContext, model: torch.nn.Module, *,
                 backdoor: Backdoor | None = None) -> dict:
    """SPEC §5 metrics of ``model`` for the config's task."""
    data, config = ctx.data, ctx.config
    if task_of(config) == REMOVE_CLASS:
        return remove_class_metrics(model, train=data.train, test=data.test,
                                    classes=config.removal.classes,
                                    num_classes=config.model.num_classes, device=ctx.device,
                                    seed=config.seed)
    backdoor = backdoor or backdoor_of(ctx)
    return backdoor_metrics(model, test=data.test,
                            triggered_test=triggered_inputs(ctx, data.test, backdoor),
                            train=data.train, poisoned=backdoor.poisoned,
                            true_labels=backdoor.true_labels, target=backdoor.target,
                            num_classes=config.model.num_classes, device=ctx.device)


def evaluate_checkpoint(*, config: Config, checkpoint: Path) -> dict:
    """``gif evaluate``: overall and per-class test accuracy plus the task's metrics."""
    ctx = prepare(config)
    model = ctx.load_model(checkpoint)
    return {"task": task_of(config), "checkpoint": str(checkpoint),
            "sha256": sha256_file(checkpoint), "metrics": task_metrics(ctx, model)}
