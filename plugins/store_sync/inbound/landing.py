"""Landing: records into the inboxes, untouched, with COPY; the watermark moves in the same transaction.

* Each record is checked against its entity's JSON Schema, and for what PostgreSQL cannot hold (a key
  of the wrong type, a cursor date that is no date, NaN, a record too large or too deep); a failure goes
  to ``sync.quarantine`` with the reason and the raw body, and the rest of the page lands. NUL and lone
  surrogates (valid JSON, not valid PostgreSQL text) land as U+FFFD.
* Rows are COPYed into a temporary table; a record lands unless its payload equals the **latest**
  landed version of that record (``inbox.latest``), so a rerun or an overlapping window never doubles
  anything, while a revert (A → B → A) lands the second A.
* ``sync.landing_run`` keeps one row per (run, entity) with its counts, for people, not logs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from store_sync.registry import Entity

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_gmt(value: str | None) -> datetime | None:
    """The store's GMT string as UTC; None when missing or not a date (``land_page`` quarantines those)."""
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    except ValueError:  # "0000-00-00T00:00:00", "2026-02-30T…": the page must go on
        return None


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
    good: dict[str, tuple] = {}
    bad: list[tuple] = []
    for record in records:
        result.read += 1
        key = record.get(entity.key) if isinstance(record, dict) else None
        reason = None if deletes else entity.problem(record)
        if reason is None and key in (None, ""):
            reason = f"missing key field {entity.key!r}"
        if reason is None:
            reason, text, digest = content_problem(entity, record, key)
        if reason is not None:
            bad.append((entity.name, _key_text(key), _text(reason), raw_json(record), run_id))
            continue
        key = f"{key_prefix}{key}"
        modified = parse_gmt(record.get(entity.cursor)) if entity.cursor else None
        is_delete = deletes or record.get("status") == "trash"
        row = (entity.name, key, modified, is_delete, text, digest, run_id)
        before = good.get(key)
        # The same record twice on one page (a shifted page): keep its newest version, once.
        if before is None or (modified or _EPOCH) >= (before[2] or _EPOCH):
            good[key] = row
    if good:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS landing_page (entity text, source_key text, "
                     "source_modified_at timestamptz, is_delete boolean, payload jsonb, payload_hash text, "
                     "run_id text, inbox_id bigint DEFAULT nextval('inbox.record_inbox_id_seq')) "
                     # (uncompressed up to a page, as inbox.record keeps them: 0055)
                     "WITH (toast_tuple_target = 8160) ON COMMIT DELETE ROWS")
        conn.execute("TRUNCATE landing_page")
        with conn.cursor().copy("COPY landing_page (entity, source_key, source_modified_at, is_delete, payload, "
                                "payload_hash, run_id) FROM STDIN") as copy:
            for row in sorted(good.values(), key=lambda r: r[1]):
                copy.write_row(row)
        # Upsert the latest version first: the row lock makes a concurrent landing of the same payload
        # wait, then see it as already latest. Sorted keys keep two landings from deadlocking.
        cur = conn.execute(
            "WITH changed AS ("
            " INSERT INTO inbox.latest AS l (entity, source_key, payload_hash, inbox_id, is_delete, source_modified_at)"
            " SELECT entity, source_key, payload_hash, inbox_id, is_delete, source_modified_at FROM landing_page"
            " ORDER BY source_key"
            " ON CONFLICT (entity, source_key) DO UPDATE SET payload_hash = EXCLUDED.payload_hash,"
            " inbox_id = EXCLUDED.inbox_id, is_delete = EXCLUDED.is_delete,"
            " source_modified_at = EXCLUDED.source_modified_at WHERE l.payload_hash <> EXCLUDED.payload_hash"
            " RETURNING l.inbox_id)"
            "INSERT INTO inbox.record (inbox_id, entity, source_key, source_modified_at, is_delete, payload, "
            "payload_hash, run_id) SELECT p.inbox_id, p.entity, p.source_key, p.source_modified_at, p.is_delete, "
            "p.payload, p.payload_hash, p.run_id FROM landing_page p JOIN changed c ON c.inbox_id = p.inbox_id")
        result.landed = cur.rowcount
    result.skipped = result.read - result.landed - len(bad)
    if bad:
        with conn.cursor().copy("COPY sync.quarantine (entity, source_key, reason, raw, run_id) FROM STDIN") as copy:
            for row in bad:
                copy.write_row(row)
        result.quarantined = len(bad)
    return result


def fingerprint(record: dict, volatile: tuple[str, ...] = ()) -> tuple[str, str]:
    """(canonical JSON, its md5): what the inbox stores and how it tells versions apart.

    ``volatile`` (the registry's, per entity) are top-level fields the store changes on every read (a
    product's ``related_ids``, shuffled per read): kept in the stored JSON, left out of the md5, so
    re-reading an unchanged record is no new version.

    NUL and lone surrogates are valid JSON but PostgreSQL text cannot hold them: the stored JSON has
    U+FFFD in their place, while the md5 is of the record as it came (re-reads are still skipped)."""
    text = canonical(record)
    hashed = text
    if volatile and any(k in record for k in volatile):
        hashed = canonical({k: v for k, v in record.items() if k not in volatile})
    try:
        text.encode()
        clean = "\\u0000" not in text
    except UnicodeEncodeError:  # a lone surrogate
        clean = False
    data = hashed.encode("utf-8", "surrogatepass")  # the same bytes as .encode() for any other text
    if not clean:
        text = canonical(_scrub(record))
    return text, hashlib.md5(data).hexdigest()


