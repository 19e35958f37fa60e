"""``python -m dsrflow.worker package.module[:attribute]``: run a worker with the DSRFLOW_* settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..settings import get_settings
from . import load_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsrflow.worker", description=__doc__)
    parser.add_argument("worker", help="module:attribute of a dsrflow Worker, e.g. examples.crm.worker:worker")
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = load_worker(args.worker)
    asyncio.run(worker.run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
