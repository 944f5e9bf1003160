"""Run the CRM transforms: inbox rows not yet applied → the 3NF model in schema ``crm``.

The SQL lives in ``include/sql/transform/`` (one file per group of entities, named in dependency
order, bound to entities by the registry's ``transform`` field). For each file the runner puts a batch
of unapplied inbox rows in scope (``pg_temp.batch_scope``, at most ``batch_rows``), runs the file, and
marks the batch applied, all in one transaction; it loops until no row is left. Checks in
``include/sql/checks/`` return offending rows; a failure names them.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import psycopg

from store_sync.registry import entities

log = logging.getLogger(__name__)
SQL = Path(__file__).resolve().parents[2] / "include" / "sql"


def steps() -> list[tuple[str, list[str]]]:
    """(transform file, the entities it reads) in file-name order."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, spec in entities().items():
        if spec.transform:
            by_file[spec.transform].append(name)
    return sorted(by_file.items())


def run_step(conn: psycopg.Connection, sql_file: str, names: list[str], batch_rows: int = 20_000,
             only_inbox_ids: list[int] | None = None) -> dict:
    """Apply every unapplied row of ``names`` (or just ``only_inbox_ids``), batch by batch."""
    text = (SQL / "transform" / sql_file).read_text()
    applied, batches, started = 0, 0, time.monotonic()
    while True:
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE batch_scope (inbox_id bigint PRIMARY KEY) ON COMMIT DROP")
            scope = ("SELECT inbox_id FROM inbox.record WHERE entity = ANY(%s) AND applied_at IS NULL"
                     + (" AND inbox_id = ANY(%s)" if only_inbox_ids is not None else "")
                     + " ORDER BY inbox_id LIMIT %s")
            args = [names] + ([only_inbox_ids] if only_inbox_ids is not None else []) + [batch_rows]
            n = conn.execute(f"INSERT INTO batch_scope {scope}", args).rowcount
            if n == 0:
                break
            conn.execute(text)
            conn.execute("UPDATE inbox.record r SET applied_at = clock_timestamp() FROM batch_scope s "
                         "WHERE r.inbox_id = s.inbox_id")
        applied += n
        batches += 1
    return {"step": sql_file, "entities": names, "inbox_rows": applied, "batches": batches,
            "seconds": round(time.monotonic() - started, 3)}


def transform(dsn: str, names: list[str] | None = None, batch_rows: int = 20_000,
              only_inbox_ids: list[int] | None = None) -> list[dict]:
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:  # each batch's transaction() commits on its own
        for sql_file, step_entities in steps():
            wanted = [n for n in step_entities if names is None or n in names]
            if wanted:
                out.append(run_step(conn, sql_file, wanted, batch_rows, only_inbox_ids))
                log.info("%s: %d inbox rows applied in %d batches, %.2fs", sql_file, out[-1]["inbox_rows"],
                         out[-1]["batches"], out[-1]["seconds"])
    return out


class CheckFailed(Exception):
    pass


def checks() -> list[tuple[str, str]]:
    text = (SQL / "checks" / "crm_checks.sql").read_text()
    parts = re.split(r"^-- name: (\S+)\n", text, flags=re.M)[1:]
    return [(parts[i], parts[i + 1].strip().rstrip(";")) for i in range(0, len(parts), 2)]


def run_checks(dsn: str, show: int = 5) -> dict[str, int]:
    """Run every check; raise naming the first offending rows of each failed check."""
    failures, counts = [], {}
    with psycopg.connect(dsn) as conn:
        for name, query in checks():
            rows = conn.execute(query).fetchall()
            counts[name] = len(rows)
            if rows:
                sample = "; ".join(f"{key}: {problem}" for key, problem in rows[:show])
                failures.append(f"{name}: {len(rows)} rows, e.g. {sample}")
    if failures:
        raise CheckFailed("CRM checks failed:\n  " + "\n  ".join(failures))
    return counts


def table_counts(dsn: str) -> list[tuple[str, int]]:
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'crm' AND table_type = 'BASE TABLE' "
            "ORDER BY table_name")]
        return [(t, conn.execute(f'SELECT count(*) FROM crm."{t}"').fetchone()[0]) for t in tables]
