"""A :class:`dsrflow.worker.Worker` built from a :class:`~dsrflow.sqlworker.spec.DatabaseSpec`.

At startup the worker opens a pool on the database and checks the description against it
(:func:`inspect`): every described table and column exists, no column of a described table is
left undescribed, strategies fit the column types, each table's key is unique and NOT NULL (the
primary key, or a column with a unique index of its own), and every foreign key that points at a
described table comes from a described table (an undescribed dependent table would be orphaned,
or would make every erasure fail). A foreign key into a described table must not delete or change
other people's rows when the subject's are deleted: ON DELETE CASCADE or SET DEFAULT is refused
unless the column is the table's described relation (whose rows are the subject's), and a deleted
table's other link to a table whose rows are deleted (a gift's recipient) must say erase: null
(it is nulled before the rows it points at are deleted) or be ON DELETE SET NULL. The erasure
order is computed from the described relations and the database's own foreign keys. Any mismatch
refuses to start with one line naming it.

What each action does:

- locate (every action): the subject's rows are the rows of the subject's table found by *any*
  identifier column, however stored (an email in any case; a phone by its digits, international
  or national, in the task's jurisdiction's region, Vietnam by default), then kept only if every
  identifier agrees, stored values normalised (:meth:`TaskContext.match`);
  disagreeing identifiers give ``conflict`` and nothing is done. Related rows follow the
  described relations from there.
- export: every described table's rows of the subject, as JSON.
- erase: one transaction: children first, each table's strategy (delete the rows; or keep them
  and null, hash, anonymise or retain each column; a kept row's link to a deleted row is nulled
  first). Then, in the same transaction, the proof: the locate step again, the deleted rows
  looked for by key, the kept rows read back whole (every column, described or not): an erasable
  value still there, or one of the subject's identifiers in a column that is not retained (an
  email in any case inside any text; a phone as digits inside any text, international or national;
  another identifier as a whole value, text or, outside the key and other_columns, a number), rolls
  the erasure back and fails the task, ``retryable=False``: "proof of erasure failed: N rows of T
  still hold the subject". What was retained is reported with its basis and ``retain_until``.
  The counts: ``located`` the subject's rows of the subject's table; ``deleted`` rows deleted;
  ``anonymised`` kept rows a personal-data column of which (one with a category, not a bare link)
  was erased, and that hold no retained value; ``erased`` = ``deleted`` + ``anonymised``;
  ``retained`` kept rows that still hold a retained value (never counted as erased); and per
  table, the subject's rows it acted on (a kept row only cut from the subject is in no total).
- A second erasure is ``not_found``: the description must erase every identifier column of the
  subject's table (or delete its rows), and cut every kept row from deleted ones, so retained rows
  no longer identify the subject to a task (they are kept, not found).
- rectify: the fields of the ``rectify`` maps, parsed (email and phone to their normal form, a
  local phone number read in the task's jurisdiction's region);
  another field, or an invalid value, is ``refused`` and nothing changes.
- restrict / lift_restriction: sets / clears each restrictable table's ``restrict`` column (a
  boolean, or a timestamp set to now()). An objection's purposes restrict all processing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import phonenumbers

from ..events import RetainedItem
from ..identity import DEFAULT_REGION, SubjectMatch, normalise, normalise_phone, region_of
from ..rights import CHANGE_FIELDS, Action, IdentifierType, change_category, parse_date_of_birth, parse_text
from ..settings import Settings
from ..worker import PermanentError, Result, TaskContext, Worker
from .spec import ERASING, DatabaseSpec, RetainSpec, SpecError, erase_order, load_spec, period_of

__all__ = ["Plan", "SqlSystem", "inspect", "quote_ident", "sql_worker"]

_TEXT = frozenset({"text", "varchar", "bpchar", "citext", "name"})
_TIME = frozenset({"date", "timestamp", "timestamptz"})


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted: ``"a""b"`` for ``a"b`` (never trusted unquoted)."""
    if "\x00" in name:
        raise ValueError("an identifier cannot hold NUL")
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    udt: str  # udt_name: int8, text, bool, timestamptz...
    nullable: bool


@dataclass(frozen=True, slots=True)
class ForeignKey:
    name: str
    schema: str
    table: str
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]
    on_delete: str = "a"  # pg_constraint.confdeltype: a no action, r restrict, c cascade, n set null, d set default


