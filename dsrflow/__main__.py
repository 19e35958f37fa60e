"""``python -m dsrflow``: the ``dsrflow`` command line (see :mod:`dsrflow.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
