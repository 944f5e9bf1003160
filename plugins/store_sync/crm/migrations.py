"""Apply the ordered DDL migrations in ``include/sql/migrations/`` once each, idempotently."""

from __future__ import annotations

from pathlib import Path

import psycopg

MIGRATIONS = Path(__file__).resolve().parents[3] / "include" / "sql" / "migrations"


def migrate(dsn: str) -> list[str]:
    """Apply what is missing, each file in its own transaction; returns the versions applied."""
    applied = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        if up_to_date(conn):  # the usual case, once per landing cycle: one query, no locks
            return applied
        with conn.transaction():
            # IF NOT EXISTS is not safe between sessions (two first starts at once, e.g. Celery workers,
            # collide on pg_namespace's unique index): the migrators' lock comes first.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('store_sync.migrate'))")
            conn.execute("CREATE SCHEMA IF NOT EXISTS sync")
            conn.execute("CREATE TABLE IF NOT EXISTS sync.schema_migration (version text PRIMARY KEY, "
                         "applied_at timestamptz NOT NULL DEFAULT now())")
        for path in sorted(MIGRATIONS.glob("*.sql")):
            with conn.transaction():
                # One migrator at a time (parallel tasks, tests): a transaction-scoped advisory lock.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('store_sync.migrate'))")
                if conn.execute("SELECT 1 FROM sync.schema_migration WHERE version=%s", (path.stem,)).fetchone():
                    continue
                conn.execute(path.read_text())
                conn.execute("INSERT INTO sync.schema_migration(version) VALUES (%s)", (path.stem,))
                applied.append(path.stem)
    return applied


def up_to_date(conn: psycopg.Connection) -> bool:
    wanted = {path.stem for path in MIGRATIONS.glob("*.sql")}
    if conn.execute("SELECT to_regclass('sync.schema_migration')").fetchone()[0] is None:
        return False
    return wanted <= {r[0] for r in conn.execute("SELECT version FROM sync.schema_migration")}
