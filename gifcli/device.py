"""``device: auto | cpu | cuda[:N]`` -> a torch.device."""

from __future__ import annotations

import torch

from gifcli.errors import GifError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit CUDA request needs CUDA."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise GifError(f"device: {spec!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type != "cuda":
        raise GifError(f"device: {spec!r} is not supported; use auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise GifError(f"device: {spec!r} requested but CUDA is not available here; use "
                       f"device=auto or device=cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise GifError(f"device: {spec!r} does not exist; {torch.cuda.device_count()} CUDA "
                       f"device(s) are visible")
    return device
