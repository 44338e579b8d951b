"""Everything a command needs from a config: device, data splits, the model and its weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gifcli.checkpoint import check_checkpoint, load_into
from gifcli.config import Config
from gifcli.data import DataSplits, load_dataset
from gifcli.device import resolve_device
from gifcli.errors import GifError
from gifcli.models import build_model
from gifcli.tasks import Task, described_task, task_from_config
from gifcli.update import finite_outputs


@dataclass
class RunContext:
    config: Config
    device: torch.device
    data: DataSplits

    def new_model(self) -> nn.Module:
        """A freshly initialised ``model.arch`` for this data set (seeded by ``config.seed``)."""
        torch.manual_seed(self.config.seed)
        model = build_model(
            self.config.model, in_channels=self.data.in_channels, image_size=self.data.image_size
        )
        return model.to(self.device)

    def task(self) -> Task:
        """The task the config describes, on the loaded data."""
        return task_from_config(self.config, self.data)

    def load_model(self, checkpoint: str | Path | None = None, *, role: str = "model") -> nn.Module:
        """``model.arch`` with the weights of ``checkpoint`` (default: the config's), in eval().

        ``role`` (``model``, ``oracle`` or ``evaluated``) picks the hint of a missing file.
        Refused with a GifError naming the file: a checkpoint that does not fit, holds
        non-finite weights, or whose outputs on the first test images are not finite."""
        path = checkpoint or self.config.checkpoint
        source = self.config.source
        if not path:
            raise GifError(
                "checkpoint: no checkpoint given; set `checkpoint:` in the config or "
                f"train one: `gif train {source} -o runs/base.safetensors`"
            )
        hints = {
            "model": f"train it with `gif train {source} -o {path}`, or set `checkpoint:`",
            "oracle": f"train the retrain oracle with `gif train {source} --retrain -o {path}`",
            "evaluated": EVALUATED_HINT,
        }
        check_checkpoint(path, hints[role])
        model = build_model(
            self.config.model, in_channels=self.data.in_channels, image_size=self.data.image_size
        )
        load_into(model, path)
        model = model.to(self.device).eval()
        self._check_outputs(model, path)
        return model

    def _check_outputs(self, model: nn.Module, path: str | Path) -> None:
        if not finite_outputs(model, self.data.test, self.device):
            raise GifError(
                f"{path}: the model's outputs on the test images are NaN or infinite (weights "
                f"far too large?); the checkpoint is broken: retrain it or pick another"
            )


EVALUATED_HINT = (
    "pass a checkpoint written by `gif train` or by an edit (OUTPUT_DIR/model.safetensors)"
)
"""The hint of a missing checkpoint to evaluate or audit."""


def prepare(config: Config) -> RunContext:
    """Resolve the device, load the data set and check it against ``model.num_classes``."""
    device = resolve_device(config.device)
    data = load_dataset(config.data, seed=config.seed)
    if data.num_classes > config.model.num_classes:
        raise GifError(
            f"model.num_classes: the data set has {data.num_classes} classes but the "
            f"model has {config.model.num_classes}; set model.num_classes="
            f"{data.num_classes}"
        )
    # the label space is the model's: per-class metrics list every class it can predict
    data = dataclasses.replace(data, num_classes=config.model.num_classes)
    data = described_task(config).data_for(config, data)
    return RunContext(config=config, device=device, data=data)
