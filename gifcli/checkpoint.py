"""Load ``.safetensors`` / ``.pt`` / ``.pth`` checkpoints; save safetensors with metadata.

``.pt`` files are read with ``weights_only=True``: a state dict, or a dict holding one under
``net``, ``state_dict`` or ``model``. A ``module.`` prefix (DataParallel/DDP) is stripped.
A checkpoint must fit the model key by key, in shape and in kind (floating-point weights for
floating-point parameters), with finite values. Files are written atomically
(``gifcli.outputs``) and byte-reproducibly: the same tensors and metadata give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from gifcli import __version__
from gifcli.config import MAX_CONFIG_BYTES, safe_yaml
from gifcli.errors import GifError
from gifcli.inputs import check_input, open_input
from gifcli.outputs import atomic_path

WRAPPER_KEYS = ("net", "state_dict", "model")
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def sha256_file(path: str | Path, *, what: str = "the checkpoint") -> str:
    digest = hashlib.sha256()
    with open_input(path, what=what, missing="it was removed while gif ran") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on CPU, ``module.`` prefixes stripped."""
    path = Path(path)
    check_checkpoint(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise GifError(f"{path}: not a readable safetensors file ({_short(exc)})") from None
    elif path.suffix in (".pt", ".pth"):
        state = _load_torch(path)
    else:
        raise GifError(
            f"{path}: unknown checkpoint format {path.suffix!r}; use .safetensors, .pt or .pth"
        )
    return {_strip(k): v for k, v in state.items()}


def check_checkpoint(
    path: str | Path,
    missing: str = "train one with `gif train CONFIG -o PATH` or set `checkpoint:` in the config",
) -> None:
    """Refuse a checkpoint path that is not a regular file (``gifcli.inputs``), at once."""
    check_input(path, what="checkpoint", missing=missing.replace("PATH", str(path)))


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise GifError(
            f"{path}: cannot load with weights_only=True ({_short(exc)}); save a "
            f"plain state dict with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise GifError(
            f"{path}: expected a state dict of tensors (or one under {', '.join(WRAPPER_KEYS)})"
        )
    return obj


def _strip(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def load_into(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint into ``model``; a mismatch lists missing, unexpected and misshaped keys.

    Returns the loaded state dict (CPU tensors).
    """
    state = load_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        parts = [
            f"{label}: {_listing(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", misshaped),
            )
            if keys
        ]
        raise GifError(
            f"{path}: checkpoint does not fit model.arch ({'; '.join(parts)}); check "
            f"model.arch, model.num_classes and the data set"
        )
    converted = {}
    for name, reference in expected.items():
        tensor = state[name]
        if _kind(tensor) != _kind(reference):
            raise GifError(
                f"{path}: tensor {name!r} is {_dtype(tensor)} but the model's is "
                f"{_dtype(reference)}; save the model's own state dict (model.state_dict())"
            )
        converted[name] = tensor.to(reference.dtype)
        if converted[name].is_floating_point() and not torch.isfinite(converted[name]).all():
            raise GifError(
                f"{path}: tensor {name!r} holds NaN or infinite values (as "
                f"{_dtype(reference)}); the checkpoint is broken: retrain it or pick another"
            )
    model.load_state_dict(converted)
    return state


def _kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.is_floating_point():
        return "float"
    return "complex" if tensor.is_complex() else "int"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _listing(keys: list[str], most: int = 5) -> str:
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def checkpoint_metadata(
    *, task: str, config_yaml: str, input_sha256: str | None = None, **extra: str
) -> dict[str, str]:
    """Safetensors metadata: tool version, task, resolved config and the input's sha256."""
    metadata = {"tool": "gif", "version": __version__, "task": task, "config": config_yaml}
    if input_sha256:
        metadata["input_sha256"] = input_sha256
    metadata.update({k: str(v) for k, v in extra.items()})
    return metadata


def save_checkpoint(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write ``tensors`` (a state dict, a mask) and the string ``metadata`` as a safetensors
    file, atomically.

    Tensors and metadata keys are in sorted order, so equal inputs give a byte-identical file
    (the safetensors library orders metadata by a randomised hash, hence this writer). The
    layout is the format's: an 8-byte little-endian header length, the JSON header padded with
    spaces to 8 bytes, then each tensor's little-endian bytes in header order.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors code")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        ordered.append(tensor)
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in ordered:
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    check_checkpoint(path)
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def recorded_config(path: str | Path, notes: list[str] | None = None) -> tuple[str | None, dict]:
    """The task a checkpoint written by gif was made for (``train``, ``retrain`` or an edit's
    task) and the resolved config its metadata records; ``(None, {})`` when there is none.

    A recorded config larger than a config may be (``MAX_CONFIG_BYTES``) or that is not valid
    YAML is ignored, with a line in ``notes`` saying why: the metadata is anyone's to write."""
    if Path(path).suffix != ".safetensors":
        return None, {}
    try:
        metadata = read_metadata(path)
    except (OSError, SafetensorError, ValueError):
        return None, {}
    task, text = metadata.get("task"), metadata.get("config")
    if not text:
        return task, {}
    reason = None
    if len(text) > MAX_CONFIG_BYTES:
        reason = f"{len(text):,} characters, more than the {MAX_CONFIG_BYTES:,} of a config"
    else:
        try:
            raw = safe_yaml(text, source="its metadata")
        except yaml.YAMLError as exc:
            reason = f"malformed YAML: {getattr(exc, 'problem', None) or type(exc).__name__}"
        except (GifError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:120]
    if reason is not None:
        if notes is not None:
            notes.append(f"{path}: the config in its metadata is ignored ({reason})")
        return task, {}
    return task, raw if isinstance(raw, dict) else {}