# -- what PostgreSQL cannot hold ----------------------------------------------------------------------
MAX_PAYLOAD_CHARS = 16 * 1024 * 1024  # far above any real record (a large order is ~20 KB); bounds memory
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL, lone surrogates
_PREVIEW = reprlib.Repr()  # a bounded repr, for reasons and previews of what cannot be stored
_PREVIEW.maxlevel, _PREVIEW.maxdict, _PREVIEW.maxlist, _PREVIEW.maxstring, _PREVIEW.maxother = 8, 30, 30, 300, 300


def content_problem(entity: Entity, record: dict, key) -> tuple[str | None, str | None, str | None]:
    """(why the inbox cannot take ``record``, or None; its stored JSON; its hash) for a schema-valid record."""
    if isinstance(key, bool) or not isinstance(key, int | str):
        return f"key field {entity.key!r} is a {type(key).__name__}, not a string or an integer", None, None
    if isinstance(key, int) and key.bit_length() > 1000:
        return f"key field {entity.key!r} is an integer of {key.bit_length()} bits", None, None
    if isinstance(key, str) and _NOT_TEXT.search(key):
        return f"key field {entity.key!r} holds a NUL or a lone surrogate", None, None
    if entity.cursor:
        value = record.get(entity.cursor)
        if value not in (None, "") and parse_gmt(value) is None:
            return f"{entity.cursor} {_PREVIEW.repr(value)} is not a date", None, None
    try:
        text, digest = fingerprint(record, entity.volatile)
    except (ValueError, TypeError, RecursionError) as exc:  # an int past 4300 digits, nesting past the stack
        return f"cannot be written as JSON: {type(exc).__name__}: {str(exc)[:200]}", None, None
    if len(text) > MAX_PAYLOAD_CHARS:
        return f"record of {len(text):,} characters exceeds the landing limit of {MAX_PAYLOAD_CHARS:,}", None, None
    if ("NaN" in text or "Infinity" in text) and not _finite(record):
        return "holds NaN or Infinity (a number such as 1e400), which jsonb cannot", None, None
    return None, text, digest


def raw_json(record) -> str:
    """``record`` as ``sync.quarantine.raw`` (jsonb) can hold it; a preview when not even that."""
    try:
        text = json.dumps(_scrub(record, numbers=True), allow_nan=False)
        if len(text) <= MAX_PAYLOAD_CHARS:
            return text
    except (ValueError, TypeError, RecursionError):
        pass
    return json.dumps({"not_stored": True, "preview": _text(_PREVIEW.repr(record))})


def _key_text(key) -> str | None:
    if key is None or isinstance(key, str):
        return None if key is None else _text(key)[:200]
    if isinstance(key, int) and key.bit_length() <= 1000:
        return str(key)
    return _text(_PREVIEW.repr(key))[:200]


def _text(value: str) -> str:
    return _NOT_TEXT.sub("\ufffd", value)


def _scrub(value, numbers: bool = False):
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v, numbers) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, numbers) for v in value]
    if numbers and isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _finite(record) -> bool:
    try:
        json.dumps(record, allow_nan=False)
    except ValueError:
        return False
    return True


def already_landed(conn: psycopg.Connection, entity: Entity, records: list[dict]) -> set[str]:
    """Keys of the records whose exact payload is their latest landed version (re-read by an overlap)."""
    pairs = [(str(r.get(entity.key)), fingerprint(r, entity.volatile)[1]) for r in records if isinstance(r, dict)]
    if not pairs:
        return set()
    rows = conn.execute("SELECT source_key FROM inbox.latest WHERE entity = %s AND (source_key, payload_hash) IN "
                        "(SELECT * FROM unnest(%s::text[], %s::text[]))",
                        (entity.name, [k for k, _ in pairs], [h for _, h in pairs])).fetchall()
    return {r[0] for r in rows}


def landed_keys(conn: psycopg.Connection, entity: str, with_trash: bool = False) -> dict[str, datetime | None]:
    """The records whose latest landed version is live: {source_key: source_modified_at}.

    ``with_trash`` counts trashed records as present too (only a delete event makes a record gone):
    a record trashed, then deleted for good, must still be checked against the store."""
    if with_trash:
        rows = conn.execute(
            "SELECT l.source_key, l.source_modified_at FROM inbox.latest l JOIN inbox.record r ON r.inbox_id = l.inbox_id "
            "WHERE l.entity = %s AND NOT (l.is_delete AND r.payload ? 'deleted')", (entity,)).fetchall()
    else:
        rows = conn.execute("SELECT source_key, source_modified_at FROM inbox.latest WHERE entity = %s AND NOT is_delete",
                            (entity,)).fetchall()
    return dict(rows)


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
        self.children_due = 0  # parents left with children to read by the next cycles (modified_window)
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