@dataclass(slots=True)
class Plan:
    """The description checked against the database: what the handlers act by."""

    spec: DatabaseSpec
    columns: dict[str, dict[str, Column]]
    keys: dict[str, str]
    order: list[str]  # children first
    foreign_keys: list[ForeignKey]
    hash_key: bytes | None = None

    def q(self, table: str) -> str:
        return f"{quote_ident(self.spec.schema_)}.{quote_ident(table)}"

    @property
    def parents_first(self) -> list[str]:
        return list(reversed(self.order))

    def select_list(self, table: str) -> str:
        return ", ".join(quote_ident(c) for c in self.columns[table])

    def unlinks(self, table: str) -> list[ForeignKey]:
        """Foreign keys of one column, into ``table``, from described tables whose column is nulled
        on erasure: they are cut before ``table``'s rows are deleted."""
        out = []
        for fk in self.foreign_keys:
            child = self.spec.tables.get(fk.table)
            if (fk.schema == self.spec.schema_ and fk.ref_table == table and child is not None
                    and len(fk.columns) == 1 and child.strategy(fk.columns[0]) == "null"):
                out.append(fk)
        return out


# -- checking the description against the database ----------------------------------------------

_COLUMNS = """
SELECT table_name, column_name, udt_name, is_nullable = 'YES' AS nullable
FROM information_schema.columns
WHERE table_schema = $1 AND table_name = ANY($2::text[])
ORDER BY table_name, ordinal_position"""

_PRIMARY_KEYS = """
SELECT t.relname AS table_name, array_agg(a.attname ORDER BY k.ord) AS columns
FROM pg_constraint c
JOIN pg_class t ON t.oid = c.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(att, ord)
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.att
WHERE c.contype = 'p' AND n.nspname = $1 AND t.relname = ANY($2::text[])
GROUP BY t.relname"""

# Columns with a unique index of their own (a unique constraint has one), not partial, not an expression.
_UNIQUE = """
SELECT t.relname AS table_name, a.attname AS column_name
FROM pg_index i
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL
  AND n.nspname = $1 AND t.relname = ANY($2::text[])"""

_DELETE_ACTIONS = {"c": "ON DELETE CASCADE", "d": "ON DELETE SET DEFAULT"}

# Every foreign key from or into a table of the schema.
_FOREIGN_KEYS = """
SELECT c.conname AS name, sn.nspname AS schema, s.relname AS table_name, tn.nspname AS ref_schema,
       t.relname AS ref_table, c.confdeltype::text AS on_delete, array_agg(sa.attname ORDER BY k.ord) AS columns,
       array_agg(ta.attname ORDER BY k.ord) AS ref_columns
FROM pg_constraint c
JOIN pg_class s ON s.oid = c.conrelid JOIN pg_namespace sn ON sn.oid = s.relnamespace
JOIN pg_class t ON t.oid = c.confrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace
CROSS JOIN LATERAL unnest(c.conkey, c.confkey) WITH ORDINALITY AS k(src, dst, ord)
JOIN pg_attribute sa ON sa.attrelid = c.conrelid AND sa.attnum = k.src
JOIN pg_attribute ta ON ta.attrelid = c.confrelid AND ta.attnum = k.dst
WHERE c.contype = 'f' AND (tn.nspname = $1 OR sn.nspname = $1)
GROUP BY c.conname, sn.nspname, s.relname, tn.nspname, t.relname, c.confdeltype
ORDER BY s.relname, c.conname"""


