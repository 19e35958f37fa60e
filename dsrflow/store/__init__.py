"""The case store: PostgreSQL through asyncpg, with ordered SQL migrations."""

from .migrate import migrate, pending_migrations

__all__ = ["migrate", "pending_migrations"]
