"""Run the CRM transforms: inbox rows not yet applied → the 3NF model in schema ``crm``.

The SQL lives in ``include/sql/transform/`` (one file per group of entities, named in dependency
order, bound to entities by the registry's ``transform`` field). For each file the runner puts a batch
of unapplied inbox rows in scope (``pg_temp.batch_scope``, at most ``batch_rows``), runs the file, and
marks the batch applied, all in one transaction; it loops until no row is left. Checks in
``include/sql/checks/`` return offending rows; a failure names them.

One bad record never stops the CRM:

* a batch the model rejects for its content (a data, integrity or limit error) is split in halves and
  each half retried, down to single rows; a single row that still fails goes to
  ``sync.transform_quarantine`` with PostgreSQL's reason, and is left out of later batches while the
  rest applies (set-based as before: a clean batch runs once);
* each step runs on its own: a step that fails for another reason (a lost connection, a bug in its
  SQL) does not stop the later steps; ``transform`` raises at the end, naming the failed steps;
* ``--retry-quarantine`` (and the ``crm_retry_quarantine`` DAG) re-applies quarantined rows once the
  model or the record was fixed; a newer version of a record that applies closes its older entries.

    python -m store_sync.crm.transform                       # apply what waits, then run the checks
    python -m store_sync.crm.transform --retry-quarantine [--id N ...] [--entity E ...]
    python -m store_sync.crm.transform --list-quarantine
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import psycopg

from store_sync.registry import entities, field_map_rows

log = logging.getLogger(__name__)
SQL = Path(__file__).resolve().parents[3] / "include" / "sql"

# SQLSTATE classes a record's content can cause: cardinality (21: two rows for one key), data (22: a
# cast, a length, a range), integrity (23: NOT NULL, foreign key, unique, check), program limits (54:
# an index row too large). Anything else (a lost connection, a deadlock, a bug in the SQL) is not the
# record's fault: the step fails and is retried whole.
DATA_FAULTS = ("21", "22", "23", "54")
# One writer at a time per batch: a CLI retry beside the DAG waits instead of deadlocking.
BATCH_LOCK = "SELECT pg_advisory_xact_lock(hashtext('store_sync.crm.transform'))"
# A step's sessions side by side (``transform_sessions``) share the lock above, which keeps every other
# writer out; one such step at a time (SIDE_BY_SIDE, held by the session that hands out the rows).
PART_LOCK = "SELECT pg_advisory_xact_lock_shared(hashtext('store_sync.crm.transform'))"
SIDE_BY_SIDE = "hashtext('store_sync.crm.transform.sessions')"
# The rows of one round, each with its session: by the record's buyer where the entity has one
# (sync.partition_key, as its newest version says), so the rows two sessions share (a contact, a queued
# customer) are rarely written by both at once; a record's versions always go to the same session.
PARTITIONS = """
SELECT inbox_id, (hashtext(first_value(sync.partition_key(entity, source_key, payload))
                           OVER (PARTITION BY entity, source_key ORDER BY inbox_id DESC)) & 1023) %% %s
FROM (SELECT r.inbox_id, r.entity, r.source_key, r.payload FROM inbox.record r
      WHERE r.entity = ANY(%s) AND r.applied_at IS NULL
        AND NOT EXISTS (SELECT 1 FROM sync.transform_quarantine q WHERE q.inbox_id = r.inbox_id AND q.resolved_at IS NULL)
      ORDER BY r.inbox_id LIMIT %s) x
ORDER BY inbox_id"""
# Not the records' fault, nor lasting: sessions side by side met on a shared row (a contact, a code).
TRANSIENT = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# Allocated only as temp tables fill it; settable only before a session's first temp table.
TEMP_BUFFERS = "SET temp_buffers = '128MB'"


class TransformFailed(Exception):
    """Some steps failed for reasons other than their records' content; the others ran."""


