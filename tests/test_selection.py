"""Target-parameter selection: budgets, rankings on hand-built layers, masks on disk."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gifcli.errors import GifError
from gifcli.selection import (
    SELECTION_METHODS,
    load_mask,
    mask_to_flat,
    save_mask,
    scope_mask,
    select_targets,
    summarize_mask,
)

UNIT_METHODS = [m for m in SELECTION_METHODS if m != "random"]


def select_target_mask(*args, **kwargs) -> dict[str, Tensor]:
    """The mask of `select_targets`: parameter name -> BoolTensor."""
    return select_targets(*args, **kwargs).mask


def _set(layer: nn.Module, weight: list, bias: list) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.tensor(bias, dtype=layer.bias.dtype))


def _whole_units(mask: dict[str, Tensor], layer: str) -> list[int]:
    """Units whose weight row and bias are all selected."""
    weight = mask[f"{layer}.weight"].reshape(len(mask[f"{layer}.bias"]), -1)
    full = weight.all(dim=1) & mask[f"{layer}.bias"]
    return full.nonzero().flatten().tolist()


def _selected_per_unit(mask: dict[str, Tensor], layer: str) -> list[int]:
    units = len(mask[f"{layer}.bias"])
    weight = mask[f"{layer}.weight"].reshape(units, -1)
    return (weight.sum(dim=1) + mask[f"{layer}.bias"]).tolist()


def _mixed_model() -> nn.Sequential:
    """Conv2d -> BatchNorm -> ReLU -> Flatten -> Linear -> ReLU -> Linear on [N, 2, 4, 4] inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 16, 9),
        nn.ReLU(),
        nn.Linear(9, 4),
    ).double()


def _mixed_data(n: int = 10) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (n,))


# --------------------------------------------------------------------------------------------
# Budgets


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.29, 0.5, 0.77, 1.0])
def test_budget_is_exactly_floor_ratio_times_layer_size(method: str, ratio: float) -> None:
    model = _mixed_model()
    x, y = _mixed_data()
    mask = select_target_mask(model, x, y, method=method, ratio=ratio, batch_size=4)
    sizes = {"0": 2 * 5 * 9 + 5, "4": 80 * 9 + 9, "6": 9 * 4 + 4}
    for layer, size in sizes.items():
        selected = int(mask[f"{layer}.weight"].sum() + mask[f"{layer}.bias"].sum())
        expected = round(ratio * 100) * size // 100  # ⌊ratio · size⌋ in exact arithmetic
        assert selected == expected, (layer, selected, expected)


def test_budget_uses_the_ratio_as_written() -> None:
    """0.29 · 100 is 28.999… in binary floating point; the budget is still 29."""
    model = nn.Sequential(nn.Linear(9, 10))  # 90 + 10 = 100 parameters
    mask = select_target_mask(model, torch.zeros(0, 9), torch.zeros(0), method="random", ratio=0.29)
    assert int(mask["0.weight"].sum() + mask["0.bias"].sum()) == 29


@pytest.mark.parametrize("method", UNIT_METHODS)
def test_unit_methods_take_whole_rows_and_the_remainder_inside_one_more_row(method: str) -> None:
    model = _mixed_model()
    x, y = _mixed_data()
    # Linear "4": 9 units of 81 parameters (80 weights + bias); ⌊0.3 · 729⌋ = 218 = 2 · 81 + 56.
    selection = select_targets(model, x, y, method=method, ratio=0.3)
    per_unit = sorted(_selected_per_unit(selection.mask, "4"), reverse=True)
    assert per_unit == [81, 81, 56] + [0] * 6
    assert sorted(selection.units["4"]) == _whole_units(selection.mask, "4")
    assert len(selection.units["4"]) == 2


@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_ratio_one_selects_every_linear_and_conv_parameter_and_no_batchnorm(method: str) -> None:
    model = _mixed_model()
    x, y = _mixed_data()
    mask = select_target_mask(model, x, y, method=method, ratio=1.0)
    assert list(mask) == [name for name, _ in model.named_parameters()]
    for name, selected in mask.items():
        assert bool(selected.all()) == (not name.startswith("1."))
        assert bool(selected.any()) == (not name.startswith("1."))


# --------------------------------------------------------------------------------------------
# Rankings on hand-built layers


