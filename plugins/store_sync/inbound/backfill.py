"""Backfills: re-read a window (or a list of ids) in bounded chunks, beside live sync.

* The window ``[since, until)`` is cut into chunks of ``chunk_hours``; each chunk is a frozen window
  read keyset-style like live sync, landing idempotently (what is already there is skipped).
* Done chunks are remembered in ``sync.watermark`` (row ``<entity>@backfill``), so a killed backfill
  resumes at the first unfinished chunk; the live watermark is never touched.
* ``plan_backfill`` cuts the window into slices the DAG maps over (dynamic task mapping), so chunks run
  side by side on every worker; ``run_slice`` runs one. Chunks overlap by one second and the inbox skips
  an identical payload, so a record on a boundary lands once.
* Progress is logged after every chunk: records done of the expected total, records/s, time left.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

import psycopg

from store_sync.inbound.detect import fmt, now_utc, sync_entity
from store_sync.inbound.landing import get_watermark
from store_sync.registry import Entity
from store_sync.store.client import StoreClient

log = logging.getLogger(__name__)


def chunks(since: datetime, until: datetime, hours: int) -> list[tuple[datetime, datetime]]:
    out, step, start = [], timedelta(hours=hours), since
    while start < until:
        out.append((start, min(until, start + step)))
        start += step
    return out


# Airflow refuses to map more than [core] max_map_length (1024) task instances; past this many chunks,
# neighbouring chunks share a task (each still read, and remembered as done, on its own).
MAX_SLICES = 256


def plan_backfill(entity: Entity, *, since: datetime | None = None, until: datetime | None = None,
                  ids: list[int] | None = None, chunk_hours: int = 24) -> list[dict]:
    """The backfill cut into slices that can run side by side (one mapped task each, on any worker).

    A slice is JSON (it travels through XCom): ``{"entity", "label", "ids"}`` or ``{"entity", "label",
    "whole": true}`` or ``{"entity", "label", "windows": [[since, until], ...]}`` (ISO, UTC)."""
    if ids:
        return [{"entity": entity.name, "label": f"{len(ids)} ids", "ids": list(ids)}]
    if entity.strategy != "modified_window":
        # Lists without dates are re-read whole; that is a backfill too.
        return [{"entity": entity.name, "label": "whole list", "whole": True}]
    if since is None:
        raise ValueError(f"a backfill of {entity.name} needs 'since' (or 'ids')")
    until = until or (now_utc() - timedelta(seconds=entity.settle_seconds))
    if until <= since:
        raise ValueError(f"'until' ({until}) must be after 'since' ({since})")
    plan = chunks(since, until, chunk_hours)
    per_slice = -(-len(plan) // MAX_SLICES)
    slices = []
    for i in range(0, len(plan), per_slice):
        part = plan[i:i + per_slice]
        slices.append({"entity": entity.name, "label": f"{fmt(part[0][0])} → {fmt(part[-1][1])}",
                       "windows": [[lo.isoformat(), hi.isoformat()] for lo, hi in part]})
    return slices


def expected_records(client: StoreClient, entity: Entity, since: datetime, until: datetime) -> int:
    return sum(client.count(entity.endpoint, {"modified_after": fmt(since - timedelta(seconds=1)),
                                              "modified_before": fmt(until), "dates_are_gmt": "true",
                                              **({"status": s} if s else {})})
               for s in entity.statuses)


def _mark_done(dsn: str, mark: str, run_id: str, key: str) -> None:
    # Chunks finish side by side on different workers: append under the row's lock, never read-modify-write.
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO sync.watermark (entity, cursor_at, state, updated_at, run_id) "
            "VALUES (%(mark)s, NULL, jsonb_build_object(%(field)s::text, jsonb_build_array(%(key)s::text)), now(), %(run)s) "
            "ON CONFLICT (entity) DO UPDATE SET state = sync.watermark.state || jsonb_build_object(%(field)s::text, "
            "COALESCE(sync.watermark.state -> %(field)s::text, '[]'::jsonb) || jsonb_build_array(%(key)s::text)), "
            "updated_at = now(), run_id = EXCLUDED.run_id",
            {"mark": mark, "field": f"done:{run_id}", "key": key, "run": run_id})


def run_slice(dsn: str, client: StoreClient, entity: Entity, run_id: str, part: dict) -> dict:
    """One slice of a backfill plan: its chunks in order, each skipped when a try before finished it."""
    if part.get("ids"):
        return sync_entity(dsn, client, entity, f"{run_id}:ids", mode="backfill", ids=part["ids"])
    if part.get("whole"):
        return sync_entity(dsn, client, entity, run_id, mode="backfill")
    mark = f"{entity.name}@backfill"
    with psycopg.connect(dsn) as conn:
        _, state = get_watermark(conn, mark)
    done = set(state.get(f"done:{run_id}") or [])
    windows = [(datetime.fromisoformat(lo), datetime.fromisoformat(hi)) for lo, hi in part["windows"]]
    # A one-chunk slice's progress is its own landing log; counting would double its requests.
    expected = expected_records(client, entity, windows[0][0], windows[-1][1]) if len(windows) > 1 else 0
    totals = {"chunks": len(windows), "skipped_chunks": 0, "read": 0, "landed": 0, "skipped": 0, "quarantined": 0}
    started = time.monotonic()
    log.info("backfill %s %s: %d chunks%s", entity.name, part["label"], len(windows),
             f", about {expected} records" if expected else "")
    for n, (lo, hi) in enumerate(windows, 1):
        key = fmt(lo)
        if key in done:
            totals["skipped_chunks"] += 1
            continue
        # modified_after is strict: start one second early so a record stamped exactly at `lo` is read.
        # The overlap with the chunk before is landed once: an identical payload is skipped.
        counts = sync_entity(dsn, client, entity, f"{run_id}:{key}", mode="backfill",
                             since=lo - timedelta(seconds=1), until=hi)
        for k in ("read", "landed", "skipped", "quarantined"):
            totals[k] += counts[k]
        _mark_done(dsn, mark, run_id, key)
        elapsed = time.monotonic() - started
        rate = totals["read"] / elapsed if elapsed else 0.0
        left = (expected - totals["read"]) / rate if rate and expected > totals["read"] else 0.0
        log.info("backfill %s: chunk %d/%d done; %d of ~%d records, %.0f records/s, about %.0fs left",
                 entity.name, n, len(windows), totals["read"], expected, rate, left)
    return totals


def run_backfill(dsn: str, client: StoreClient, entity: Entity, run_id: str, *, since: datetime | None = None,
                 until: datetime | None = None, ids: list[int] | None = None, chunk_hours: int = 24) -> dict:
    """The whole plan in this process, slice after slice (what the DAG's mapped tasks do side by side)."""
    totals: dict = {}
    for part in plan_backfill(entity, since=since, until=until, ids=ids, chunk_hours=chunk_hours):
        for k, v in run_slice(dsn, client, entity, run_id, part).items():
            if isinstance(v, int | float):
                totals[k] = totals.get(k, 0) + v
    return totals
