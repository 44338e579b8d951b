import pytest
import torch
from torch import nn

from gifcli.checkpoint import (
    checkpoint_metadata,
    load_into,
    load_state_dict,
    read_metadata,
    save_checkpoint,
    sha256_file,
)
from gifcli.errors import GifError


def small_model(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, out))


def assert_same_state(model, other):
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), other.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)


def test_safetensors_round_trip_with_metadata(tmp_path):
    model = small_model()
    path = tmp_path / "m.safetensors"
    save_checkpoint(
        path,
        model.state_dict(),
        checkpoint_metadata(task="train", config_yaml="seed: 0\n", input_sha256="ab"),
    )
    other = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    load_into(other, path)
    assert_same_state(model, other)
    metadata = read_metadata(path)
    assert metadata["task"] == "train" and metadata["input_sha256"] == "ab"
    assert metadata["config"] == "seed: 0\n" and "version" in metadata
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("wrap", [None, "net", "state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_pt_state_dicts_wrapped_or_prefixed(tmp_path, wrap, prefix):
    model = small_model()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "m.pt"
    torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    other = small_model(3)
    nn.init.zeros_(other[0].weight)
    load_into(other, path)
    assert_same_state(model, other)


def test_pt_files_load_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"net": small_model()}, path)  # a pickled module, not a state dict
    with pytest.raises(GifError, match="weights_only=True"):
        load_state_dict(path)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    path = tmp_path / "m.safetensors"
    state = small_model(out=4).state_dict()
    state.pop("0.bias")
    state["extra.weight"] = torch.zeros(1)
    save_checkpoint(path, state, {})
    with pytest.raises(GifError) as info:
        load_into(small_model(out=3), path)
    message = str(info.value)
    assert "missing: 0.bias" in message and "unexpected: extra.weight" in message
    assert "wrong shape: 2.weight (4, 5) vs model (3, 5)" in message


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("m.safetensors", b"not a safetensors file", "not a readable safetensors"),
        ("m.pt", b"garbage", "cannot load"),
        ("m.ckpt", b"", "unknown checkpoint format"),
    ],
)
def test_corrupt_or_unknown_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(GifError, match=match):
        load_state_dict(path)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(GifError, match="gif train"):
        load_state_dict(tmp_path / "none.safetensors")


def test_sha256_is_stable(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert sha256_file(path) == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_files_are_byte_identical_for_equal_inputs_and_read_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    state = {
        "w": torch.randn(3, 4),
        "half": torch.randn(5).to(torch.bfloat16),
        "count": torch.tensor(7),
        "mask": torch.rand(2, 2) > 0.5,
        "empty": torch.zeros(0, 3, dtype=torch.float64),
    }
    metadata = {f"key{i}": f"value {i}" for i in range(20)}
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_checkpoint(first, state, metadata)
    save_checkpoint(second, dict(reversed(state.items())), dict(reversed(metadata.items())))
    assert first.read_bytes() == second.read_bytes()
    loaded = load_file(first)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())
    assert read_metadata(first) == metadata


def test_files_follow_the_umask(tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {})
    finally:
        os.umask(previous)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: s.update({"0.weight": s["0.weight"].long()}), "'0.weight' is int64 but"),
        (lambda s: s.update({"0.weight": s["0.weight"] > 0}), "'0.weight' is bool but"),
        (lambda s: s["2.bias"].fill_(float("nan")), "'2.bias' holds NaN or infinite"),
        (lambda s: s["2.bias"].fill_(float("inf")), "'2.bias' holds NaN or infinite"),
        (lambda s: s.update({"0.bias": s["0.bias"].double() * 1e300}), "'0.bias' holds NaN"),
        (lambda s: s.update({"1.num_batches_tracked": torch.tensor(0.5)}), "is float32 but"),
    ],
    ids=["int weights", "bool weights", "nan", "inf", "overflows float32", "float counter"],
)
def test_ill_typed_or_non_finite_tensors_are_refused_by_name(tmp_path, change, match):
    state = small_model().state_dict()
    change(state)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, state, {})
    with pytest.raises(GifError, match=match) as info:
        load_into(small_model(), path)
    assert str(path) in str(info.value)
