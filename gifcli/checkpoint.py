"""Load ``.safetensors`` / ``.pt`` / ``.pth`` checkpoints; save safetensors with metadata.

``.pt`` files are read with ``weights_only=True``: a state dict, or a dict holding one under
``net``, ``state_dict`` or ``model``. A ``module.`` prefix (DataParallel/DDP) is stripped.
Outputs are written to a temporary name beside the target and renamed, so a failed run never
leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gifcli import __version__
from gifcli.errors import GifError

WRAPPER_KEYS = ("net", "state_dict", "model")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on CPU, ``module.`` prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise GifError(
            f"{path}: checkpoint not found; train one with `gif train CONFIG -o "
            f"{path}` or set `checkpoint:` in the config"
        )
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
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()})
    return state


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
    path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Save CPU, contiguous tensors as safetensors, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def recorded_config(path: str | Path) -> tuple[str | None, dict]:
    """The task a checkpoint written by gif was made for (``train``, ``retrain`` or an edit's
    task) and the resolved config its metadata records; ``(None, {})`` when there is none."""
    if Path(path).suffix != ".safetensors":
        return None, {}
    try:
        metadata = read_metadata(path)
        text = metadata.get("config")
        raw = yaml.safe_load(text) if text else None
    except (OSError, SafetensorError, yaml.YAMLError, ValueError):
        return None, {}
    return metadata.get("task"), raw if isinstance(raw, dict) else {}


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise GifError(
            f"{path.parent}: cannot write here ({exc.strerror}); choose another output path"
        ) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with ``writer(tmp_path)`` (e.g. a matplotlib savefig)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def check_writable(directory: str | Path) -> None:
    """Fail early, before any work, when ``directory`` cannot be created or written to.

    Creates nothing: the nearest existing ancestor must be a writable folder.
    """
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "is not a folder" if not existing.is_dir() else "is not writable"
        raise GifError(
            f"{directory}: cannot write here ({existing} {reason}); choose another output path"
        )
