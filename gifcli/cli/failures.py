"""The one line for an exception no check foresaw (the CLI's last line of defence)."""

from __future__ import annotations

import errno

from gifcli import distributed


def unexpected_error_line(exc: BaseException) -> str:
    """The one line for an exception no check foresaw: what it is and how to see more."""
    lost = _peer_lost(exc)
    if lost:
        return lost
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" in {exc.filename}" if exc.filename else ""
        return f"no space left on device{where}; free some space and rerun"
    if isinstance(exc, MemoryError):
        return (
            "out of memory; lower influence.batch_size or influence.hessian_samples, or use a "
            "machine with more memory"
        )
    message = " ".join(str(exc).split())[:300] or "no message"
    return (
        f"internal error ({type(exc).__name__}): {message}; rerun with GIF_DEBUG=1 for the "
        f"traceback"
    )


def _peer_lost(exc: BaseException) -> str | None:
    """Under torchrun, a collective fails on every rank once one rank has stopped."""
    if not distributed.launched():
        return None
    import torch.distributed as dist

    closed = "Connection closed by peer"
    if closed in str(exc):
        return f"another rank stopped ({closed}); its own message says why"
    if isinstance(exc, getattr(dist, "DistError", ())):
        reason = " ".join(str(exc).split())[:120]
        return (
            f"the process group failed ({type(exc).__name__}: {reason}); another rank may "
            f"have stopped, its own message says why"
        )
    return None
