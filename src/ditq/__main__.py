"""``python -m ditq``: the ``ditq`` command line."""

import sys

from ditq.cli.main import main

sys.exit(main())
