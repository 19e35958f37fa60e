"""The export store: where workers put exported records (the claim check).

Exported records never travel through Kafka. A worker writes them here and its
receipt carries only the key, size and sha256 (an :class:`~dsrflow.events.Artifact`).

One interface, two implementations, in the manner of httpx's transports::

    ExportStore           abstract: put, get, exists, path, delete, scoped
    ├── LocalExportStore  files under a root directory, written atomically
    ├── MemoryExportStore a dict, for tests
    └── ScopedExportStore one prefix of another store: a system's own part

Each system's exports live under its own prefix, ``[controllers/<c>/]systems/<system>/``
(:func:`system_prefix`): its worker's handlers get only that part (:meth:`ExportStore.scoped`),
and a deployment gives each worker only that part of the store (docs/deploy, README "ACLs").
The coordinator reads every system's part, and accepts in a bundle only the exports under the
part of the system whose receipt names them.

What can go wrong::

    ExportError
    ├── InvalidKey        the key is malformed or escapes the store's root
    ├── ArtifactNotFound  no object under that key (also a KeyError)
    └── BundleError       (dsrflow.exports.bundle) a part is missing or fails its checksum

Keys are relative, ``/``-separated paths of plain segments. Both implementations
check keys the same way, so a test against the memory store catches what the
local store would refuse.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from uuid import UUID

from ..errors import DsrflowError
from ..events import Artifact

__all__ = [
    "ArtifactNotFound",
    "ExportError",
    "ExportStore",
    "InvalidKey",
    "LocalExportStore",
    "MemoryExportStore",
    "ScopedExportStore",
    "bundle_key",
    "export_key",
    "system_case_prefix",
    "system_prefix",
    "validate_key",
]

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_MAX_KEY = 1024  # Artifact.ref's limit


class ExportError(DsrflowError):
    """Base of everything the export store and bundle builder raise."""


class InvalidKey(ExportError, ValueError):
    """The key is malformed or would escape the store's root."""


class ArtifactNotFound(ExportError, KeyError):
    """Nothing is stored under the key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "artifact not found"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`InvalidKey`.

    Segments start with a letter or digit, so ``.``, ``..`` and hidden files are
    impossible, and there is no leading ``/``.
    """
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY:
        raise InvalidKey("export key must be a non-empty string of at most 1024 characters")
    if key.startswith("/"):
        raise InvalidKey("export key must be relative")
    for segment in key.split("/"):
        if not _SEGMENT.match(segment) or ".." in segment:
            raise InvalidKey(f"export key segment {segment!r} is not allowed")
    return key


def export_key(
    case_id: UUID | str, system: str, task_id: UUID | str, attempt: int, *, digest: str, part: int = 1,
    controller: str = "default",
) -> str:
    """The key of a worker's export:
    ``[controllers/<controller>/]systems/<system>/cases/<case_id>/<task_id>-<attempt>-<digest16>.json``.

    Every system writes under its own prefix (:func:`system_prefix`), which a deployment gives to
    that system's worker alone (a volume's sub-path, an object store's prefix policy) and to the
    coordinator, which reads it to build access bundles. A handler that exports more than one file
    gets ``-<part>`` before the digest for parts after the first. The key ends with the first 16
    hex digits of the content's sha256, so exports are written once and never replaced: a
    redelivered task that exports the same bytes lands on the same key, and one that sees changed
    data writes a new file, while the export a receipt already named stays as its checksum says.
    """
    if len(digest) < 16:
        raise ValueError("digest must be a hex sha256")
    suffix = "" if part == 1 else f"-{part}"
    return validate_key(f"{system_case_prefix(system, case_id, controller)}{task_id}-{attempt}{suffix}-"
                        f"{digest[:16]}.json")


def controller_prefix(controller: str = "default") -> str:
    """Where a controller's (tenant's) exports live: the store's root for the default controller,
    ``controllers/<controller>/`` for the others (docs/tenants.md), so each tenant's exports can be
    given their own credentials and lifecycle rules by prefix."""
    return "" if controller == "default" else f"controllers/{controller}/"


def system_prefix(system: str, controller: str = "default") -> str:
    """The part of the export store that is one system's: ``[controllers/<c>/]systems/<system>/``.
    Its worker writes there and nowhere else (:meth:`ExportStore.scoped`)."""
    return f"{controller_prefix(controller)}systems/{system}/"


def system_case_prefix(system: str, case_id: UUID | str, controller: str = "default") -> str:
    """The prefix of one system's exports for one case."""
    return f"{system_prefix(system, controller)}cases/{case_id}/"


def bundle_key(case_id: UUID | str, controller: str = "default") -> str:
    """The key of an access case's bundle: ``[controllers/<controller>/]bundles/<case_id>.zip``."""
    return validate_key(f"{controller_prefix(controller)}bundles/{case_id}.zip")


def _artifact(key: str, data: bytes, records: int, media_type: str) -> Artifact:
    return Artifact(
        ref=key,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        records=records,
        media_type=media_type,
    )


