"""The ``gif`` command line: one module per command, each a thin layer over the core.

A Ctrl-C while the commands are imported (Typer and Rich: a few tenths of a second) ends the
process with one line instead of a traceback from inside an import. ``gifcli.cli.main`` hands
SIGINT back to Python once every command is imported; a command imports torch only when it
runs, where its own handler turns a Ctrl-C into one line too.
"""

import os
import signal
import threading


def _interrupted_at_start_up(signum: int, frame: object) -> None:
    os.write(2, b"interrupted: during start-up; nothing was written\n")
    os._exit(128 + signum)  # nothing to clean up: no command has started


def restore_sigint() -> None:
    """Give SIGINT back to Python (KeyboardInterrupt) if the start-up handler still holds it."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is _interrupted_at_start_up
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


if (
    threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    signal.signal(signal.SIGINT, _interrupted_at_start_up)
