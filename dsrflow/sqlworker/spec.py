"""The YAML description of a PostgreSQL database that a :mod:`dsrflow.sqlworker` worker acts on.

What the file says, and what is checked when it is loaded (the database itself is checked when
the worker starts, see :mod:`dsrflow.sqlworker.introspect`)::

    system:                          # the SystemDeclaration's fields, less what the tables tell
      name: loyalty
      description: Loyalty programme
      purposes: [essential.service]
      storage_country: VN
      # identifier_types, categories, actions, retention: derived from the tables when left out;
      # when given they are checked against them
    schema: public
    hash_key: {env: DSRFLOW_LOYALTY_HASH_KEY}   # for erase: hash (HMAC-SHA256); or {setting: name}
    subject:
      table: members                 # the root table: one row per data subject (or more)
      identifiers: {email: email, phone: phone, customer_id: member_code}
    tables:
      members:
        key: id                      # default: the table's primary key (one column)
        erase: delete                # the default strategy of its columns
        columns:
          full_name: {category: user.name}
          email: {category: user.contact.email}
        other_columns: [id, joined_at]   # columns that are not personal data (kept, exported)
        restrict: processing_restricted  # a boolean (or timestamp) column: restrict / lift
        rectify: {name: full_name, email: email, phone: phone}
      purchases:
        relation: {column: member_id, references: members}   # .id, or members.<column>
        erase: retain
        retain: {legal_basis: "Law on Accounting 88/2015/QH13 Art 41", period: 10 years, from: purchased_at}
        columns:
          member_id: {erase: "null"}  # cut from the erased member: the row no longer points at it

Erasure strategies, per column (or per table, as its columns' default): ``delete`` (the row is
deleted: every column of the table must then say delete), ``null``, ``hash`` (keyed HMAC-SHA256
of the value, hex), ``anonymise`` (``replacement``, a fixed text), ``retain`` (kept under
``retain: {legal_basis, period, from}``; reported as a RetainedItem with retain_until).

Every error is one line that names the table and column at fault.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import DsrflowError
from ..registry import Retention, SystemDeclaration
from ..rights import CHANGE_FIELDS, Action, IdentifierType

__all__ = [
    "ColumnSpec", "DatabaseSpec", "Relation", "RetainSpec", "SpecError", "Strategy", "SubjectSpec", "SystemSpec",
    "TableSpec", "erase_order", "load_spec", "parse_spec", "period_of",
]

Strategy = Literal["delete", "null", "hash", "anonymise", "retain"]
#: the strategies that leave nothing of the value (``retain`` keeps it, under a legal basis)
ERASING: frozenset[str] = frozenset({"delete", "null", "hash", "anonymise"})

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
_PERIOD = re.compile(r"^\s*(\d+)\s*(years?|y|days?|d)\s*$", re.IGNORECASE)


class SpecError(DsrflowError, ValueError):
    """The YAML description is not valid, or does not fit the database: one line that says where."""


def _check_name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a plain SQL name (letters, digits, _; at most 63)")
    return value


def period_of(text: str) -> tuple[int, int]:
    """``"10 years"`` -> (10, 0); ``"90 days"`` -> (0, 90). Raises ValueError."""
    m = _PERIOD.fullmatch(str(text))
    if m is None:
        raise ValueError(f"period {text!r} is not 'N years' or 'N days'")
    n, unit = int(m.group(1)), m.group(2).lower()
    if n <= 0:
        raise ValueError(f"period {text!r} must be positive")
    return (n, 0) if unit.startswith("y") else (0, n)


class RetainSpec(BaseModel):
    """Why and how long retained data is kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    legal_basis: str = Field(min_length=1)
    period: str = Field(description="'N years' (calendar years) or 'N days'")
    #: a date or timestamp column of the row the period runs from (default: the erasure)
    from_: str | None = Field(default=None, alias="from")

    @field_validator("legal_basis")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("legal_basis is blank")
        return v.strip()

    @field_validator("period")
    @classmethod
    def _period(cls, v: str) -> str:
        period_of(v)
        return v

    @property
    def timedelta(self) -> timedelta:
        years, days = period_of(self.period)
        return timedelta(days=days + years * 365 + (years + 3) // 4)  # with the leap days they may hold


class ColumnSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str | None = Field(default=None, description="fideslang data category, e.g. user.contact.email")
    erase: Strategy | None = None
    replacement: str | None = Field(default=None, description="erase: anonymise writes this")
    retain: RetainSpec | None = None

    @field_validator("erase", mode="before")
    @classmethod
    def _null_is_a_word(cls, v: Any) -> Any:
        if v is None:  # YAML reads a bare `null` as None: the strategy was meant
            return "null"
        if isinstance(v, str) and v not in ("delete", "null", "hash", "anonymise", "retain"):
            raise ValueError(f"erase strategy {v!r} is not one of delete, null, hash, anonymise, retain")
        return v


class Relation(BaseModel):
    """How a table's rows belong to the subject: ``column`` holds ``references`` (``table`` or
    ``table.column``; default the referenced table's key) of a row of another described table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str
    references: str

    @property
    def table(self) -> str:
        return self.references.partition(".")[0]

    @property
    def ref_column(self) -> str | None:
        return self.references.partition(".")[2] or None


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(default=None, description="a unique column; default the primary key")
    relation: Relation | None = None
    erase: Strategy = "delete"
    replacement: str | None = None
    retain: RetainSpec | None = None
    columns: dict[str, ColumnSpec] = Field(default_factory=dict)
    other_columns: tuple[str, ...] = Field(default=(), description="columns that hold no personal data")
    restrict: str | None = Field(default=None, description="a boolean or timestamp column: restricted when set")
    rectify: dict[str, str] = Field(default_factory=dict, description="change field -> column")

    @field_validator("erase", mode="before")
    @classmethod
    def _null_is_a_word(cls, v: Any) -> Any:
        return ColumnSpec._null_is_a_word(v)

    @field_validator("columns", mode="before")
    @classmethod
    def _bare_columns(cls, v: Any) -> Any:
        # `email: user.contact.email` is short for `email: {category: user.contact.email}`
        if isinstance(v, Mapping):
            return {k: ({"category": c} if isinstance(c, str) else ({} if c is None else c)) for k, c in v.items()}
        return v

    def strategy(self, column: str) -> str:
        """The erasure strategy of ``column``: its own, else the table's; ``keep`` for a column not
        under ``columns`` (other_columns, the key...) of a table whose rows are kept."""
        spec = self.columns.get(column)
        if spec is None:
            return "delete" if self.deletes else "keep"
        return spec.erase if spec.erase is not None else self.erase

    @property
    def deletes(self) -> bool:
        return self.erase == "delete"


class SubjectSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str
    identifiers: dict[IdentifierType, str] = Field(min_length=1, description="identifier type -> column")


class SystemSpec(BaseModel):
    """The declaration's fields; identifier_types, categories, actions and retention are derived
    from the tables when left out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    identifier_types: tuple[IdentifierType, ...] | None = None
    categories: tuple[str, ...] | None = None
    actions: tuple[Action, ...] | None = None
    description: str | None = None
    purposes: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    processors: tuple[str, ...] = ()
    operated_by: Literal["controller", "processor", "third_party"] = "controller"
    storage_country: str | None = None
    sensitive_categories: tuple[str, ...] = ()
    backup_retention: timedelta | None = None
    controller: str | None = None


class HashKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    setting: str | None = None

    @model_validator(mode="after")
    def _one(self) -> HashKey:
        if (self.env is None) == (self.setting is None):
            raise ValueError("hash_key names one of env or setting")
        return self


class DatabaseSpec(BaseModel):
    """The whole description; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: SystemSpec
    schema_: str = Field(default="public", alias="schema")
    hash_key: HashKey | None = None
    subject: SubjectSpec
    tables: dict[str, TableSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> DatabaseSpec:
        _validate(self)
        return self

    # -- what the description tells --------------------------------------------------------------
    @property
    def root(self) -> str:
        return self.subject.table

    def columns_of(self, table: str) -> set[str]:
        """Every column the description names in ``table``."""
        t = self.tables[table]
        named = set(t.columns) | set(t.other_columns) | set(t.rectify.values())
        if t.key:
            named.add(t.key)
        if t.relation:
            named.add(t.relation.column)
        if t.restrict:
            named.add(t.restrict)
        if table == self.root:
            named |= set(self.subject.identifiers.values())
        for other in self.tables.values():
            if other.relation and other.relation.table == table and other.relation.ref_column:
                named.add(other.relation.ref_column)
        return named

    @property
    def uses_hash(self) -> bool:
        return any(t.strategy(c) == "hash" for t in self.tables.values() for c in t.columns)

    def actions(self) -> tuple[Action, ...]:
        can = [Action.export, Action.erase]
        if any(t.rectify for t in self.tables.values()):
            can.append(Action.rectify)
        if any(t.restrict for t in self.tables.values()):
            can += [Action.restrict, Action.lift_restriction]
        if self.system.actions is None:
            return tuple(can)
        return tuple(a for a in can if a in self.system.actions)

    def categories(self) -> tuple[str, ...]:
        found = sorted({c.category for t in self.tables.values() for c in t.columns.values() if c.category})
        return tuple(self.system.categories or found)

    def retained(self) -> list[tuple[str, str, str, RetainSpec]]:
        """(table, column, category, retention) of every retained column."""
        out = []
        for name, t in self.tables.items():
            for col, c in t.columns.items():
                if t.strategy(col) == "retain":
                    retain = c.retain or t.retain
                    assert retain is not None  # _validate
                    out.append((name, col, c.category or "user", retain))
        return out

    def declaration(self) -> SystemDeclaration:
        retention: dict[tuple[str, str], timedelta] = {}
        for _, _, category, retain in self.retained():
            key = (category, retain.legal_basis)
            retention[key] = max(retention.get(key, timedelta(0)), retain.timedelta)
        s = self.system
        extra: dict[str, Any] = {"controller": s.controller} if s.controller else {}
        return SystemDeclaration(
            name=s.name,
            identifier_types=s.identifier_types or tuple(self.subject.identifiers),
            categories=self.categories(),
            actions=self.actions(),
            retention=tuple(Retention(category=c, legal_basis=b, period=p) for (c, b), p in sorted(retention.items())),
            description=s.description, purposes=s.purposes, recipients=s.recipients, processors=s.processors,
            operated_by=s.operated_by, storage_country=s.storage_country, sensitive_categories=s.sensitive_categories,
            backup_retention=s.backup_retention, **extra,
        )


def _validate(spec: DatabaseSpec) -> None:
    """Everything that can be checked without the database. Raises ValueError (one line)."""
    _check_name(spec.schema_, "schema")
    if spec.root not in spec.tables:
        raise ValueError(f"subject.table {spec.root!r} is not described under tables")
    for kind, col in spec.subject.identifiers.items():
        _check_name(col, f"identifier column of {kind}")
    if spec.system.identifier_types is not None and set(spec.system.identifier_types) != set(spec.subject.identifiers):
        raise ValueError("system.identifier_types must be the identifier types subject.identifiers maps to columns")
    if spec.tables[spec.root].relation is not None:
        raise ValueError(f"table {spec.root}: the subject's table has no relation")
    rectified: dict[str, str] = {}  # category -> table.column
    for name, t in spec.tables.items():
        _check_name(name, "table")
        where = f"table {name}"
        for named in [*t.columns, *t.other_columns, *t.rectify.values(), t.key, t.restrict,
                      t.relation.column if t.relation else None]:
            if named is not None:
                _check_name(named, f"{where}: column")
        if name != spec.root:
            if t.relation is None:
                raise ValueError(f"{where}: give its relation (column, references) to the subject's table "
                                 "or to another described table")
            if t.relation.table not in spec.tables:
                raise ValueError(f"{where}: relation references {t.relation.table!r}, which is not described")
            if t.relation.ref_column:
                _check_name(t.relation.ref_column, f"{where}: relation column")
        both = set(t.columns) & set(t.other_columns)
        if both:
            raise ValueError(f"{where}: column {sorted(both)[0]} is both described and in other_columns")
        strategies = {col: t.strategy(col) for col in t.columns}
        if t.deletes:
            # null: a link to another row (of someone else, maybe), cut before the row it points at
            # is deleted; the table's own rows of the subject are deleted whole
            odd = sorted(c for c, s in strategies.items() if s not in ("delete", "null"))
            if odd:
                raise ValueError(f"{where}: its rows are deleted (erase: delete), so column {odd[0]} cannot say "
                                 f"erase: {strategies[odd[0]]}")
        elif "delete" in strategies.values():
            col = next(c for c, s in strategies.items() if s == "delete")
            raise ValueError(f"{where}: column {col} says erase: delete (the row) but the table's rows are kept "
                             f"(erase: {t.erase}): say erase: delete on the table")
        for col, c in t.columns.items():
            s = strategies[col]
            if s == "anonymise" and (c.replacement if c.replacement is not None else t.replacement) is None:
                raise ValueError(f"{where}: column {col} says erase: anonymise without a replacement")
            if s == "retain" and (c.retain or t.retain) is None:
                raise ValueError(f"{where}: column {col} is retained without a legal basis: give retain: "
                                 "{legal_basis, period}")
            if c.retain is not None and s != "retain":
                raise ValueError(f"{where}: column {col} gives retain: but its strategy is {s}")
            if not t.deletes and c.category is None and s != "null":
                raise ValueError(f"{where}: column {col} has no category")
            if t.deletes and c.category is None and s != "null":
                raise ValueError(f"{where}: column {col} has no category (or list it under other_columns)")
        if t.retain is not None and "retain" not in strategies.values() and t.erase != "retain":
            raise ValueError(f"{where}: gives retain: but no column is retained")
        if t.erase == "retain" and not t.columns:
            raise ValueError(f"{where}: erase: retain needs the retained columns under columns")
        for fld, col in t.rectify.items():
            if fld not in CHANGE_FIELDS and fld not in CHANGE_FIELDS.values():
                raise ValueError(f"{where}: rectify field {fld!r} is not one of {', '.join(CHANGE_FIELDS)} "
                                 "(or their categories)")
            category = CHANGE_FIELDS.get(fld, fld)
            if category in rectified:
                raise ValueError(f"{where}: rectify field {fld} is mapped already (column {rectified[category]}): "
                                 "map each field to one column of one table")
            rectified[category] = f"{name}.{col}"
            if col not in t.columns:
                raise ValueError(f"{where}: rectify maps {fld} to column {col}, which is not described under columns")
        if t.restrict is not None and t.restrict in t.columns:
            raise ValueError(f"{where}: the restrict column {t.restrict} is not personal data: leave it out of columns")
    root = spec.tables[spec.root]
    for kind, col in spec.subject.identifiers.items():
        if col not in root.columns and col != root.key:
            raise ValueError(f"table {spec.root}: identifier column {col} ({kind}) is not described under columns")
        if col in root.columns and root.strategy(col) == "retain":
            raise ValueError(f"table {spec.root}: identifier column {col} is retained: a second erasure would find "
                             "the subject again (delete, null, hash or anonymise it)")
    if not root.deletes and root.key in spec.subject.identifiers.values():
        raise ValueError(f"table {spec.root}: the key {root.key} is an identifier, so the kept rows would still "
                         "be found: erase: delete the subject's rows")
    # kept rows must not point at deleted ones, and relations must lead to the subject's table
    for name, t in spec.tables.items():
        if t.relation is None:
            continue
        parent = spec.tables[t.relation.table]
        if not t.deletes and t.relation.column not in t.columns:
            raise ValueError(f"table {name}: its rows are kept, so describe its relation column {t.relation.column} "
                             "with an erase strategy (null cuts it from the subject)")
        if parent.deletes and not t.deletes and t.strategy(t.relation.column) != "null":
            raise ValueError(f"table {name}: its rows are kept but the rows of {t.relation.table} it points at are "
                             f"deleted: give column {t.relation.column} erase: null")
    if spec.uses_hash and spec.hash_key is None:
        raise ValueError("a column says erase: hash: give hash_key: {env: NAME} or {setting: name}, its secret key")
    erase_order(spec)  # raises on a cycle
    _check_derived(spec)


def _check_derived(spec: DatabaseSpec) -> None:
    s = spec.system
    if s.actions is not None:
        can = DatabaseSpec.actions(spec.model_copy(update={"system": s.model_copy(update={"actions": None})}))
        extra = [str(a) for a in s.actions if a not in can]
        if extra:
            raise ValueError(f"system.actions names {', '.join(extra)}, which the tables do not allow "
                             "(rectify needs a rectify map, restrict a restrict column)")
    if s.categories is not None:
        used = {c.category for t in spec.tables.values() for c in t.columns.values() if c.category}
        missing = sorted(used - set(s.categories))
        if missing:
            raise ValueError(f"system.categories leaves out {', '.join(missing)}, which a column holds")


def relation_parents(spec: DatabaseSpec) -> dict[str, str]:
    return {name: t.relation.table for name, t in spec.tables.items() if t.relation is not None}


def erase_order(spec: DatabaseSpec, extra_edges: Iterable[tuple[str, str]] = ()) -> list[str]:
    """The described tables, children first: every table before the tables its rows point at (by
    the described relations, and ``extra_edges``, (child, parent) pairs such as the database's
    foreign keys). Raises ValueError naming a cycle."""
    edges: dict[str, set[str]] = {name: set() for name in spec.tables}
    for child, parent in relation_parents(spec).items():
        edges[child].add(parent)
    for child, parent in extra_edges:
        if child != parent and child in edges and parent in edges:
            edges[child].add(parent)
    # depth-first, parents of a table visited after it: reverse post-order over "points at"
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(table: str, path: list[str]) -> None:
        if state.get(table) == 2:
            return
        if state.get(table) == 1:
            cycle = path[path.index(table):] + [table]
            raise ValueError(f"relations form a cycle: {' -> '.join(cycle)}")
        state[table] = 1
        for parent in sorted(edges[table]):
            visit(parent, [*path, table])
        state[table] = 2
        order.append(table)  # after every table it points at

    for name in sorted(spec.tables):
        visit(name, [])
    order.reverse()  # children first
    # the reverse of "parents after children" can interleave unrelated tables: make it stable
    return _stable(order, edges)


def _stable(order: list[str], edges: dict[str, set[str]]) -> list[str]:
    """Kahn's algorithm, ties broken by name: the same order for the same description."""
    pointed_by: dict[str, set[str]] = {t: set() for t in edges}
    for child, parents in edges.items():
        for p in parents:
            pointed_by[p].add(child)
    waiting = {t: len(pointed_by[t]) for t in edges}  # a table waits for the tables that point at it
    ready = sorted(t for t, n in waiting.items() if n == 0)
    out: list[str] = []
    while ready:
        t = ready.pop(0)
        out.append(t)
        for p in edges[t]:
            waiting[p] -= 1
            if waiting[p] == 0:
                ready.append(p)
                ready.sort()
    assert len(out) == len(order)
    return out


def _first_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
    msg = str(err["msg"]).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def parse_spec(data: Any, *, source: str = "the description") -> DatabaseSpec:
    """A :class:`DatabaseSpec` from parsed YAML. Raises :class:`SpecError` (one line)."""
    if not isinstance(data, Mapping):
        raise SpecError(f"{source}: not a mapping of system, subject, tables")
    try:
        return DatabaseSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: {_first_line(exc)}") from None


def load_spec(path: str | Path) -> DatabaseSpec:
    """Read and check a YAML description (``yaml.safe_load``). Raises :class:`SpecError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{p}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{p.name}: not valid YAML{where}") from None
    return parse_spec(data, source=str(p.name))