class ExportStore(ABC):
    """Where exports and bundles are kept. Implementations must be safe to call from threads."""

    def put(self, key: str, data: bytes, *, records: int, media_type: str = "application/json") -> Artifact:
        """Store ``data`` under ``key`` (replacing what was there) and return its claim check."""
        validate_key(key)
        if records < 0:
            raise ValueError("records must be >= 0")
        data = bytes(data)
        self._write(key, data)
        return _artifact(key, data, records, media_type)

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; raises :class:`ArtifactNotFound`."""
        return self._read(validate_key(key))

    def exists(self, key: str) -> bool:
        return self._exists(validate_key(key))

    def path(self, key: str) -> Path | None:
        """The local file that holds ``key`` (whether or not it exists yet), or None when the
        store keeps no local files."""
        validate_key(key)
        return None

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if something was removed. Deleting a missing key is not an error."""
        return self._delete(validate_key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix`` (a non-empty ``a/b/`` path ending
        in ``/``); returns how many. A client company that leaves takes its exports with it."""
        if not prefix.endswith("/"):
            raise InvalidKey("a prefix ends with '/'")
        validate_key(prefix.rstrip("/"))
        return sum(self._delete(key) for key in self._keys(prefix))

    def scoped(self, prefix: str) -> ExportStore:
        """A view of this store that reads and writes only keys under ``prefix`` (a ``a/b/`` path):
        what a worker's handlers get, so that a handler cannot write, read or delete another
        system's exports even by mistake. Keys stay whole (the view does not strip the prefix)."""
        return ScopedExportStore(self, prefix)

    @abstractmethod
    def _keys(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def _write(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _read(self, key: str) -> bytes: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _delete(self, key: str) -> bool: ...


#: read errors no retry can fix
_UNREADABLE = frozenset({errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP})


class LocalExportStore(ExportStore):
    """Files under ``root``. Writes are atomic (temporary file, fsync, rename), so a reader never
    sees half an export. Files are private to the owner: exports hold personal data."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalExportStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        validate_key(key)
        target = (self.root / key).resolve()
        # validate_key already rules out '..'; this also catches symlinks pointing outside.
        if not target.is_relative_to(self.root):
            raise InvalidKey("export key escapes the store's root")
        return target

    def _write(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def _read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(f"no export under {key!r}") from None
        except OSError as exc:
            if exc.errno in _UNREADABLE:
                # Waiting will not help: fail what needed the export, not everything behind it.
                raise ExportError(f"export under {key!r} cannot be read: {exc.strerror}") from None
            raise  # ENOSPC, EIO, a network mount's timeout: may pass, so the caller retries

    def _exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def _keys(self, prefix: str) -> list[str]:
        top = self.path(prefix.rstrip("/"))
        if not top.is_dir():
            return []
        return sorted(f"{prefix}{p.relative_to(top).as_posix()}" for p in top.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def _delete(self, key: str) -> bool:
        target = self.path(key)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(target.parent)
        return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ScopedExportStore(ExportStore):
    """One prefix of another store (see :meth:`ExportStore.scoped`): a key outside it is an
    :class:`InvalidKey`. It keeps a handler from reaching another system's exports by mistake;
    what keeps a worker out of them is the deployment, which gives it only its own part."""

    def __init__(self, inner: ExportStore, prefix: str) -> None:
        if not prefix.endswith("/"):
            raise InvalidKey("a prefix ends with '/'")
        validate_key(prefix.rstrip("/"))
        self._inner = inner
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"{self._inner!r}.scoped({self.prefix!r})"

    def _inside(self, key: str) -> str:
        if not validate_key(key).startswith(self.prefix):
            raise InvalidKey(f"export key {key!r} is outside this system's part of the export store ({self.prefix})")
        return key

    def path(self, key: str) -> Path | None:
        return self._inner.path(self._inside(key))

    def _keys(self, prefix: str) -> list[str]:
        return [k for k in self._inner._keys(prefix) if k.startswith(self.prefix)]

    def _write(self, key: str, data: bytes) -> None:
        self._inner._write(self._inside(key), data)

    def _read(self, key: str) -> bytes:
        return self._inner._read(self._inside(key))

    def _exists(self, key: str) -> bool:
        return self._inner._exists(self._inside(key))

    def _delete(self, key: str) -> bool:
        return self._inner._delete(self._inside(key))


class MemoryExportStore(ExportStore):
    """A dict behind a lock. For tests, and for users' tests of their own workers."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryExportStore({len(self._objects)} objects)"

    def keys(self) -> list[str]:
        """Every stored key, sorted (test helper)."""
        with self._lock:
            return sorted(self._objects)

    def _write(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[key] = data

    def _read(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ArtifactNotFound(f"no export under {key!r}") from None

    def _exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def _keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._objects if k.startswith(prefix))

    def _delete(self, key: str) -> bool:
        with self._lock:
            return self._objects.pop(key, None) is not None
