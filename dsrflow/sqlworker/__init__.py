"""A declarative SQL worker: a YAML description of a PostgreSQL database is enough to locate,
export, erase, rectify and restrict a data subject's rows, with no code::

    from dsrflow.sqlworker import load_spec, sql_worker

    worker = sql_worker(load_spec("loyalty.yaml"), dsn_from=lambda settings: settings.database_dsn("loyalty"))

The YAML format is described in :mod:`dsrflow.sqlworker.spec`; what each action does, and what
is checked against the database at startup, in :mod:`dsrflow.sqlworker.worker`. The reference
example is ``examples/loyalty``.
"""

from .spec import DatabaseSpec, SpecError, erase_order, load_spec, parse_spec
from .worker import Plan, SqlSystem, inspect, quote_ident, sql_worker

__all__ = [
    "DatabaseSpec",
    "Plan",
    "SpecError",
    "SqlSystem",
    "erase_order",
    "inspect",
    "load_spec",
    "parse_spec",
    "quote_ident",
    "sql_worker",
]