def _outputs_model() -> tuple[nn.Sequential, Tensor, Tensor]:
    """Linear(3, 4) whose unit means over the two samples are [0, 2, -2.5, -0.5].

    Unit 0 outputs +10 and -10: large outputs, but mean 0, so it ranks last by |mean|.
    """
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    _set(model[0], [[10, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], [0, 0, 0, -0.5])
    x = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 2.0, -4.0]], dtype=torch.float64)
    return model, x, torch.tensor([0, 1])


@pytest.mark.parametrize(
    ("method", "expected"), [("top-outputs", [2, 1]), ("lowest-outputs", [0, 3])]
)
def test_outputs_rank_linear_units_by_absolute_mean_activation(
    method: str, expected: list[int]
) -> None:
    model, x, y = _outputs_model()
    # 16 parameters, rows of 4: ⌊0.5 · 16⌋ = 8 is exactly two units. batch_size=1 accumulates.
    selection = select_targets(model, x, y, method=method, ratio=0.5, include=["0"], batch_size=1)
    assert selection.units == {"0": expected}
    assert _whole_units(selection.mask, "0") == sorted(expected)
    assert not selection.mask["2.weight"].any()


def test_outputs_rank_conv_channels_by_mean_over_samples_and_positions() -> None:
    conv = nn.Conv2d(1, 3, kernel_size=1).double()
    _set(conv, [[[[2.0]]], [[[-1.0]]], [[[0.0]]]], [0.0, 0.0, 1.5])
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(12, 2)).double()
    # Both images have mean 1, so the channel means are [2, -1, 1.5].
    x = torch.tensor([[[[3.0, -1.0], [1.0, 1.0]]], [[[0.0, 2.0], [1.0, 1.0]]]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # 6 parameters, rows of 2: ⌊0.5 · 6⌋ = 3 is channel 0 plus one parameter of channel 2.
    top = select_targets(model, x, y, method="top-outputs", ratio=0.5, include=["0"])
    assert top.units == {"0": [0]}
    assert _selected_per_unit(top.mask, "0") == [2, 0, 1]
    lowest = select_targets(model, x, y, method="lowest-outputs", ratio=0.5, include=["0"])
    assert lowest.units == {"0": [1]}
    assert _selected_per_unit(lowest.mask, "0") == [0, 2, 1]


def test_outputs_before_a_batchnorm_rank_by_the_raw_output() -> None:
    """A convolution feeding a BatchNorm: channel 0's raw output is large (bias 100) but its
    running mean is 100 too, so after the normalisation it is 0; channel 1's raw output is 3
    and normalises to 3. The raw output ranks (the paper's statistic): channel 0 first.
    """
    conv = nn.Conv2d(1, 2, kernel_size=1).double()
    _set(conv, [[[[0.0]]], [[[1.0]]]], [100.0, 0.0])
    norm = nn.BatchNorm2d(2).double().eval()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([100.0, 0.0]))
        norm.running_var.fill_(1.0)
    model = nn.Sequential(conv, norm, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8, 2))
    model = model.double()
    x = torch.full((2, 1, 2, 2), 3.0, dtype=torch.float64)
    y = torch.tensor([0, 1])
    # 4 parameters, rows of 2: ⌊0.5 · 4⌋ = 2 is one whole channel.
    raw = select_targets(model, x, y, method="top-outputs", ratio=0.5, include=["0"])
    assert raw.units == {"0": [0]}


def _gradients_model() -> tuple[nn.Sequential, Tensor, Tensor]:
    """Logits are 0 on every input, so d(mean CE)/d logits = 1/3 − class frequency.

    Labels [0, 0, 0, 1] give g = [−5/12, 1/12, 1/3] at the logits (layer "2"). At the hidden
    layer "0" the gradient is relu'(pre-activation) · W2ᵀ g = [1, 0, 1] · [−5/12, 1/2, −1]:
    unit 1 is dead (pre-activation −1), though the gradient after the in-place ReLU is large.
    """
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=True), nn.Linear(3, 3)).double()
    _set(model[0], [[0, 0], [0, 0], [0, 0]], [1, -1, 1])
    _set(model[2], [[1, 0, 0], [0, 6, 0], [0, 0, -3]], [-1, 0, 3])
    torch.manual_seed(2)
    return model, torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 0, 0, 1])