def steps() -> list[tuple[str, list[str]]]:
    """(transform file, the entities it reads) in file-name order."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, spec in entities().items():
        if spec.transform:
            by_file[spec.transform].append(name)
    return sorted(by_file.items())


def is_data_fault(exc: BaseException) -> bool:
    state = getattr(getattr(exc, "diag", None), "sqlstate", None) or ""
    return isinstance(exc, psycopg.Error) and state[:2] in DATA_FAULTS


def describe_error(exc: psycopg.Error) -> str:
    """PostgreSQL's message with its detail, hint, constraint and where, on one line."""
    d = exc.diag
    parts = [d.message_primary or str(exc).strip()]
    parts += [f"{label}: {value}" for label, value in (
        ("detail", d.message_detail), ("hint", d.message_hint), ("constraint", d.constraint_name),
        ("where", d.context and " / ".join(line.strip() for line in d.context.splitlines()))) if value]
    return "; ".join(parts)


def run_step(conn: psycopg.Connection, sql_file: str, names: list[str], batch_rows: int = 20_000,
             only_inbox_ids: list[int] | None = None, retry: bool = False, *, dsn: str | None = None,
             sessions: int = 1) -> dict:
    """Apply every unapplied row of ``names`` (or just ``only_inbox_ids``), batch by batch.

    ``retry``: re-apply the open quarantine rows of ``names`` (or those of ``only_inbox_ids``) instead.
    ``sessions`` > 1 (with ``dsn``): when more than a batch waits, that many sessions side by side, each
    on its own partition of the records (the CRM server's cores, not one)."""
    text = (SQL / "transform" / sql_file).read_text()
    stats = {"step": sql_file, "entities": names, "inbox_rows": 0, "batches": 0, "quarantined": 0, "splits": 0}
    started = time.monotonic()
    if retry:
        ids = [r[0] for r in conn.execute(
            "SELECT inbox_id FROM sync.transform_quarantine WHERE resolved_at IS NULL AND entity = ANY(%s)"
            + (" AND inbox_id = ANY(%s)" if only_inbox_ids is not None else "") + " ORDER BY inbox_id",
            [names] + ([only_inbox_ids] if only_inbox_ids is not None else []))]
        for start in range(0, len(ids), batch_rows):  # one pass: a row that fails again stays quarantined
            settle(conn, sql_file, text, ids[start:start + batch_rows], stats)
    else:
        # More than a batch waiting (a first load, a backfill): rounds side by side while it lasts.
        while sessions > 1 and dsn and only_inbox_ids is None and conn.execute(
                "SELECT count(*) > %s FROM (SELECT 1 FROM inbox.record r WHERE entity = ANY(%s) AND applied_at IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM sync.transform_quarantine q WHERE q.inbox_id = r.inbox_id "
                "AND q.resolved_at IS NULL) LIMIT %s) x", (batch_rows, names, batch_rows + 1)).fetchone()[0]:
            if not side_by_side(conn, dsn, sql_file, text, names, batch_rows, sessions, stats):
                break
            stats["sessions"] = sessions
        apply_pending(conn, sql_file, text, names, batch_rows, only_inbox_ids, stats)  # the rest, one session
    stats["seconds"] = round(time.monotonic() - started, 3)
    return stats


def apply_pending(conn: psycopg.Connection, sql_file: str, text: str, names: list[str], batch_rows: int,
                  only_inbox_ids: list[int] | None, stats: dict) -> None:
    while True:
        # Quarantined rows wait for a retry; everything else is picked in arrival order.
        ids = [r[0] for r in conn.execute(
            "SELECT inbox_id FROM inbox.record r WHERE entity = ANY(%s) AND applied_at IS NULL"
            + (" AND inbox_id = ANY(%s)" if only_inbox_ids is not None else "")
            + " AND NOT EXISTS (SELECT 1 FROM sync.transform_quarantine q WHERE q.inbox_id = r.inbox_id"
              " AND q.resolved_at IS NULL) ORDER BY inbox_id LIMIT %s",
            [names] + ([only_inbox_ids] if only_inbox_ids is not None else []) + [batch_rows])]
        if not ids:
            break
        settle(conn, sql_file, text, ids, stats)  # every id ends applied or quarantined: the loop moves on


