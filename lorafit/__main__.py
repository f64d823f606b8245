"""``python -m lorafit`` runs the CLI, exactly like the ``lorafit`` executable."""

from lorafit.cli import app

app(prog_name="lorafit")
