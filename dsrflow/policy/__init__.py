"""Legal deadlines as data: when a data-subject request must be acknowledged and completed.

Each jurisdiction's rules are a TOML file in ``dsrflow/policy/jurisdictions/`` (read once, on
first use); :func:`deadlines` counts them on the jurisdiction's calendar and time zone. Pure
functions: no I/O beyond reading the bundled files.

What can go wrong::

    ValueError
    ├── UnknownJurisdiction   no data file for the code (bad input: dead-letter the request)
    ├── UnsupportedRight      the data file has no period for the right
    └── (plain)               received_at is naive, or the right name is not a Right
    RuntimeError
    └── PolicyDataError       a bundled data file is malformed (a packaging bug)
"""

from __future__ import annotations

from .calendars import WorkingCalendar, add_months
from .deadlines import (
    Deadlines,
    DenialGround,
    JurisdictionRules,
    PolicyDataError,
    UnknownJurisdiction,
    UnsupportedRight,
    deadlines,
    denial_ground,
    jurisdictions,
    rules,
    working_calendar,
)

__all__ = [
    "DenialGround",
    "denial_ground",
    "Deadlines",
    "JurisdictionRules",
    "PolicyDataError",
    "UnknownJurisdiction",
    "UnsupportedRight",
    "WorkingCalendar",
    "add_months",
    "deadlines",
    "jurisdictions",
    "rules",
    "working_calendar",
]