def side_by_side(conn: psycopg.Connection, dsn: str, sql_file: str, text: str, names: list[str], batch_rows: int,
                 sessions: int, stats: dict, rounds_of: int = 5) -> int:
    """One round: the next ``sessions * batch_rows * rounds_of`` waiting rows (bounded memory), split by
    sync.partition_key, each part applied batch by batch by a session of its own, all side by side.
    Returns how many rows it handed out."""
    from concurrent.futures import ThreadPoolExecutor

    conn.execute(f"SELECT pg_advisory_lock({SIDE_BY_SIDE})")
    try:
        parts: list[list[int]] = [[] for _ in range(sessions)]
        for inbox_id, part in conn.execute(PARTITIONS, (sessions, names, sessions * batch_rows * rounds_of)):
            parts[part].append(inbox_id)
        counts = [{"inbox_rows": 0, "batches": 0, "quarantined": 0, "splits": 0} for _ in parts]

        def apply(index: int) -> None:
            with psycopg.connect(dsn, autocommit=True) as own:
                own.execute(TEMP_BUFFERS)
                ids = parts[index]
                for start in range(0, len(ids), batch_rows):
                    settle(own, sql_file, text, ids[start:start + batch_rows], counts[index], shared=True)

        with ThreadPoolExecutor(sessions, thread_name_prefix="transform") as pool:
            for done in [pool.submit(apply, i) for i in range(sessions)]:
                done.result()
    finally:
        conn.execute(f"SELECT pg_advisory_unlock({SIDE_BY_SIDE})")
    for part in counts:
        for name, value in part.items():
            stats[name] += value
    return sum(map(len, parts))


def settle(conn: psycopg.Connection, sql_file: str, text: str, ids: list[int], stats: dict,
           shared: bool = False) -> None:
    """Apply ``ids`` in one transaction; when their content is rejected, bisect down to the bad rows.
    ``shared``: sessions side by side apply the step (each its own records), under the shared lock."""
    for attempt in range(4):
        try:
            with conn.transaction():
                conn.execute(PART_LOCK if shared else BATCH_LOCK)
                conn.execute("CREATE TEMP TABLE batch_scope (inbox_id bigint PRIMARY KEY) ON COMMIT DROP")
                conn.execute("INSERT INTO batch_scope SELECT unnest(%s::bigint[])", [ids])
                # What the mapping names, from the registry: sync.keep_unmapped keeps every other field.
                conn.execute("CREATE TEMP TABLE field_map (entity text, pattern text, what text, "
                             "PRIMARY KEY (entity, pattern)) ON COMMIT DROP")
                conn.execute("INSERT INTO field_map SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
                             list(field_map_rows()))
                conn.execute(text)
                conn.execute("SELECT sync.finish_batch()")
            break
        except TRANSIENT as exc:
            if attempt == 3:
                raise
            log.warning("%s: a batch of %d rows met another session (%s); again", sql_file, len(ids),
                        exc.diag.message_primary)
            time.sleep(0.2 * (attempt + 1))
        except psycopg.Error as exc:
            if not is_data_fault(exc):
                raise
            if len(ids) == 1:
                quarantine(conn, sql_file, ids[0], exc)
                stats["quarantined"] += 1
                return
            log.warning("%s: a batch of %d rows failed (%s); splitting it", sql_file, len(ids),
                        exc.diag.message_primary)
            stats["splits"] += 1
            half = len(ids) // 2
            settle(conn, sql_file, text, ids[:half], stats, shared)
            settle(conn, sql_file, text, ids[half:], stats, shared)
            return
    stats["inbox_rows"] += len(ids)
    stats["batches"] += 1


def quarantine(conn: psycopg.Connection, sql_file: str, inbox_id: int, exc: psycopg.Error) -> None:
    reason = describe_error(exc)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO sync.transform_quarantine AS q (inbox_id, entity, source_key, step, sqlstate, reason, record) "
            "SELECT inbox_id, entity, source_key, %s, %s, %s, payload FROM inbox.record WHERE inbox_id = %s "
            "ON CONFLICT (inbox_id) DO UPDATE SET step = EXCLUDED.step, sqlstate = EXCLUDED.sqlstate, "
            "reason = EXCLUDED.reason, last_seen_at = now(), attempts = q.attempts + 1, resolved_at = NULL, "
            "resolution = NULL RETURNING entity, source_key, attempts",
            (sql_file, exc.diag.sqlstate, reason, inbox_id)).fetchone()
    if row:
        log.warning("%s: %s %s (inbox row %d) quarantined, attempt %d: %s", sql_file, row[0], row[1], inbox_id, row[2],
                    reason)


