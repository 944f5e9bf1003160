"""Landing: records into the inboxes, untouched, with COPY; the watermark moves in the same transaction.

* Each record is checked against its entity's JSON Schema; a failure goes to ``sync.quarantine`` with
  the reason and the raw body, and the rest of the page lands.
* Rows are COPYed into a temporary table, then inserted with ``ON CONFLICT DO NOTHING`` on
  (entity, source_key, payload_hash): a payload identical to one already landed is skipped, so a
  rerun or an overlapping window never doubles anything.
* ``sync.landing_run`` keeps one row per (run, entity) with its counts, for people, not logs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from store_sync.registry import Entity


def canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_gmt(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


@dataclass
class PageResult:
    read: int = 0
    landed: int = 0
    skipped: int = 0
    quarantined: int = 0


def land_page(conn: psycopg.Connection, entity: Entity, records: Iterable[dict], run_id: str,
              deletes: bool = False, key_prefix: str = "") -> PageResult:
    """Land one page inside the caller's transaction."""
    result = PageResult()
    good: list[tuple] = []
    bad: list[tuple] = []
    seen: set[tuple[str, str]] = set()
    for record in records:
        result.read += 1
        key = record.get(entity.key) if isinstance(record, dict) else None
        reason = None if deletes else entity.problem(record)
        if reason is None and key in (None, ""):
            reason = f"missing key field {entity.key!r}"
        if reason is not None:
            bad.append((entity.name, None if key is None else str(key), reason, json.dumps(record), run_id))
            continue
        key = f"{key_prefix}{key}"
        text, digest = fingerprint(record)
        if (str(key), digest) in seen:
            continue  # the same payload twice on one page (a shifted page): once is enough
        seen.add((str(key), digest))
        modified = parse_gmt(record.get(entity.cursor)) if entity.cursor else None
        is_delete = deletes or record.get("status") == "trash"
        good.append((entity.name, str(key), modified, is_delete, text, digest, run_id))
    if good:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS landing_page (entity text, source_key text, "
                     "source_modified_at timestamptz, is_delete boolean, payload jsonb, payload_hash text, "
                     "run_id text) ON COMMIT DELETE ROWS")
        conn.execute("TRUNCATE landing_page")
        with conn.cursor().copy("COPY landing_page FROM STDIN") as copy:
            for row in good:
                copy.write_row(row)
        cur = conn.execute(
            "INSERT INTO inbox.record (entity, source_key, source_modified_at, is_delete, payload, payload_hash, run_id) "
            "SELECT entity, source_key, source_modified_at, is_delete, payload, payload_hash, run_id FROM landing_page "
            "ON CONFLICT ON CONSTRAINT inbox_record_once DO NOTHING")
        result.landed = cur.rowcount
        result.skipped = len(good) - cur.rowcount
        result.skipped += result.read - len(good) - len(bad)
    if bad:
        with conn.cursor().copy("COPY sync.quarantine (entity, source_key, reason, raw, run_id) FROM STDIN") as copy:
            for row in bad:
                copy.write_row(row)
        result.quarantined = len(bad)
    return result


def fingerprint(record: dict) -> tuple[str, str]:
    """(canonical JSON, its md5): what the inbox stores and how it tells versions apart."""
    text = canonical(record)
    return text, hashlib.md5(text.encode()).hexdigest()


def already_landed(conn: psycopg.Connection, entity: Entity, records: list[dict]) -> set[str]:
    """Keys of the records whose exact payload is already in the inbox (re-read by an overlap)."""
    pairs = [(str(r.get(entity.key)), fingerprint(r)[1]) for r in records if isinstance(r, dict)]
    if not pairs:
        return set()
    rows = conn.execute("SELECT source_key FROM inbox.record WHERE entity = %s AND (source_key, payload_hash) IN "
                        "(SELECT * FROM unnest(%s::text[], %s::text[]))",
                        (entity.name, [k for k, _ in pairs], [h for _, h in pairs])).fetchall()
    return {r[0] for r in rows}


def set_watermark(conn: psycopg.Connection, entity: str, cursor_at: datetime | None, run_id: str,
                  state: dict | None = None) -> None:
    conn.execute(
        "INSERT INTO sync.watermark (entity, cursor_at, state, updated_at, run_id) VALUES (%s, %s, %s, now(), %s) "
        "ON CONFLICT (entity) DO UPDATE SET cursor_at = COALESCE(EXCLUDED.cursor_at, sync.watermark.cursor_at), "
        "state = sync.watermark.state || EXCLUDED.state, updated_at = now(), run_id = EXCLUDED.run_id",
        (entity, cursor_at, json.dumps(state or {}), run_id))


def get_watermark(conn: psycopg.Connection, entity: str) -> tuple[datetime | None, dict]:
    row = conn.execute("SELECT cursor_at, state FROM sync.watermark WHERE entity=%s", (entity,)).fetchone()
    return (row[0], row[1]) if row else (None, {})


class RunRecord:
    """One ``sync.landing_run`` row, kept current as pages land (its own short transactions)."""

    def __init__(self, dsn: str, run_id: str, entity: str, mode: str, window_from=None, window_to=None):
        self.dsn, self.run_id, self.entity, self.mode = dsn, run_id, entity, mode
        self.totals = PageResult()
        self.pages = 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO sync.landing_run (run_id, entity, mode, window_from, window_to) VALUES (%s,%s,%s,%s,%s) "
                "ON CONFLICT (run_id, entity) DO UPDATE SET status='running', started_at=now(), finished_at=NULL, "
                "error=NULL, window_from=EXCLUDED.window_from, window_to=EXCLUDED.window_to, pages=0, records_read=0, "
                "landed=0, skipped=0, quarantined=0, retries=0",
                (run_id, entity, mode, window_from, window_to))

    def add(self, page: PageResult) -> None:
        self.pages += 1
        for name in ("read", "landed", "skipped", "quarantined"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(page, name))

    def finish(self, status: str = "success", retries: int = 0, error: str | None = None, window_to=None) -> dict:
        t = self.totals
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE sync.landing_run SET pages=%s, records_read=%s, landed=%s, skipped=%s, quarantined=%s, "
                "retries=%s, finished_at=now(), status=%s, error=%s, window_to=COALESCE(%s, window_to) "
                "WHERE run_id=%s AND entity=%s",
                (self.pages, t.read, t.landed, t.skipped, t.quarantined, retries, status, error, window_to,
                 self.run_id, self.entity))
        return {"entity": self.entity, "pages": self.pages, "read": t.read, "landed": t.landed, "skipped": t.skipped,
                "quarantined": t.quarantined, "retries": retries, "status": status}