@pytest.mark.parametrize(
    ("method", "hidden", "logits"),
    [("top-gradients", [2, 0], [0, 2]), ("lowest-gradients", [1, 0], [1, 2])],
)
def test_gradients_rank_units_by_absolute_mean_output_gradient(
    method: str, hidden: list[int], logits: list[int]
) -> None:
    model, x, y = _gradients_model()
    # Layer "0": 9 parameters in rows of 3; layer "2": 12 in rows of 4. ⌊0.67 · n⌋ = two units.
    selection = select_targets(model, x, y, method=method, ratio=0.67, batch_size=3)
    assert selection.units == {"0": hidden, "2": logits}


def test_top_gradients_match_the_bias_gradient_of_the_mean_removal_loss() -> None:
    """For Linear/Conv2d the mean output gradient is ∂L_U/∂bias up to a positive factor."""
    model = _mixed_model()
    x, y = _mixed_data(12)
    model.eval()
    loss = F.cross_entropy(model(x), y)
    bias_grads = torch.autograd.grad(loss, [model[0].bias, model[4].bias, model[6].bias])
    selection = select_targets(model, x, y, method="top-gradients", ratio=0.5, batch_size=5)
    for layer, grad in zip(["0", "4", "6"], bias_grads, strict=True):
        units = selection.units[layer]
        assert units == grad.abs().argsort(descending=True)[: len(units)].tolist()


# --------------------------------------------------------------------------------------------
# Layers: include / exclude / BatchNorm


def test_batchnorm_is_never_selected_unless_included() -> None:
    model = _mixed_model()
    x, y = _mixed_data()
    for method in SELECTION_METHODS:
        mask = select_target_mask(model, x, y, method=method, ratio=0.6)
        assert not mask["1.weight"].any() and not mask["1.bias"].any()
    mask = select_target_mask(model, x, y, method="top-outputs", ratio=0.6, include=["1"])
    assert int(mask["1.weight"].sum() + mask["1.bias"].sum()) == 6  # ⌊0.6 · 10⌋, drawn at random
    assert not any(mask[name].any() for name in mask if not name.startswith("1."))


def test_linear_conv_scope_is_every_linear_and_conv_parameter_and_all_is_everything() -> None:
    model = _mixed_model()
    scope = scope_mask(model, "linear-conv")
    assert set(scope) == {name for name, _ in model.named_parameters()}
    for name, mask in scope.items():
        assert bool(mask.all()) is (not name.startswith("1.")) and bool(mask.any()) == mask.all()
    assert all(mask.all() for mask in scope_mask(model, "all").values())


def test_linear_conv_scope_of_a_model_without_such_layers_is_an_error() -> None:
    with pytest.raises(GifError, match="influence.scope: all"):
        scope_mask(nn.Sequential(nn.BatchNorm1d(3)), "linear-conv")
    with pytest.raises(GifError, match="influence.scope"):
        scope_mask(_mixed_model(), "conv")


def test_include_restricts_to_matching_layers_and_exclude_removes_layers() -> None:
    model = _mixed_model()
    x, y = _mixed_data()
    mask = select_target_mask(model, x, y, method="top-outputs", ratio=0.5, include=["[46]"])
    assert {name for name, m in mask.items() if m.any()} == {
        "4.weight",
        "4.bias",
        "6.weight",
        "6.bias",
    }
    mask = select_target_mask(model, x, y, method="random", ratio=0.5, exclude=["4*"])
    assert {name.split(".")[0] for name, m in mask.items() if m.any()} == {"0", "6"}
    # A parameter name selects its layer too.
    mask = select_target_mask(model, x, y, method="top-outputs", ratio=0.5, include=["0.weight"])
    assert mask["0.bias"].any() and not mask["4.weight"].any()


def test_include_or_exclude_pattern_matching_no_layer_is_an_error() -> None:
    model = _mixed_model()
    x, y = _mixed_data()
    with pytest.raises(GifError, match=r"selection\.include: pattern 'fc\*' matches no layer"):
        select_target_mask(model, x, y, method="random", ratio=0.5, include=["fc*"])
    with pytest.raises(GifError, match=r"selection\.exclude: pattern 'head'"):
        select_target_mask(model, x, y, method="random", ratio=0.5, exclude=["head"])
    with pytest.raises(GifError, match="no target layer is left"):
        select_target_mask(model, x, y, method="random", ratio=0.5, exclude=["*"])