async def inspect(conn: asyncpg.Connection, spec: DatabaseSpec, *, hash_key: bytes | None = None) -> Plan:
    """Check ``spec`` against the database and return the :class:`Plan`. Raises :class:`SpecError`
    with one line naming the table or column at fault."""
    schema = spec.schema_
    names = list(spec.tables)
    columns: dict[str, dict[str, Column]] = {}
    for r in await conn.fetch(_COLUMNS, schema, names):
        columns.setdefault(r["table_name"], {})[r["column_name"]] = Column(r["column_name"], r["udt_name"],
                                                                          r["nullable"])
    for table in names:
        if table not in columns:
            raise SpecError(f"table {schema}.{table} is described but does not exist in the database")
    pks = {r["table_name"]: tuple(r["columns"]) for r in await conn.fetch(_PRIMARY_KEYS, schema, names)}
    unique = {(r["table_name"], r["column_name"]) for r in await conn.fetch(_UNIQUE, schema, names)}
    keys: dict[str, str] = {}
    for table, t in spec.tables.items():
        have = columns[table]
        for col in sorted(spec.columns_of(table)):
            if col not in have:
                raise SpecError(f"table {table} has no column {col!r} (the description names it)")
        if t.key is not None:
            if pks.get(table) != (t.key,) and ((table, t.key) not in unique or have[t.key].nullable):
                raise SpecError(f"table {table}: key column {t.key} is not unique and NOT NULL: make it the primary "
                                "key, or give it a unique index of its own and NOT NULL (or name such a column)")
            keys[table] = t.key
        elif len(pks.get(table, ())) == 1:
            keys[table] = pks[table][0]
        else:
            raise SpecError(f"table {table} has no single-column primary key: name a unique column as its key")
        described = spec.columns_of(table) | {keys[table]}
        for col in have:
            if col not in described:
                raise SpecError(f"table {table}: column {col} is not described: give it a category and an erase "
                                "strategy under columns, or list it under other_columns")
        _check_types(spec, table, have)
    fks: list[ForeignKey] = []
    edges: set[tuple[str, str]] = set()
    for r in await conn.fetch(_FOREIGN_KEYS, schema):
        fk = ForeignKey(r["name"], r["schema"], r["table_name"], tuple(r["columns"]), r["ref_table"],
                        tuple(r["ref_columns"]), r["on_delete"])
        into = r["ref_schema"] == schema and fk.ref_table in spec.tables
        from_described = fk.schema == schema and fk.table in spec.tables
        if not into:
            continue
        if not from_described:
            where = fk.table if fk.schema == schema else f"{fk.schema}.{fk.table}"
            raise SpecError(f"table {where} depends on described table {fk.ref_table} (foreign key {fk.name}) but "
                            f"is not described: describe it with its relation, or an erasure would orphan its rows "
                            f"or fail on them")
        fks.append(fk)
        edges.add((fk.table, fk.ref_table))
        child, parent = spec.tables[fk.table], spec.tables[fk.ref_table]
        rel = child.relation
        is_relation = (rel is not None and rel.table == fk.ref_table and fk.columns == (rel.column,)
                       and fk.ref_columns == ((rel.ref_column or keys[fk.ref_table]),))
        cols = ", ".join(fk.columns)
        if fk.on_delete in _DELETE_ACTIONS and not is_relation:
            # deleting the subject's row of the parent would delete or change rows that are not the
            # subject's (a gift *to* the subject is the giver's)
            raise SpecError(f"table {fk.table}: column {cols} points at {fk.ref_table} with "
                            f"{_DELETE_ACTIONS[fk.on_delete]} (foreign key {fk.name}) and is not the table's "
                            "relation: an erasure would delete or change another person's rows; drop the "
                            "ON DELETE action and give the column erase: null")
        if (parent.deletes and child.deletes and not is_relation and fk.on_delete != "n"
                and not (len(fk.columns) == 1 and child.strategy(fk.columns[0]) == "null")):
            raise SpecError(f"table {fk.table}: column {cols} points at rows of {fk.ref_table}, which are deleted "
                            f"(foreign key {fk.name}), and is not the table's relation: rows of other people may "
                            f"point at the subject's; give column {fk.columns[0]} erase: null (it is then nulled "
                            "before those rows are deleted)")
        if parent.deletes and not child.deletes and fk.table != fk.ref_table:
            cut = [c for c in fk.columns if child.strategy(c) == "null"]
            if not cut:
                raise SpecError(f"table {fk.table}: its rows are kept but point at rows of {fk.ref_table}, which are "
                                f"deleted (foreign key {fk.name}): give column {fk.columns[0]} erase: null")
    try:
        order = erase_order(spec, edges)
    except ValueError as exc:
        raise SpecError(f"with the database's foreign keys, {exc}") from None
    if spec.uses_hash and hash_key is None:
        raise SpecError("a column says erase: hash but no hash key is set (hash_key: env or setting)")
    return Plan(spec, columns, keys, order, fks, hash_key)


def _check_types(spec: DatabaseSpec, table: str, have: Mapping[str, Column]) -> None:
    t = spec.tables[table]
    for col, c in t.columns.items():
        s, info = t.strategy(col), have[col]
        if s in ("hash", "anonymise") and info.udt not in _TEXT:
            raise SpecError(f"table {table}: column {col} is {info.udt}, and erase: {s} writes text")
        if s == "null" and not info.nullable:
            raise SpecError(f"table {table}: column {col} is NOT NULL, so erase: null cannot apply")
        retain = c.retain or t.retain
        if s == "retain" and retain is not None and retain.from_ is not None:
            src = have.get(retain.from_)
            if src is None:
                raise SpecError(f"table {table}: retention runs from column {retain.from_!r}, which it has not")
            if src.udt not in _TIME:
                raise SpecError(f"table {table}: retention runs from column {retain.from_}, which is not a date "
                                "or timestamp")
    if t.restrict is not None and have[t.restrict].udt not in {"bool", "timestamp", "timestamptz"}:
        raise SpecError(f"table {table}: restrict column {t.restrict} must be boolean or a timestamp")


# -- the worker ---------------------------------------------------------------------------------


