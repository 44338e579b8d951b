"""``python -m gifcli``: the ``gif`` command."""

from gifcli.cli.main import app

app(prog_name="gif")
