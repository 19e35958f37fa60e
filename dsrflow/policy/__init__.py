"""Legal deadlines as data: when a data-subject request must be acknowledged and completed.

Each jurisdiction's rules are a TOML file in ``dsrflow/policy/jurisdictions/`` (read once, on
first use); :func:`deadlines` counts them on the jurisdiction's calendar and time zone, by the
counting rule the file names (``Deadlines.counting_rule``). :func:`verification_clock` says
whether a jurisdiction's clock runs while identity is verified; :func:`internal_target` places
the organisation's own, earlier target (:func:`parse_target_spec` checks its setting). Pure
functions: no I/O beyond reading the bundled files.

What can go wrong::

    ValueError
    ├── UnknownJurisdiction   no data file for the code (bad input: dead-letter the request)
    ├── UnsupportedRight      the data file has no period for the right
    └── (plain)               received_at is naive, or the right name is not a Right
    │                         (and parse_target_spec / internal_target: a bad target setting)
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
    TargetSpec,
    UnknownJurisdiction,
    UnsupportedRight,
    Verification,
    deadlines,
    denial_ground,
    internal_target,
    jurisdictions,
    parse_target_spec,
    rules,
    verification_clock,
    working_calendar,
)

__all__ = [
    "DenialGround",
    "denial_ground",
    "Deadlines",
    "JurisdictionRules",
    "PolicyDataError",
    "TargetSpec",
    "UnknownJurisdiction",
    "UnsupportedRight",
    "Verification",
    "WorkingCalendar",
    "add_months",
    "deadlines",
    "internal_target",
    "jurisdictions",
    "parse_target_spec",
    "rules",
    "verification_clock",
    "working_calendar",
]
