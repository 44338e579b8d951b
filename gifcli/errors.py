"""The exception types the CLI turns into a one-line message and an exit code."""

from __future__ import annotations


class GifError(Exception):
    """An expected problem with the inputs or the run.

    The message names the file or config key at fault and says what to do; the CLI prints it
    without a traceback and exits 1.
    """


class UsageError(GifError):
    """A malformed command line (e.g. a ``KEY=VALUE`` override without ``=``): exit code 2."""


class ParameterError(GifError):
    """A bad argument of a library function, named as the function names it (``damping``).

    The pipeline re-raises it under the settings path the argument came from
    (``influence.damping``), which is also the config key, so a CLI user reads the key they
    can change and a library user the argument they passed.
    """

    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__(f"{parameter}: {detail}")
        self.parameter = parameter
        self.detail = detail

    def under(self, path: str) -> ParameterError:
        """The same problem named by ``path`` (e.g. ``influence.damping``)."""
        return ParameterError(path, self.detail)
