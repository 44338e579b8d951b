"""``gif train``: SGD with momentum and a cosine schedule; ``--retrain`` trains the oracle."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gifcli import distributed
from gifcli.checkpoint import checkpoint_metadata, save_checkpoint, sha256_file
from gifcli.config import Config, TrainConfig
from gifcli.context import prepare
from gifcli.data import TensorSplit
from gifcli.errors import GifError
from gifcli.metrics import classification_metrics
from gifcli.outputs import claim_output_files, write_json, write_text
from gifcli.progress import ProgressFactory, silent
from gifcli.tasks import retrain_split, task_of


def train_model(
    model: nn.Module,
    train: TensorSplit,
    *,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    progress: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``train`` (shuffled each epoch with a seeded generator).

    ``progress(epoch, mean_loss)`` is called after every epoch.
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
    for epoch in range(config.epochs):
        order = torch.randperm(len(train), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(train), config.batch_size):
            batch = order[start : start + config.batch_size]
            x, y = train.x[batch].to(device), train.y[batch].to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
            count += len(batch)
        if progress is not None:
            progress(epoch + 1, total / count)
    model.eval()
    return model


def output_paths(checkpoint: Path) -> dict[str, Path]:
    """A trained checkpoint and what is written beside it: its report and resolved config."""
    stem = checkpoint.with_suffix("")
    return {
        "checkpoint": checkpoint,
        "report": Path(f"{stem}.report.json"),
        "config": Path(f"{stem}.config.yaml"),
    }


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
    paths = output_paths(output)
    with claim_output_files(paths.values(), force=force) as staged:
        model, report = _train(config, output, retrain=retrain, progress=progress)
        metadata = checkpoint_metadata(task=report["task"], config_yaml=config.to_yaml())
        save_checkpoint(staged[output], model.state_dict(), metadata)
        report["sha256"] = sha256_file(staged[output])
        write_json(staged[paths["report"]], report)
        write_text(staged[paths["config"]], config.to_yaml())
    return report


def _train(
    config: Config, output: Path, *, retrain: bool, progress: ProgressFactory
) -> tuple[nn.Module, dict]:
    """The trained model and its report (without the checkpoint's sha256)."""
    started = time.perf_counter()
    ctx = prepare(config)
    train = retrain_split(ctx) if retrain else ctx.data.train
    with progress("train", config.train.epochs) as advance:
        model = train_model(
            ctx.new_model(),
            train,
            config=config.train,
            seed=config.seed,
            device=ctx.device,
            progress=lambda epoch, loss: advance(epoch, f"loss {loss:.4f}"),
        )
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise GifError(
            f"train.lr: training diverged (NaN or infinite weights at lr {config.train.lr}); "
            f"lower train.lr"
        )
    return model, {
        "task": "retrain" if retrain else "train",
        "oracle_for": task_of(config) if retrain else None,
        "train_samples": len(train),
        "epochs": config.train.epochs,
        "seconds": time.perf_counter() - started,
        **classification_metrics(
            model, ctx.data.test, num_classes=config.model.num_classes, device=ctx.device
        ),
        "checkpoint": str(output),
    }
