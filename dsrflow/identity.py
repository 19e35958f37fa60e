"""Identifiers of a data subject: one normal form for each type, and the rule that decides
which records a set of identifiers may act on.

Normal forms (requests, tasks and the worker SDK's matching all use these):

- email: trimmed and lower-cased;
- phone: E.164 (``+84912345678``), parsed with Google's libphonenumber (the ``phonenumbers``
  package). A number written the local way (``0912 345 678``) is read in the region of the
  request's jurisdiction (Vietnam by default), so it finds the person a system stores as
  ``+84912345678``;
- every other type: trimmed.

The matching rule (:func:`match_subject`): a worker acts only on records that *all* of the
task's identifiers agree on. A record agrees when, for every identifier type of the task, its
value is that identifier or is unknown (empty). When the identifiers find records that disagree
(the verified email of one person and the phone of another, say), they point to different
people: the task ends as ``conflict`` for the DPO, and nobody's data is exported or erased. So
do records that agree but share no identifier (one found only by the email, another only by the
phone): nothing links them to one person.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import phonenumbers

from .rights import IdentifierType

__all__ = [
    "DEFAULT_REGION", "SubjectMatch", "match_subject", "normalise", "normalise_lenient", "normalise_phone",
    "region_of",
]

DEFAULT_REGION = "VN"
R = TypeVar("R")

#: Jurisdiction codes that are not the ISO 3166 code of their country.
_REGION_ALIASES = {"UK": "GB"}


def region_of(jurisdiction: str | None) -> str | None:
    """The phone region of a jurisdiction code: ``VN`` -> ``VN``, ``US-CA`` -> ``US``, ``UK`` ->
    ``GB``; None where a jurisdiction spans several countries (``EU``): local numbers then need
    their ``+`` prefix. No jurisdiction at all: Vietnam."""
    if not jurisdiction:
        return DEFAULT_REGION
    country = jurisdiction.split("-", 1)[0].strip().upper()
    country = _REGION_ALIASES.get(country, country)
    return country if country in phonenumbers.SUPPORTED_REGIONS else None


def normalise_phone(value: str, region: str | None = DEFAULT_REGION) -> str:
    """A phone number in E.164. Raises ValueError (without the number: it is personal data)."""
    text = value.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else region)
    except phonenumbers.NumberParseException:
        raise ValueError("phone identifier is not a phone number"
                         + ("" if region or text.startswith("+") else " (give it with its +country code)")) from None
    if not phonenumbers.is_possible_number(number):
        raise ValueError("phone identifier is not a possible phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise(kind: IdentifierType | str, value: str, *, region: str | None = DEFAULT_REGION) -> str:
    """``value`` in the normal form of its identifier type (see the module docstring)."""
    kind = IdentifierType(kind)
    if kind == IdentifierType.email:
        email = value.strip().lower()
        local, at, domain = email.rpartition("@")
        labels = domain.split(".")
        if not at or not local or len(labels) < 2 or not all(labels) or any(ch.isspace() for ch in email):
            raise ValueError("email identifier is not an email address")
        return email
    if kind == IdentifierType.phone:
        return normalise_phone(value, region)
    return value.strip()


def normalise_lenient(kind: IdentifierType | str, value: str, *, region: str | None = DEFAULT_REGION) -> str:
    """:func:`normalise`, or where that refuses a value the v1 topic accepted before phones and
    emails were parsed (``admin@localhost``; a local number in a jurisdiction of several countries;
    8 digits or more that are no possible number), the form v1 kept: an email lower-cased, a phone
    as ``+`` and digits. Requests valid then stay valid (they are matched as they were)."""
    try:
        return normalise(kind, value, region=region)
    except ValueError:
        kind = IdentifierType(kind)
        text = value.strip()
        if kind == IdentifierType.email and "@" in text and not any(c.isspace() for c in text):
            return text.lower()
        if kind == IdentifierType.phone:
            digits = "".join(ch for ch in text if ch.isdigit() or ch == "+")
            if len(digits.lstrip("+")) >= 8:
                return digits
        raise


def _stored(kind: IdentifierType, value: Any, region: str | None) -> str | None:
    """A stored value in normal form, or None when unknown (empty) or unreadable."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        return normalise(kind, text, region=region)
    except ValueError:
        return text  # compared as stored: it cannot equal a normalised identifier by accident