def _resolve_key(spec: DatabaseSpec, settings: Settings) -> bytes | None:
    if spec.hash_key is None:
        return None
    if spec.hash_key.env is not None:
        value: Any = os.environ.get(spec.hash_key.env)
        where = f"environment variable {spec.hash_key.env}"
    else:
        assert spec.hash_key.setting is not None
        value = getattr(settings, spec.hash_key.setting, None)
        where = f"setting {spec.hash_key.setting}"
    if value is not None and hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if not value:
        if spec.uses_hash:
            raise SpecError(f"hash_key: {where} is not set (erase: hash needs a secret key)")
        return None
    text = str(value)
    if len(text) < 16:
        raise SpecError(f"hash_key: {where} is shorter than 16 characters")
    return text.encode()


class _ProofFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Refused(Exception):
    pass


def _rowcount(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _plain(value: Any) -> Any:
    """A column value as JSON can say it."""
    if value is None or isinstance(value, str | int | float | bool | date | datetime | time | Decimal | UUID):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)


def _add_period(start: date | datetime, retain: RetainSpec) -> datetime:
    years, days = period_of(retain.period)
    moment = start if isinstance(start, datetime) else datetime.combine(start, time.max)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if years:
        try:
            moment = moment.replace(year=moment.year + years)
        except ValueError:  # 29 February
            moment = moment.replace(year=moment.year + years, day=28)
    return moment + timedelta(days=days)


Rows = dict[str, list[dict[str, Any]]]


