"""The one exception type the CLI turns into a one-line message and exit code 1."""


class GifError(Exception):
    """An expected problem with the inputs or the run.

    The message names the file or config key at fault and says what to do; the CLI prints it
    without a traceback and exits 1.
    """