@dataclass(frozen=True, slots=True)
class SubjectMatch(Generic[R]):
    """What a task's identifiers found in a system's records.

    ``found``: every record that any identifier found. ``records``: the ones to act on (every
    identifier agrees on each of them); empty when ``conflict``. ``conflict``: some found record
    disagrees with one of the identifiers, so they point to different people.
    """

    found: list[R] = field(default_factory=list)
    records: list[R] = field(default_factory=list)
    conflict: bool = False
    #: identifier types on which a found record disagreed (no values: for the receipt's reason)
    disagreeing: tuple[IdentifierType, ...] = ()

    @property
    def not_found(self) -> bool:
        return not self.found

    def reason(self) -> str:
        """A receipt reason without personal data."""
        kinds = ", ".join(sorted(str(k) for k in self.disagreeing)) or "identifiers"
        return (f"the task's identifiers point to different people ({kinds} disagree across "
                f"{len(self.found)} record(s)); nothing was done")


def match_subject(
    identifiers: Mapping[IdentifierType, str] | Mapping[str, str],
    records: Iterable[R],
    fields: Mapping[IdentifierType, str] | Mapping[str, str],
    *,
    region: str | None = DEFAULT_REGION,
    get: Callable[[R, str], Any] | None = None,
) -> SubjectMatch[R]:
    """Apply the matching rule to ``records``, the candidates a system's query found by *any* of
    the identifiers (``WHERE email = $1 OR phone = $2``).

    ``fields`` maps each identifier type to the record's field that holds it (for example
    ``{"email": "email", "phone": "phone"}``); identifier types without a field are not compared.
    Records are mappings (dicts, asyncpg records) unless ``get(record, field)`` reads them.
    Stored values are normalised the same way as the identifiers before they are compared.

    Raises ValueError when ``fields`` names none of the identifiers' types: nothing could be
    compared, and answering "not found" would claim a search that did not happen.
    """
    read = get or (lambda rec, name: rec[name])  # type: ignore[index]
    wanted = {IdentifierType(k): normalise(k, v, region=region) for k, v in identifiers.items()}
    columns = {IdentifierType(k): name for k, name in fields.items() if IdentifierType(k) in wanted}
    if not columns:
        raise ValueError(f"match_subject: fields name none of the identifier types given "
                         f"({', '.join(sorted(wanted)) or 'none'})")
    found: list[R] = []
    agreeing: list[R] = []
    disagreeing: set[IdentifierType] = set()
    # Which identifier types found the same record: records linked by a shared identifier are one
    # person; records that share none (one found only by the email, another only by the phone) may
    # be two people, each with one of the identifiers.
    links: dict[IdentifierType, IdentifierType] = {k: k for k in columns}

    def root(k: IdentifierType) -> IdentifierType:
        while links[k] != k:
            k = links[k]
        return k

    matched_by: list[set[IdentifierType]] = []
    for rec in records:
        values = {kind: _stored(kind, read(rec, name), region) for kind, name in columns.items()}
        matched = {kind for kind in columns if values[kind] == wanted[kind]}
        if not matched:
            continue  # not found by any identifier: not a candidate at all
        found.append(rec)
        against = {kind for kind, value in values.items() if value is not None and value != wanted[kind]}
        if against:
            disagreeing |= against
        else:
            agreeing.append(rec)
            matched_by.append(matched)
            first = root(next(iter(matched)))
            for kind in matched:
                links[root(kind)] = first
    if disagreeing:
        return SubjectMatch(found=found, records=[], conflict=True, disagreeing=tuple(sorted(disagreeing)))
    groups = {root(next(iter(m))) for m in matched_by}
    if len(groups) > 1:
        unlinked = tuple(sorted({k for m in matched_by for k in m}))
        return SubjectMatch(found=found, records=[], conflict=True, disagreeing=unlinked)
    return SubjectMatch(found=found, records=agreeing)
