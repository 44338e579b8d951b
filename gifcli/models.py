"""Architectures: builtin models, torchvision models and ``package.module:callable`` imports."""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from gifcli.config import ModelConfig
from gifcli.errors import GifError


class TinyNet(nn.Module):
    """The paper's MNIST network: four 3×3 stride-2 convolutions (32, 64, 128, 256 channels,
    padding 1, ReLU), then a linear layer to the classes.

    Each convolution halves the spatial size (rounding up), so the linear layer's input size
    follows the image size: 28×28 -> 2×2×256, 8×8 -> 1×1×256.
    """

    def __init__(self, *, in_channels: int, image_size: tuple[int, int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (32, 64, 128, 256):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        h, w = image_size
        for _ in range(4):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.classifier = nn.Linear(channels * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Two hidden layers of ``hidden`` ReLU units over the flattened image."""

    def __init__(
        self, *, in_channels: int, image_size: tuple[int, int], num_classes: int, hidden: int = 128
    ):
        super().__init__()
        inputs = in_channels * image_size[0] * image_size[1]
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(inputs, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Linear(nn.Module):
    """Softmax (multinomial logistic) regression: one linear layer over the flattened image.
    Its cross-entropy plus weight decay is strictly convex, so the influence step of its
    training objective can be checked against exact retraining."""

    def __init__(self, *, in_channels: int, image_size: tuple[int, int], num_classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """LeNet-5 style: two 5×5 convolutions (6, 16 channels, padding 2) with 2×2 max-pooling,
    then 120-84-classes linear layers; works from 8×8 inputs upwards."""

    def __init__(self, *, in_channels: int, image_size: tuple[int, int], num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        h, w = image_size[0] // 4, image_size[1] // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


BUILTIN = {"tinynet": TinyNet, "mlp": MLP, "lenet": LeNet, "linear": Linear}


def build_model(
    config: ModelConfig,
    *,
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int | None = None,
) -> nn.Module:
    """Build ``model.arch`` for inputs of ``in_channels`` × ``image_size``.

    ``model.in_channels`` overrides the data set's channel count when set; ``num_classes``
    defaults to ``model.num_classes``.
    """
    channels = config.in_channels or in_channels
    classes = num_classes or config.num_classes
    arch = config.arch
    if arch in BUILTIN:
        return BUILTIN[arch](
            in_channels=channels, image_size=tuple(image_size), num_classes=classes, **config.kwargs
        )
    if arch.startswith("torchvision:"):
        return _torchvision_model(arch.split(":", 1)[1], channels, classes, config.kwargs)
    if ":" in arch:
        return _imported_model(arch, channels, classes, config.kwargs)
    raise GifError(
        f"model.arch: unknown architecture {arch!r}; use one of "
        f"{', '.join(BUILTIN)}, torchvision:<name> or package.module:callable"
    )


def _torchvision_model(name: str, in_channels: int, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision

    try:
        factory = torchvision.models.get_model_builder(name)
    except ValueError:
        raise GifError(
            f"model.arch: torchvision has no model {name!r}; see torchvision.models.list_models()"
        ) from None
    try:
        model = factory(weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise GifError(f"model.kwargs: torchvision:{name} rejected the arguments ({exc})") from None
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, name)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Replace the first Conv2d (the stem) by one taking ``in_channels`` inputs."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(
                    parent,
                    child_name,
                    nn.Conv2d(
                        in_channels,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        child.groups,
                        child.bias is not None,
                    ),
                )
                return
    raise GifError(f"model.in_channels: torchvision:{name} has no Conv2d stem to adapt")


def _imported_model(arch: str, in_channels: int, num_classes: int, kwargs: dict) -> nn.Module:
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise GifError(
            f"model.arch: cannot import {arch!r} ({exc}); is the package installed "
            f"and on PYTHONPATH?"
        ) from None
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {
        k: v
        for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
        if accepts_any or k in params
    }
    try:
        model = factory(**extra, **kwargs)
    except TypeError as exc:
        raise GifError(f"model.kwargs: {arch} rejected the arguments ({exc})") from None
    if not isinstance(model, nn.Module):
        raise GifError(f"model.arch: {arch} returned {type(model).__name__}, not a torch nn.Module")
    return model