class SqlSystem:
    """A database described by a spec, and the worker that acts on it (:attr:`worker`)."""

    def __init__(
        self,
        spec: DatabaseSpec,
        *,
        dsn: str | None = None,
        dsn_from: Callable[[Settings], str] | None = None,
        prepare: Callable[[str], Awaitable[object]] | None = None,
        **worker_options: Any,
    ) -> None:
        if (dsn is None) == (dsn_from is None):
            raise TypeError("give one of dsn or dsn_from")
        self.spec = spec
        self._dsn = dsn
        self._dsn_from = dsn_from
        self._prepare = prepare
        self._pool: asyncpg.Pool | None = None
        self._plan: Plan | None = None
        self.worker = Worker(spec.declaration(), **worker_options)
        self.worker.on_startup(self._start)
        self.worker.on_shutdown(self._stop)
        handlers: dict[Action, Callable[[TaskContext], Awaitable[Result]]] = {
            Action.export: self.export, Action.erase: self.erase, Action.rectify: self.rectify,
            Action.restrict: self.restrict, Action.lift_restriction: self.lift_restriction,
        }
        for action in self.worker.system.actions:
            self.worker.handler(action)(handlers[action])

    # -- lifecycle ----------------------------------------------------------------------------
    def dsn(self, settings: Settings) -> str:
        if self._dsn is not None:
            return self._dsn
        assert self._dsn_from is not None
        return self._dsn_from(settings)

    async def _start(self, settings: Settings) -> None:
        dsn = self.dsn(settings)
        if self._prepare is not None:
            await self._prepare(dsn)
        key = _resolve_key(self.spec, settings)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=self.worker.concurrency)
        try:
            async with pool.acquire() as conn:
                self._plan = await inspect(conn, self.spec, hash_key=key)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def _stop(self, settings: Settings) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            raise RuntimeError(f"system {self.spec.system.name}: the worker is not started")
        return self._plan

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"system {self.spec.system.name}: the worker is not started")
        return self._pool

    # -- finding the subject ------------------------------------------------------------------
    def _identifiers(self, ctx: TaskContext) -> dict[IdentifierType, str]:
        region = _region(ctx)
        out = {}
        for kind, value in ctx.identifiers.items():
            try:
                out[kind] = normalise(kind, value, region=region)
            except ValueError as exc:  # names the type, never the value
                raise PermanentError(str(exc)) from None
        return out

    def _where_identified(self, ids: Mapping[IdentifierType, str]) -> tuple[str, list[Any]]:
        """The candidates: rows of the subject's table that any identifier finds, however the
        value is stored (an email in any case, a phone in any format, national or international).
        They are a superset: :meth:`TaskContext.match` then compares the values in normal form."""
        plan, root = self.plan, self.spec.root
        conds: list[str] = []
        args: list[Any] = []
        for kind, col in self.spec.subject.identifiers.items():
            if kind in ids:
                expr = quote_ident(col) if plan.columns[root][col].udt in _TEXT else f"{quote_ident(col)}::text"
                if kind == IdentifierType.email:
                    args.append(ids[kind])
                    conds.append(f"lower(btrim({expr})) = ${len(args)}")
                elif kind == IdentifierType.phone:
                    args.append(sorted(_phone_digits(ids[kind])))
                    conds.append(f"regexp_replace({expr}, '\\D', '', 'g') = ANY(${len(args)}::text[])")
                else:
                    args.append(ids[kind])
                    conds.append(f"{expr} = ${len(args)}")
        if not conds:
            raise PermanentError("the task carries none of the identifier types this system declares")
        return " OR ".join(conds), args

    async def _locate(self, conn: asyncpg.Connection, ctx: TaskContext, *,
                      lock: bool) -> tuple[SubjectMatch[dict[str, Any]], Rows]:
        """The match over the subject's table, and (when it names one person) every described
        table's rows of the subject, parents first."""
        plan, root = self.plan, self.spec.root
        where, args = self._where_identified(self._identifiers(ctx))
        key = quote_ident(plan.keys[root])
        rows = await conn.fetch(f"SELECT {plan.select_list(root)} FROM {plan.q(root)} WHERE {where} "
                                f"ORDER BY {key}" + (" FOR UPDATE" if lock else ""), *args)
        match = ctx.match([dict(r) for r in rows], dict(self.spec.subject.identifiers))
        found: Rows = {root: list(match.records)}
        if match.conflict or not match.records:
            return match, found
        for table in plan.parents_first:
            t = self.spec.tables[table]
            if t.relation is None:
                continue
            parent = t.relation.table
            ref = t.relation.ref_column or plan.keys[parent]
            values = sorted({r[ref] for r in found[parent] if r[ref] is not None}, key=str)
            if not values:
                found[table] = []
                continue
            got = await conn.fetch(
                f"SELECT {plan.select_list(table)} FROM {plan.q(table)} WHERE {quote_ident(t.relation.column)} "
                f"= ANY($1) ORDER BY {quote_ident(plan.keys[table])}" + (" FOR UPDATE" if lock else ""), values)
            found[table] = [dict(r) for r in got]
        return match, found

    @staticmethod
    def _answer(match: SubjectMatch[Any]) -> Result | None:
        if match.conflict:
            return Result.conflict(match.reason())
        if not match.records:
            return Result.not_found()
        return None

    def _categories(self, rows: Rows) -> list[str]:
        found = set()
        for table, rs in rows.items():
            for col, c in self.spec.tables[table].columns.items():
                if c.category and any(r.get(col) is not None for r in rs):
                    found.add(c.category)
        return sorted(found)

    # -- export -------------------------------------------------------------------------------
    async def export(self, ctx: TaskContext) -> Result:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            match, rows = await self._locate(conn, ctx, lock=False)
        answer = self._answer(match)
        if answer is not None:
            return answer
        tables = {t: [{k: _plain(v) for k, v in r.items()} for r in rows.get(t, [])]
                  for t in self.plan.parents_first}
        records = sum(len(v) for v in tables.values())
        doc = {"system": self.spec.system.name, "subject_table": self.spec.root, "tables": tables}
        artifact = await ctx.export(doc, records=records)
        return Result.succeeded(counts={"located": len(rows[self.spec.root]), "records": records},
                                categories=self._categories(rows), artifacts=[artifact])

    # -- erase --------------------------------------------------------------------------------
    def _hash(self, value: Any) -> str | None:
        if value is None:
            return None
        assert self.plan.hash_key is not None  # inspect() refuses to start without it
        return hmac.new(self.plan.hash_key, str(value).encode(), hashlib.sha256).hexdigest()

    def _erased_value(self, table: str, column: str, value: Any) -> Any:
        t = self.spec.tables[table]
        strategy = t.strategy(column)
        if strategy == "null":
            return None
        if strategy == "hash":
            return self._hash(value)
        if strategy == "anonymise":
            c = t.columns[column]
            return c.replacement if c.replacement is not None else t.replacement
        return value

    async def erase(self, ctx: TaskContext) -> Result:
        """See the module docstring. One transaction; the proof runs inside it, before commit."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                match, rows = await self._locate(conn, ctx, lock=True)
                answer = self._answer(match)
                if answer is not None:
                    return answer
                counts, retained = await self._apply(conn, rows)
                await self._prove(conn, ctx, rows)
        except _ProofFailed as exc:
            return Result.failed(exc.reason, retryable=False)
        counts = {"located": len(rows[self.spec.root]), **counts}
        categories = self._categories(rows)
        if not retained:
            return Result.succeeded(counts=counts, categories=categories)
        return Result.retained(retained, counts=counts, categories=categories)

    async def _apply(self, conn: asyncpg.Connection, rows: Rows) -> tuple[dict[str, int], list[RetainedItem]]:
        plan, spec = self.plan, self.spec
        deleted = anonymised = kept = 0
        per_table: dict[str, int] = {}
        retained: dict[tuple[str, str], tuple[set[tuple[str, Any]], datetime]] = {}
        now = datetime.now(UTC)
        for table in plan.order:
            rs = rows.get(table, [])
            if not rs:
                continue
            t = spec.tables[table]
            key = plan.keys[table]
            if t.deletes:
                for fk in plan.unlinks(table):  # kept rows (the subject's, or anyone's) must not point here
                    col, ref = fk.columns[0], fk.ref_columns[0]
                    values = [r[ref] for r in rs if r.get(ref) is not None]
                    if values:
                        await conn.execute(f"UPDATE {plan.q(fk.table)} SET {quote_ident(col)} = NULL "
                                           f"WHERE {quote_ident(col)} = ANY($1)", values)
                n = _rowcount(await conn.execute(
                    f"DELETE FROM {plan.q(table)} WHERE {quote_ident(key)} = ANY($1)", [r[key] for r in rs]))
                per_table[table] = n
                deleted += n
                continue
            erasing = [c for c in t.columns if t.strategy(c) in ERASING]
            if erasing:
                sets = ", ".join(f"{quote_ident(c)} = ${i}" for i, c in enumerate(erasing, start=2))
                await conn.executemany(
                    f"UPDATE {plan.q(table)} SET {sets} WHERE {quote_ident(key)} = $1",
                    [(r[key], *(self._erased_value(table, c, r[c]) for c in erasing)) for r in rs])
            per_table[table] = len(rs)
            held = [c for c in t.columns if t.strategy(c) == "retain"]
            personal = [c for c in erasing if t.columns[c].category is not None]  # not a bare link
            for r in rs:
                if any(r[c] is not None for c in held):
                    kept += 1  # still holds personal data, under a legal basis: not erased
                elif any(r[c] is not None for c in personal):
                    anonymised += 1
            for col in held:
                retain = t.columns[col].retain or t.retain
                assert retain is not None
                holding = [r for r in rs if r[col] is not None]
                if not holding:
                    continue
                starts = [r[retain.from_] for r in holding if retain.from_ and r[retain.from_] is not None]
                until = max(_add_period(s, retain) for s in starts) if starts else _add_period(now, retain)
                category = t.columns[col].category or "user"
                held_rows, latest = retained.get((category, retain.legal_basis), (set(), until))
                held_rows |= {(table, r[key]) for r in holding}
                retained[(category, retain.legal_basis)] = (held_rows, max(latest, until))
        counts = {"erased": deleted + anonymised, "deleted": deleted, "anonymised": anonymised, "retained": kept}
        for table, n in per_table.items():
            counts.setdefault(table, n)
        items = [RetainedItem(category=c, records=len(held_rows), legal_basis=basis, retain_until=until)
                 for (c, basis), (held_rows, until) in sorted(retained.items(), key=lambda kv: kv[0])]
        return counts, items

    async def _prove(self, conn: asyncpg.Connection, ctx: TaskContext, rows: Rows) -> None:
        """Raise :class:`_ProofFailed` if anything erasable still holds the subject."""
        plan, spec = self.plan, self.spec
        ids = self._identifiers(ctx)
        region = _region(ctx)
        left: dict[str, int] = {}
        where, args = self._where_identified(ids)
        candidates = await conn.fetch(f"SELECT {plan.select_list(spec.root)} FROM {plan.q(spec.root)} WHERE {where}",
                                      *args)
        again = ctx.match([dict(r) for r in candidates], dict(spec.subject.identifiers)).found
        if again:
            left[spec.root] = len(again)
        # What identifies the subject: the task's identifiers and what the subject's rows held in
        # them. An email is looked for inside any text, lower-cased; a phone as a run of digits in
        # any text, international or national; another identifier (a code, a number) only as a
        # whole value, text or number, so that it is not found by chance in unrelated text.
        needles: set[str] = set()
        phones: set[str] = set()
        exact: set[str] = set()
        numbers: set[int] = set()
        for kind, value in [*ids.items(), *((k, r.get(c)) for r in rows[spec.root]
                                            for k, c in spec.subject.identifiers.items())]:
            if isinstance(value, int) and not isinstance(value, bool):
                numbers.add(value)
                exact.add(str(value))
                continue
            if not isinstance(value, str) or not value.strip():
                continue
            text = value.strip()
            if kind == IdentifierType.email:
                needles.add(text.lower())
            elif kind == IdentifierType.phone:
                try:
                    phones |= _phone_digits(normalise_phone(text, region))
                except ValueError:
                    digits = re.sub(r"\D", "", text)
                    if len(digits) >= 6:
                        phones.add(digits)
                needles.add(text.lower())
            else:
                exact.add(text.lower())
                if text.isdigit() and len(text) < 19:
                    numbers.add(int(text))

        def leaks(value: Any) -> bool:
            if isinstance(value, bool):
                return False
            if isinstance(value, int | float):
                return value == int(value) and int(value) in numbers
            if not isinstance(value, str):
                return False
            low = value.lower()
            if low.strip() in exact or any(n in low for n in needles):
                return True
            return any(p in re.sub(r"\D", "", run) for run in _DIGIT_RUN.findall(value) for p in phones)

        for table in plan.order:
            rs = rows.get(table, [])
            if not rs:
                continue
            t, key = spec.tables[table], plan.keys[table]
            keys = [r[key] for r in rs]
            if t.deletes:
                n = await conn.fetchval(f"SELECT count(*) FROM {plan.q(table)} WHERE {quote_ident(key)} = ANY($1)",
                                        keys)
                if n:
                    left[table] = left.get(table, 0) + int(n)
                continue
            # read back whole, undescribed columns (added since the start) included
            now_rows = await conn.fetch(f"SELECT {quote_ident(key)} AS k, to_jsonb(x) AS j FROM {plan.q(table)} x "
                                        f"WHERE {quote_ident(key)} = ANY($1)", keys)
            before = {r[key]: r for r in rs}
            held = {c for c in t.columns if t.strategy(c) == "retain"}
            # a number is looked for in columns that may hold anything: not in a retained one, the
            # key or one the description says holds no personal data (counts, amounts, ids)
            plain = held | set(t.other_columns) | {key}
            bad = 0
            for r in now_rows:
                data = r["j"] if isinstance(r["j"], dict) else orjson.loads(r["j"])
                old = before[r["k"]]
                wrong = any(data.get(c) != self._erased_value(table, c, old[c])
                            for c in t.columns if t.strategy(c) in ERASING)
                leaked = any(leaks(v) for c, v in data.items()
                             if c not in held and (isinstance(v, str) or c not in plain))
                bad += wrong or leaked
            if bad:
                left[table] = left.get(table, 0) + bad
        if left:
            what = ", ".join(f"{n} rows of {t}" for t, n in left.items())
            raise _ProofFailed(f"proof of erasure failed: {what} still hold the subject (the erasure was rolled "
                               "back; nothing was changed)")

    # -- rectify ------------------------------------------------------------------------------
    def _targets(self) -> dict[str, tuple[str, str]]:
        """category -> (table, column) of every rectifiable field."""
        out = {}
        for table, t in self.spec.tables.items():
            for fld, col in t.rectify.items():
                out[CHANGE_FIELDS.get(fld, fld)] = (table, col)
        return out

    def _changes(self, ctx: TaskContext) -> dict[tuple[str, str], Any]:
        changes = ctx.task.changes or {}
        if not changes:
            raise _Refused("the rectification task carries no changes")
        targets = self._targets()
        out: dict[tuple[str, str], Any] = {}
        for key, raw in changes.items():
            category = change_category(key)
            if category is None or category not in targets:
                raise _Refused(f"{self.spec.system.name} cannot rectify field {_label(key)}: it keeps no such field")
            try:
                value = _parse(category, raw, _region(ctx))
            except ValueError as exc:
                raise _Refused(f"the correction of field {_label(key)} is not valid: {exc}") from None
            target = targets[category]
            if target in out and out[target] != value:
                raise _Refused(f"the task gives two different corrections of field {_label(key)}")
            out[target] = value
        return out

    async def rectify(self, ctx: TaskContext) -> Result:
        try:
            changes = self._changes(ctx)
            async with self.pool.acquire() as conn, conn.transaction():
                match, rows = await self._locate(conn, ctx, lock=True)
                answer = self._answer(match)
                if answer is not None:
                    return answer
                changed = rectified = 0
                for (table, col), value in sorted(changes.items()):
                    key = self.plan.keys[table]
                    keys = [r[key] for r in rows.get(table, [])]
                    rectified = max(rectified, len(keys))
                    if not keys:
                        continue
                    try:
                        changed += _rowcount(await conn.execute(
                            f"UPDATE {self.plan.q(table)} SET {quote_ident(col)} = $1 WHERE {quote_ident(key)} "
                            f"= ANY($2) AND {quote_ident(col)} IS DISTINCT FROM $1", value, keys))
                    except asyncpg.UniqueViolationError:
                        raise _Refused(f"the correction of column {col} of {table} is another record's "
                                       "already; nothing was changed") from None
                    except asyncpg.DataError:
                        raise _Refused(f"the correction of column {col} of {table} does not fit the "
                                       "column; nothing was changed") from None
        except _Refused as exc:
            return Result.refused(str(exc))
        return Result.succeeded(counts={"located": len(rows[self.spec.root]), "rectified": rectified,
                                        "fields": len(changes), "changed": changed},
                                categories=sorted({self._category(t, c) for t, c in changes}))

    def _category(self, table: str, column: str) -> str:
        return self.spec.tables[table].columns[column].category or "user"

    # -- restrict, lift_restriction ---------------------------------------------------------
    async def _set_restriction(self, ctx: TaskContext, on: bool) -> Result:
        async with self.pool.acquire() as conn, conn.transaction():
            match, rows = await self._locate(conn, ctx, lock=True)
            answer = self._answer(match)
            if answer is not None:
                return answer
            total = done = 0
            for table, t in self.spec.tables.items():
                rs = rows.get(table, [])
                if t.restrict is None or not rs:
                    continue
                col, key = quote_ident(t.restrict), quote_ident(self.plan.keys[table])
                is_bool = self.plan.columns[table][t.restrict].udt == "bool"
                if on:
                    value, pending = ("true", f"{col} IS NOT TRUE") if is_bool else ("now()", f"{col} IS NULL")
                else:
                    value, pending = ("false", f"{col} IS TRUE") if is_bool else ("NULL", f"{col} IS NOT NULL")
                total += len(rs)
                done += _rowcount(await conn.execute(
                    f"UPDATE {self.plan.q(table)} SET {col} = {value} WHERE {key} = ANY($1) AND {pending}",
                    [r[self.plan.keys[table]] for r in rs]))
        located = len(rows[self.spec.root])
        if on:
            counts = {"located": located, "restricted": total, "already_restricted": total - done}
            if ctx.task.purposes:
                counts["purposes"] = len(ctx.task.purposes)
            return Result.succeeded(counts=counts)
        return Result.succeeded(counts={"located": located, "lifted": done, "already_lifted": total - done})

    async def restrict(self, ctx: TaskContext) -> Result:
        """Restricts all processing of the subject's restrictable rows (an objection's purposes too)."""
        return await self._set_restriction(ctx, True)

    async def lift_restriction(self, ctx: TaskContext) -> Result:
        return await self._set_restriction(ctx, False)


def _region(ctx: TaskContext) -> str | None:
    """The phone region of the task's jurisdiction (Vietnam when it names none)."""
    return region_of(ctx.task.jurisdiction) if ctx.task.jurisdiction else DEFAULT_REGION


