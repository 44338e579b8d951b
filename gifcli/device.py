"""``device: auto | cpu | cuda[:N]`` -> a torch.device.

Under ``torchrun`` with several processes, ``auto`` (when CUDA is there) and ``cuda`` give each
process its own GPU, ``cuda:LOCAL_RANK``; a fixed ``cuda:N`` cannot be shared by several ranks.
"""

from __future__ import annotations

import torch

from gifcli import distributed
from gifcli.errors import GifError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit CUDA request needs CUDA."""
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return _rank_device(spec) if distributed.launched() else torch.device("cuda")
    if spec == "cpu":
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise GifError(f"device: {spec!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type != "cuda":
        raise GifError(f"device: {spec!r} is not supported; use auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise GifError(
            f"device: {spec!r} requested but CUDA is not available here; use "
            f"device=auto or device=cpu"
        )
    if distributed.launched():
        if device.index is not None:
            raise GifError(
                f"device: {spec!r} names one GPU, but torchrun started "
                f"{distributed.world_size()} processes that each need their own; "
                f"use device=cuda (each process takes cuda:LOCAL_RANK; choose the "
                f"GPUs with CUDA_VISIBLE_DEVICES)"
            )
        return _rank_device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise GifError(
            f"device: {spec!r} does not exist; {torch.cuda.device_count()} CUDA "
            f"device(s) are visible"
        )
    return device


def _rank_device(spec: str) -> torch.device:
    """``cuda:LOCAL_RANK`` for this torchrun process."""
    index, count = distributed.local_rank(), torch.cuda.device_count()
    if index >= count:
        raise GifError(
            f"device: {spec!r} gives each torchrun process its own GPU, but this is "
            f"local process {index} and {count} CUDA device(s) are visible; start "
            f"at most {count} processes per machine (--nproc_per_node) or use "
            f"device=cpu"
        )
    return torch.device("cuda", index)
