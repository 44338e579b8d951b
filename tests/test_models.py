import pytest
import torch

from gifcli.config import ModelConfig
from gifcli.errors import GifError
from gifcli.models import build_model


@pytest.mark.parametrize("arch", ["tinynet", "mlp", "lenet"])
@pytest.mark.parametrize("size,channels", [((8, 8), 1), ((28, 28), 1), ((32, 32), 3)])
def test_builtin_models_adapt_to_the_input(arch, size, channels):
    model = build_model(
        ModelConfig(arch=arch, num_classes=7), in_channels=channels, image_size=size
    )
    assert model(torch.zeros(2, channels, *size)).shape == (2, 7)


def test_tinynet_is_the_papers_network():
    model = build_model(ModelConfig(arch="tinynet"), in_channels=1, image_size=(28, 28))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(
        c.stride == (2, 2) and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs
    )
    assert model.classifier.in_features == 256 * 2 * 2


def test_torchvision_model_adapts_classes_and_channels():
    model = build_model(
        ModelConfig(arch="torchvision:resnet18", num_classes=4), in_channels=1, image_size=(32, 32)
    )
    assert model.conv1.in_channels == 1
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 4)


def test_import_path_model_receives_kwargs():
    config = ModelConfig(
        arch="torch.nn:Linear", num_classes=3, kwargs={"in_features": 4, "out_features": 3}
    )
    model = build_model(config, in_channels=1, image_size=(2, 2))
    assert isinstance(model, torch.nn.Linear) and model.out_features == 3


@pytest.mark.parametrize(
    "arch,match",
    [
        ("resnet", "unknown architecture"),
        ("torchvision:nonet", "torchvision has no model"),
        ("nomodule.x:y", "cannot import"),
    ],
)
def test_unknown_architectures_are_clear_errors(arch, match):
    with pytest.raises(GifError, match=match):
        build_model(ModelConfig(arch=arch), in_channels=1, image_size=(8, 8))