def _phone_digits(e164: str) -> set[str]:
    """The digits of a phone number (E.164) as it may be stored: international (``84901234567``,
    ``0084901234567``) and national (``0901234567``)."""
    digits = e164.lstrip("+")
    out = {digits, "00" + digits}
    try:
        number = phonenumbers.parse(e164 if e164.startswith("+") else "+" + e164, None)
    except phonenumbers.NumberParseException:
        return out
    national = re.sub(r"\D", "", phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL))
    if len(national) >= 6:
        out.add(national)
    return out


#: a run of digits as a phone is written in text: "+84 912 345 678", "(0912) 345-678"
_DIGIT_RUN = re.compile(r"\+?\(?\d[\d\s().\-/]*\d")


_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _label(key: str) -> str:
    """A field name for a receipt's reason; anything that does not look like one is not repeated."""
    return repr(key) if _LABEL.fullmatch(key) else "(a name that is not one)"


def _parse(category: str, raw: str, region: str | None = DEFAULT_REGION) -> Any:
    if category == "user.contact.email":
        return normalise(IdentifierType.email, raw)
    if category == "user.contact.phone_number":
        return normalise(IdentifierType.phone, raw, region=region)
    if category == "user.demographic.date_of_birth":
        return parse_date_of_birth(raw)
    return parse_text(raw)


def sql_worker(
    spec: DatabaseSpec | str | Path,
    *,
    dsn: str | None = None,
    dsn_from: Callable[[Settings], str] | None = None,
    prepare: Callable[[str], Awaitable[object]] | None = None,
    **worker_options: Any,
) -> Worker:
    """A worker for the database ``spec`` describes (a :class:`DatabaseSpec` or a YAML file's path).

    ``dsn``, or ``dsn_from(settings)`` at startup: the database. ``prepare(dsn)``: run at startup
    before the database is checked (create the schema, say). ``worker_options`` go to
    :class:`~dsrflow.worker.Worker` (``ledger=``, ``concurrency=``...). The description is checked
    against the database when the worker starts: a mismatch raises :class:`SpecError`."""
    if not isinstance(spec, DatabaseSpec):
        spec = load_spec(spec)
    return SqlSystem(spec, dsn=dsn, dsn_from=dsn_from, prepare=prepare, **worker_options).worker
