"""``python tests/paused_gif.py STAGE ARGS...``: ``gif ARGS``, stopped at the point ``STAGE`` of
the write phase (``gifcli.outputs``, module doc) until a signal arrives (60 s at most), so that a
fault test can interrupt or kill it there. ``moved-old`` exists only in the two-rename publish,
which it forces."""

import sys
import time

from gifcli import outputs

STAGE = sys.argv.pop(1)


def pause(stage: str) -> None:
    if stage != STAGE:
        return
    sys.stderr.write(f"gif: paused at {stage}\n")
    sys.stderr.flush()
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline and outputs._deferred.pending is None:
        time.sleep(0.02)


outputs._pause = pause
if STAGE == "moved-old":
    outputs._exchange = lambda a, b: False

from gifcli.cli.main import app  # noqa: E402  (after the patch, as `python -m gifcli` does)

app(prog_name="gif")
