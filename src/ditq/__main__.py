"""``python -m ditq``: the ``ditq`` command line."""

from ditq.cli.main import entry

entry()
