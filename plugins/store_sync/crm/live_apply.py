"""Apply a small live landing's rows to the CRM inside the landing task itself.

Handing the rows to the ``crm_transform`` DAG through the inbox Asset costs a second DAG run, two more
task processes and the scheduler's reaction to the event: 5-10 s on a 2-core machine
(``bench/freshness.py``). A live landing that brought at most ``live_apply_max_rows`` rows runs the
same transform (``crm.transform.transform`` with ``only_inbox_ids``: the same batches, quarantine and
newest-wins) for exactly those rows, step by step in the steps' dependency order.

* One writer at a time: every batch takes the transform's advisory lock (``BATCH_LOCK``). The landing
  waits for it at most ``lock_wait_seconds`` (``lock_timeout``); behind a long batch of ``crm_transform``
  it gives up and leaves the rest to that DAG, which applies it in its next loop or run.
* Never an older version over a newer one: both paths go through the same batch SQL, which drops a
  version older than the CRM's (``sync.prepare_batch``) whichever path runs first.
* Larger batches (a bulk edit, a catch-up) and whatever the landing could not apply are left to
  ``crm_transform`` (a watch task applies its first load itself: ``tasks.apply_first_load``);
  ``work_left`` tells the task whether to announce the inbox Asset.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger(__name__)


def inbox_position(dsn: str) -> int:
    """The highest inbox row id now: rows a landing writes afterwards all have larger ids (one sequence)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT coalesce(max(inbox_id), 0) FROM inbox.record").fetchone()[0]


def landed_rows(dsn: str, run_id: str, names: list[str], after: int) -> dict[int, str]:
    """{inbox id: entity} of the unapplied rows ``run_id`` wrote to ``names`` after position ``after``
    (a primary-key range)."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(
            "SELECT inbox_id, entity FROM inbox.record WHERE inbox_id > %s AND run_id = %s AND entity = ANY(%s) "
            "AND applied_at IS NULL ORDER BY inbox_id", (after, run_id, names)).fetchall())


def with_lock_timeout(dsn: str, seconds: float) -> str:
    params = conninfo_to_dict(dsn)
    options = " ".join(filter(None, [params.get("options"), f"-c lock_timeout={max(1, int(seconds * 1000))}"]))
    return make_conninfo(**{**params, "options": options})


def apply_rows(dsn: str, rows: dict[int, str], lock_wait_seconds: float) -> dict:
    """Run the transform steps of the rows' entities for ``rows`` in dependency order; stop at the first step
    that cannot run now (a transform holds the lock past the wait, or another failure): the rows left
    are ``crm_transform``'s. Returns ``{"applied": n, "quarantined": n, "stopped": reason or None}``."""
    from store_sync.crm.transform import TransformFailed, steps, transform

    out = {"applied": 0, "quarantined": 0, "stopped": None}
    if not rows:
        return out
    bounded, names, inbox_ids = with_lock_timeout(dsn, lock_wait_seconds), set(rows.values()), sorted(rows)
    for _sql_file, step_entities in steps():
        wanted = [n for n in step_entities if n in names]  # only the steps these rows need
        if not wanted:
            continue
        if transform_busy(dsn, lock_wait_seconds):
            out["stopped"] = f"a transform held the CRM's batch lock for over {lock_wait_seconds:g}s"
            log.info("%s; crm_transform applies the landed rows", out["stopped"])
            break
        try:
            for step in transform(bounded, wanted, only_inbox_ids=inbox_ids):
                out["applied"] += step["inbox_rows"]
                out["quarantined"] += step["quarantined"]
        except (TransformFailed, psycopg.Error) as exc:
            # The later steps need this one's rows (an order's notes need the order): all left to crm_transform.
            out["stopped"] = str(exc).strip().splitlines()[-1][:300]
            log.warning("applying the landed rows stopped (%s); crm_transform applies the rest", out["stopped"])
            break
    return out


def transform_busy(dsn: str, seconds: float) -> bool:
    """Whether another transform keeps the batch lock for ``seconds`` (asked without queueing for it);
    ``lock_timeout`` still bounds the wait if one takes it between this look and the batch."""
    import time

    from store_sync.crm.transform import BATCH_LOCK

    look = BATCH_LOCK.replace("pg_advisory_xact_lock", "pg_try_advisory_xact_lock")
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            with conn.transaction():  # taken and let go at once
                if conn.execute(look).fetchone()[0]:
                    return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.05)


def work_left(dsn: str, names: list[str]) -> bool:
    """Whether any inbox row of ``names`` waits for a transform (not applied, not quarantined)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT EXISTS (SELECT 1 FROM inbox.record r WHERE r.entity = ANY(%s) AND r.applied_at IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM sync.transform_quarantine q WHERE q.inbox_id = r.inbox_id "
            "AND q.resolved_at IS NULL))", (names,)).fetchone()[0]