def transform(dsn: str, names: list[str] | None = None, batch_rows: int = 20_000,
              only_inbox_ids: list[int] | None = None, retry: bool = False) -> list[dict]:
    """Every step in dependency order, each on its own; raises ``TransformFailed`` at the end if any failed."""
    out, failed = [], []
    for sql_file, step_entities in steps():
        wanted = [n for n in step_entities if names is None or n in names]
        if not wanted:
            continue
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:  # each batch's transaction() commits on its own
                # A batch's documents, held decompressed in pg_temp.b (about 70 MB per 20k orders), are read
                # by every statement of a step: kept in the session's buffers, not re-read from the OS.
                conn.execute(TEMP_BUFFERS)
                sessions = max(entities()[n].transform_sessions for n in wanted)
                out.append(run_step(conn, sql_file, wanted, batch_rows, only_inbox_ids, retry, dsn=dsn,
                                    sessions=sessions))
        except psycopg.Error as exc:  # not the records' fault: the later steps still run
            log.exception("%s failed; the later steps go on", sql_file)
            failed.append(f"{sql_file}: {type(exc).__name__}: {str(exc).strip()}")
            continue
        s = out[-1]
        log.info("%s: %d inbox rows applied in %d batches, %d quarantined, %.2fs", sql_file, s["inbox_rows"],
                 s["batches"], s["quarantined"], s["seconds"])
    if failed:
        raise TransformFailed("transform steps failed (the others ran):\n  " + "\n  ".join(failed))
    return out


def retry_quarantine(dsn: str, quarantine_ids: list[int] | None = None, names: list[str] | None = None,
                     batch_rows: int = 20_000) -> dict:
    """Re-apply open quarantine rows (all, or these ids / entities); those that apply are resolved."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT inbox_id FROM sync.transform_quarantine WHERE resolved_at IS NULL"
            + (" AND quarantine_id = ANY(%s)" if quarantine_ids else "") + (" AND entity = ANY(%s)" if names else ""),
            [v for v in (quarantine_ids, names) if v]).fetchall()
    inbox_ids = [r[0] for r in rows]
    steps_run = transform(dsn, names, batch_rows, only_inbox_ids=inbox_ids, retry=True) if inbox_ids else []
    with psycopg.connect(dsn) as conn:
        still = conn.execute("SELECT count(*) FROM sync.transform_quarantine WHERE resolved_at IS NULL "
                             "AND inbox_id = ANY(%s)", (inbox_ids,)).fetchone()[0]
    return {"retried": len(inbox_ids), "resolved": len(inbox_ids) - still, "still_quarantined": still,
            "steps": steps_run}


def open_quarantine(dsn: str, limit: int = 50) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT quarantine_id, entity, source_key, inbox_id, crm_version_inbox_id, attempts, step, reason "
            "FROM sync.transform_quarantine_open ORDER BY quarantine_id LIMIT %s", (limit,)).fetchall()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retry-quarantine", action="store_true", help="re-apply quarantined inbox rows")
    parser.add_argument("--id", type=int, action="append", dest="ids", help="a quarantine_id (repeatable)")
    parser.add_argument("--entity", action="append", help="only this entity (repeatable)")
    parser.add_argument("--list-quarantine", action="store_true", help="print the open quarantine rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from store_sync.crm.migrations import migrate
    from store_sync.tasks import crm_dsn

    dsn = crm_dsn()
    migrate(dsn)
    if args.retry_quarantine:
        result = retry_quarantine(dsn, args.ids, args.entity)
        print(f"retried {result['retried']}, resolved {result['resolved']}, still quarantined "
              f"{result['still_quarantined']}")
    elif not args.list_quarantine:
        for step in transform(dsn, args.entity):
            print(f"{step['step']}: {step['inbox_rows']} applied in {step['batches']} batches, "
                  f"{step['quarantined']} quarantined, {step['seconds']}s")
        run_checks(dsn)
    rows = open_quarantine(dsn)
    for qid, entity, key, inbox_id, held, attempts, step, reason in rows:
        shows = f"CRM shows inbox row {held}" if held else "not in the CRM"
        print(f"#{qid} {entity} {key} (inbox row {inbox_id}, {shows}, {attempts} attempts) {step}: {reason}")
    return 1 if rows and (args.retry_quarantine or args.list_quarantine) else 0


if __name__ == "__main__":
    sys.exit(main())