# --------------------------------------------------------------------------------------------
# Validation and errors


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_ratio_outside_zero_one_is_a_clear_error(ratio: object) -> None:
    model, x, y = _outputs_model()
    with pytest.raises(GifError, match=r"^ratio: must be a number in \(0, 1\], got"):
        select_target_mask(model, x, y, method="random", ratio=ratio)  # type: ignore[arg-type]


def test_unknown_method_names_the_key_and_the_choices() -> None:
    model, x, y = _outputs_model()
    with pytest.raises(GifError, match=r"^method: must be one of top-outputs, .*'top'"):
        select_target_mask(model, x, y, method="top", ratio=0.5)


def test_ratio_too_small_to_select_anything_is_an_error() -> None:
    model, x, y = _outputs_model()
    with pytest.raises(GifError, match=r"^ratio: 0\.01 selects no parameter"):
        select_target_mask(model, x, y, method="random", ratio=0.01)


def test_empty_removal_set_is_an_error_for_unit_methods_only() -> None:
    model = _mixed_model()
    x, y = torch.zeros(0, 2, 4, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    with pytest.raises(GifError, match="removal set is empty"):
        select_target_mask(model, x, y, method="top-outputs", ratio=0.5)
    assert select_target_mask(model, x, y, method="random", ratio=0.5)["0.weight"].any()


def test_layer_that_never_runs_cannot_be_ranked() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.spare = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x)

    model, x, y = Unused(), torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(GifError, match=r"layer 'spare' never ran .* selection\.exclude"):
        select_target_mask(model, x, y, method="top-outputs", ratio=0.5)
    mask = select_target_mask(model, x, y, method="top-outputs", ratio=0.5, exclude=["spare"])
    assert mask["fc.weight"].any() and not mask["spare.weight"].any()


# --------------------------------------------------------------------------------------------
# The model is left as it was; the reduction hook


@pytest.mark.parametrize("method", ["top-outputs", "top-gradients"])
def test_selection_does_not_modify_the_model(method: str) -> None:
    model = _mixed_model()
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    x, y = _mixed_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    select_target_mask(model, x, y, method=method, ratio=0.3)
    assert model.training and not model[1].training and model[4].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running stats included
    for module in model.modules():
        assert not module._forward_hooks
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["top-outputs", "lowest-gradients"])
def test_reduce_hook_sees_sums_and_counts_once(method: str) -> None:
    model = _mixed_model()
    x, y = _mixed_data()
    calls: list[Tensor] = []

    def two_identical_ranks(packed: Tensor) -> Tensor:
        calls.append(packed.clone())
        return packed * 2

    plain = select_target_mask(model, x, y, method=method, ratio=0.3)
    reduced = select_target_mask(model, x, y, method=method, ratio=0.3, reduce=two_identical_ranks)
    assert len(calls) == 1 and calls[0].dtype == torch.float64
    # 5 + 9 + 4 unit sums, then 3 counts: samples · positions for the conv, samples otherwise.
    assert calls[0].shape == (18 + 3,)
    assert calls[0][-3:].tolist() == [10 * 16, 10, 10]
    assert all(torch.equal(plain[k], reduced[k]) for k in plain)


# --------------------------------------------------------------------------------------------
# Determinism and files


def test_same_inputs_and_seed_give_a_byte_identical_file(tmp_path: Path) -> None:
    x, y = _mixed_data()
    metadata = {"task": "remove-class", "config": '{"seed": 0}', "Zeta": "z", "alpha": "a"}
    paths = []
    for run in range(2):
        mask = select_target_mask(_mixed_model(), x, y, method="top-gradients", ratio=0.3, seed=7)
        paths.append(tmp_path / f"run{run}" / "mask.safetensors")
        save_mask(paths[-1], mask, metadata=metadata)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = select_target_mask(_mixed_model(), x, y, method="top-gradients", ratio=0.3, seed=8)
    assert not all(torch.equal(mask[k], other[k]) for k in mask)  # the remainder draws differ


