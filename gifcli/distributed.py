"""Several processes under ``torchrun``: the process group, who does what, and the all-reduce.

Run as one process, nothing here does anything: every helper answers "rank 0 of 1" and
``all_reduce_sum`` is the identity. Under ``torchrun --nproc_per_node N`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) with ``N > 1``:

- ``process_group(device)``, a context manager owned by the caller (the CLI's runs), joins
  the process group from those variables (``gloo`` for CPU tensors, ``nccl`` for CUDA ones)
  and leaves it: after a barrier when every rank completed the block, at once when this rank
  stopped on an error;
- ``shard(count)`` gives each rank its contiguous, balanced share of a sample that every rank
  holds in full (the same seeded Hessian sample, the same removal set);
- ``all_reduce_sum`` sums a tensor over the ranks: the reduction point of the influence engine
  (``gifcli.influence.hvp.reduce_sum``) and of the selection statistics;
- ``is_main()``: rank 0 alone writes outputs and talks to people.

Every rank reads the same config and data and validates them identically before its first
collective, so an input error stops every rank at the same point with the same message.

torch is imported only to join a group (``init``) and to build a shard. Before torch is
imported no group can exist, so until then every answer comes from the environment: the CLI
asks which rank it is as each command starts, and ``gif --help`` or ``gif configs`` never load
torch.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

_joined = False
"""True while this module's ``init`` holds the process group (a caller's own is left alone)."""
_SETTLE_SECONDS = 0.2


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def _dist() -> ModuleType | None:
    """``torch.distributed`` if something imported it, else None (then no group exists)."""
    return sys.modules.get("torch.distributed")


def launched() -> bool:
    """True when ``torchrun`` (or an equivalent launcher) started more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """True once this process has joined a process group of more than one rank."""
    dist = _dist()
    return (
        dist is not None
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def world_size() -> int:
    """Number of processes sharing the work (1 without ``torchrun``)."""
    return _dist().get_world_size() if active() else _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank, 0 to ``world_size() - 1``."""
    return _dist().get_rank() if active() else _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine: the CUDA device index it uses."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on rank 0, the one process that writes outputs and prints."""
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group described by the environment, once; a no-op for one process.

    ``device`` is where this rank computes: CUDA tensors are reduced with ``nccl``, CPU tensors
    with ``gloo``. Call it on every rank after the inputs are validated and before the first
    collective.
    """
    global _joined
    if not launched() or active():
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://")
    _joined = True
    atexit.register(destroy)


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the process group for the block (a no-op for one process, or when the caller
    already holds a group of its own); leave it on the way out."""
    owned = not _joined
    init(device)
    try:
        yield
    except BaseException:
        if owned:
            destroy()
        raise
    if owned:
        finish()


def finish() -> None:
    """The clean end of a run that every rank completed: wait for all, then leave the group.

    Only for paths every rank takes: on a rank that stopped on its own, the barrier would wait
    for ranks still computing.
    """
    if _joined:
        barrier()
    destroy()


def destroy() -> None:
    """Leave the process group ``init`` joined (registered to run at exit); no barrier.

    A gloo worker thread lets go of a finished collective's tensors only after the caller has
    its result, and doing so takes the GIL: should the interpreter be shutting down by then, the
    process aborts ("terminate called without an active exception"). A short pause with the GIL
    released lets the workers finish first.
    """
    global _joined
    if _joined and _dist().is_initialized():
        time.sleep(_SETTLE_SECONDS)
        _dist().destroy_process_group()
    _joined = False


def barrier() -> None:
    """Wait until every rank gets here (a no-op for one process)."""
    if active():
        _dist().barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``Σ_ranks tensor``, on every rank (``tensor`` itself is left unchanged).

    The identity for one process. Every rank must call it, in the same order, with a tensor of
    the same shape and dtype on its compute device; every rank gets the same result.
    """
    if not active():
        return tensor
    dist = _dist()
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def shard(count: int) -> Tensor:
    """Indices ``[k]`` (int64) of this rank's share of ``count`` items that every rank holds.

    Contiguous and balanced: rank ``r`` takes the ``r``-th of ``world_size()`` consecutive
    blocks, the first ``count % world_size()`` blocks one item longer. With fewer items than
    ranks every rank takes all of them: the engine reduces sums and counts together before
    dividing, so a replicated sample gives the same mean, and no rank is left empty.
    """
    import torch

    world = world_size()
    if world == 1 or count < world:
        return torch.arange(count)
    base, extra = divmod(count, world)
    r = rank()
    start = r * base + min(r, extra)
    return torch.arange(start, start + base + (r < extra))
