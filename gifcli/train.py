"""``gif train``: SGD with momentum and a cosine schedule; ``--retrain`` trains the oracle."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gifcli import distributed
from gifcli.checkpoint import checkpoint_metadata, save_checkpoint, sha256_file
from gifcli.config import Config, TrainConfig
from gifcli.context import prepare
from gifcli.data import DataSplits, Split
from gifcli.data.augment import random_crop_flip
from gifcli.errors import GifError
from gifcli.outputs import claim_output_files, write_json, write_text
from gifcli.progress import ProgressFactory, silent


def train_model(
    model: nn.Module,
    train: Split,
    *,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    progress: Callable[[int, float], None] | None = None,
    fill: Sequence[float] | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``train`` (shuffled each epoch with a seeded generator),
    streaming its batches.

    With ``config.augment``, every batch is randomly cropped (padding of ``fill`` per channel:
    the normalised value of black; default 0) and flipped, with draws of a generator of their
    own. ``progress(epoch, mean_loss)`` is called after every epoch.
    """
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-len(train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(seed)
    augment_generator = torch.Generator().manual_seed(seed + 1)
    for epoch in range(config.epochs):
        order = torch.randperm(len(train), generator=generator)
        total, count = 0.0, 0
        for x, y in train.batches(config.batch_size, order=order, device=device):
            if config.augment:
                x = random_crop_flip(x, augment_generator, fill=fill or [0.0] * x.shape[1])
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
        if progress is not None:
            progress(epoch + 1, total / count)
    model.eval()
    return model


def black_fill(data: DataSplits) -> list[float]:
    """The normalised value of black per channel: the padding of ``train.augment``'s crops."""
    return [-m / s for m, s in zip(data.mean, data.std, strict=True)]


def check_finite(model: nn.Module, config: TrainConfig) -> None:
    """Refuse a model whose training diverged."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise GifError(
            f"train.lr: training diverged (NaN or infinite weights at lr {config.lr}); "
            f"lower train.lr"
        )


def output_paths(checkpoint: Path, *, poisoned: bool = False) -> dict[str, Path]:
    """A trained checkpoint and what is written beside it: its report, the resolved config
    and, when the training data carries a poison scenario, the list of poisoned samples."""
    stem = checkpoint.with_suffix("")
    paths = {
        "checkpoint": checkpoint,
        "report": Path(f"{stem}.report.json"),
        "config": Path(f"{stem}.config.yaml"),
    }
    if poisoned:
        paths["poisoned"] = Path(f"{stem}.poisoned.txt")
    return paths


def poisoned_listing(data: DataSplits) -> str:
    """The poisoned training samples as ``removal.poison_indices`` reads them: one
    ``index true_label`` line each, indices into the full training split (before the
    validation split is held out), counted from 0."""
    indices = data.train_source[data.poison.indices].tolist()
    rows = sorted(zip(indices, data.poison.true_labels.tolist(), strict=True))
    header = (
        "# poisoned training samples: index into the full training split (before the "
        "validation split), true label\n"
    )
    return header + "".join(f"{index} {label}\n" for index, label in rows)


def run_train(
    *,
    config: Config,
    output: Path | None,
    retrain: bool,
    force: bool,
    progress: ProgressFactory = silent,
) -> dict:
    """Train ``model.arch`` on the config's data (``retrain``: the retrain oracle's data) and
    write the checkpoint, a report with test accuracy, and the resolved config."""
    if distributed.launched():
        raise GifError("gif train runs in one process; run it without torchrun")
    output = output or (Path(config.checkpoint) if config.checkpoint else None)
    if output is None:
        raise GifError(
            "checkpoint: no output path; pass -o model.safetensors or set "
            "`checkpoint:` in the config"
        )
    if output.suffix != ".safetensors":
        raise GifError(f"{output}: gif writes .safetensors checkpoints; use that suffix")
    paths = output_paths(output, poisoned=config.data.poison is not None and not retrain)
    with claim_output_files(paths.values(), force=force) as staged:
        model, report, data = _train(config, output, retrain=retrain, progress=progress)
        metadata = checkpoint_metadata(
            task=report["task"],
            config_yaml=config.to_yaml(),
            weight_decay=repr(config.train.weight_decay),  # of the objective it minimised
        )
        save_checkpoint(staged[output], model.state_dict(), metadata)
        report["sha256"] = sha256_file(staged[output])
        if "poisoned" in paths:
            write_text(staged[paths["poisoned"]], poisoned_listing(data))
            report["poisoned"] = str(paths["poisoned"])
        write_json(staged[paths["report"]], report)
        write_text(staged[paths["config"]], config.to_yaml())
    return report


def _train(
    config: Config, output: Path, *, retrain: bool, progress: ProgressFactory
) -> tuple[nn.Module, dict, DataSplits]:
    """The trained model, its report (without the checkpoint's sha256) and the data."""
    started = time.perf_counter()
    ctx = prepare(config)
    task = ctx.task()
    train = task.retrain_split(ctx.data) if retrain else ctx.data.train
    with progress("train", config.train.epochs) as advance:
        model = train_model(
            ctx.new_model(),
            train,
            config=config.train,
            seed=config.seed,
            device=ctx.device,
            progress=lambda epoch, loss: advance(epoch, f"loss {loss:.4f}"),
            fill=black_fill(ctx.data),
        )
    check_finite(model, config.train)
    seconds = time.perf_counter() - started
    task_metrics = task.metrics(model, ctx.data, device=ctx.device, seed=config.seed)
    report = {
        "task": "retrain" if retrain else "train",
        "oracle_for": task.name if retrain else None,
        "train_samples": len(train),
        "epochs": config.train.epochs,
        "seconds": seconds,
        "acc_test": task_metrics["acc_test"],
        "per_class_acc_test": task_metrics["per_class_acc_test"],
        "task_metrics": {key: task_metrics[key] for key in task.headline},
        "task_metrics_train_samples": task.metrics_sample_size(ctx.data),
        "task_removal": task.description,
        "checkpoint": str(output),
        "notes": list(ctx.data.notes),
    }
    return model, report, ctx.data