def test_mask_file_has_sorted_keys_fixed_metadata_and_reads_back(tmp_path: Path) -> None:
    model = _mixed_model()
    mask = select_target_mask(model, *_mixed_data(), method="random", ratio=0.4)
    path = tmp_path / "mask.safetensors"
    save_mask(path, mask, metadata={"b": "2", "a": "1", "format": "ignored"})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert list(header) == ["__metadata__", *sorted(mask)]
    assert header["__metadata__"] == {
        "a": "1",
        "b": "2",
        "format": "gif-target-mask",
        "format_version": "1",
    }
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == "gif-target-mask"
    for loaded in (load_file(path), load_mask(path, model)):
        assert set(loaded) == set(mask)
        assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], mask[k]) for k in mask)
    assert list(load_mask(path, model)) == [name for name, _ in model.named_parameters()]
    assert [p.name for p in tmp_path.iterdir()] == ["mask.safetensors"]  # no temporary left


def _saved_mask(tmp_path: Path, tensors: dict[str, Tensor]) -> Path:
    path = tmp_path / "mask.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("4.bias"), r"tensor '4\.bias' is missing"),
        (lambda m: m.update({"7.weight": torch.ones(2, dtype=torch.bool)}), r"'7\.weight' is not"),
        (
            lambda m: m.update({"6.weight": torch.ones(4, 8, dtype=torch.bool)}),
            r"'6\.weight' has shape \[4, 8\], the parameter has \[4, 9\]",
        ),
        (lambda m: m.update({"0.bias": torch.ones(5)}), r"'0\.bias' has dtype torch\.float32"),
    ],
)
def test_mask_that_does_not_fit_names_the_first_mismatching_tensor(
    tmp_path: Path, edit, message: str
) -> None:
    model = _mixed_model()
    mask = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in model.named_parameters()}
    edit(mask)
    path = _saved_mask(tmp_path, mask)
    with pytest.raises(GifError, match=message) as info:
        load_mask(path, model)
    assert str(info.value).startswith(f"{path}: does not fit the model")
    assert "re-run `gif select-params` with the same model config" in str(info.value)


def test_unreadable_mask_file_names_the_path(tmp_path: Path) -> None:
    model = _mixed_model()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    for path in (garbage, tmp_path / "missing.safetensors"):
        with pytest.raises(GifError, match="^" + re.escape(f"{path}: cannot read the mask")):
            load_mask(path, model)


# --------------------------------------------------------------------------------------------
# Flat vectors and summaries


def test_flat_mask_follows_named_parameters_and_skips_frozen_ones() -> None:
    model = _mixed_model()
    model[1].requires_grad_(False)
    mask = select_target_mask(model, *_mixed_data(), method="random", ratio=0.5)
    assert "1.weight" not in mask
    flat = mask_to_flat(model, mask)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert flat.dtype == torch.bool and flat.numel() == sum(p.numel() for _, p in trainable)
    assert torch.equal(flat, torch.cat([mask[n].reshape(-1) for n, _ in trainable]))
    # A parameter absent from the mask is fixed.
    partial = mask_to_flat(model, {"6.bias": torch.ones(4, dtype=torch.bool)})
    assert int(partial.sum()) == 4 and bool(partial[-4:].all())


def test_summary_rows_count_parameters_selected_and_whole_units() -> None:
    model = _mixed_model()
    selection = select_targets(model, *_mixed_data(), method="top-outputs", ratio=0.3)
    rows = summarize_mask(model, selection.mask, selection.units)
    assert [(r["layer"], r["type"], r["parameters"], r["selected"]) for r in rows] == [
        ("0", "Conv2d", 95, 28),
        ("1", "BatchNorm2d", 10, 0),
        ("4", "Linear", 729, 218),
        ("6", "Linear", 40, 12),
    ]
    assert [r["units"] for r in rows] == [1, None, 2, 1]
    assert rows[2]["fraction"] == pytest.approx(218 / 729)
    # Counted from the mask alone (a loaded mask), the whole units are the same.
    assert summarize_mask(model, selection.mask) == rows


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["top-outputs", "top-gradients"])
def test_cuda_selection_matches_cpu(method: str) -> None:
    x, y = _mixed_data()
    on_cpu = select_target_mask(_mixed_model(), x, y, method=method, ratio=0.3)
    model = _mixed_model().cuda()
    on_cuda = select_target_mask(model, x, y, method=method, ratio=0.3, device="cuda")
    assert all(m.device.type == "cpu" and torch.equal(m, on_cpu[k]) for k, m in on_cuda.items())
