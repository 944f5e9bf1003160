"""Change detection that loses nothing at the API's edges, one function per registry strategy.

``modified_window`` (orders, refunds, subscriptions, products)
    A window ``(cursor - overlap, T0)`` with ``T0`` frozen at the start of the cycle (now minus a few
    settle seconds), ``dates_are_gmt=true``, naive GMT timestamps, ``orderby=modified&order=asc``.
    Pages are read keyset-style: each next request starts again at page 1 with
    ``modified_after = (last second seen - 1 s)``, so records modified while we page (which leave the
    window, to be caught next cycle) cannot shift an unread record onto a page we already read. A
    page that holds a single second is drained by page number within that second. Trash is read as a
    second pass (``status=any`` hides it). Every page lands in its own transaction; the last one also
    moves the watermark to ``T0``; progress is kept so a killed run resumes where it stopped.
``id_scan`` (customers, which have no date filter)
    New customers by descending id down to the highest id seen; customers of freshly landed orders by
    ``include=``; every few minutes a cheap ``_fields=id,date_modified_gmt`` scan finds the rest
    (and the deleted).
``snapshot`` (lookups and the category tree)
    Read everything, land what changed, land a delete event for what disappeared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg

from store_sync.client import StoreClient
from store_sync.landing import (
    PageResult,
    RunRecord,
    already_landed,
    get_watermark,
    land_page,
    parse_gmt,
    set_watermark,
)
from store_sync.registry import Entity

log = logging.getLogger(__name__)
GMT = "%Y-%m-%dT%H:%M:%S"
SECOND = timedelta(seconds=1)


def fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(GMT)


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Progress:
    """Logs pages done of total, records/s and time left, at most every few seconds."""

    def __init__(self, entity: str, total: int | None = None):
        self.entity, self.total, self.started, self.records, self.pages, self.last = entity, total, time.monotonic(), 0, 0, 0.0

    def page(self, n: int, total_pages: int | None = None) -> None:
        self.pages += 1
        self.records += n
        now = time.monotonic()
        if now - self.last < 5 and (total_pages is None or self.pages < total_pages):
            return
        self.last = now
        rate = self.records / max(now - self.started, 1e-6)
        left = f", about {(self.total - self.records) / rate:.0f}s left" if self.total and rate else ""
        of = f" of ~{total_pages}" if total_pages else ""
        log.info("%s: %d pages%s, %d records, %.0f records/s%s", self.entity, self.pages, of, self.records, rate, left)


def sync_entity(dsn: str, client: StoreClient, entity: Entity, run_id: str, *, mode: str = "live",
                since: datetime | None = None, until: datetime | None = None, ids: list[int] | None = None) -> dict:
    """One cycle (or one backfill chunk) for one entity; returns the run record's counts."""
    retries_before = client.stats.retries
    run = RunRecord(dsn, run_id, entity.name, mode, since, until)
    try:
        if ids:
            window_to = fetch_by_ids(dsn, client, entity, run, ids)
        elif entity.strategy == "modified_window":
            window_to = modified_window(dsn, client, entity, run, mode=mode, since=since, until=until)
        elif entity.strategy == "id_scan":
            window_to = id_scan(dsn, client, entity, run, full=mode != "live")
        elif entity.strategy == "snapshot":
            window_to = snapshot(dsn, client, entity, run)
        elif entity.strategy == "children":
            window_to = now_utc()  # landed with their parents (the parent entity's `children`)
        else:
            raise ValueError(f"{entity.name}: unknown strategy {entity.strategy!r}")
    except Exception as exc:
        run.finish("failed", client.stats.retries - retries_before, f"{type(exc).__name__}: {exc}"[:2000])
        raise
    return run.finish("success", client.stats.retries - retries_before, window_to=window_to)


# -- modified_window ---------------------------------------------------------------------------------
def modified_window(dsn: str, client: StoreClient, entity: Entity, run: RunRecord, *, mode: str,
                    since: datetime | None, until: datetime | None) -> datetime:
    live = mode == "live"
    # Backfills keep their place in a row of their own: the live cursor is never theirs to move.
    mark = entity.name if live else f"{entity.name}@backfill"
    state_key = "progress" if live else f"run:{run.run_id}"
    with psycopg.connect(dsn) as conn:
        cursor, state = get_watermark(conn, mark)
    progress = state.get(state_key) or {}
    if progress.get("t0"):  # a killed run left its place: resume with the same frozen window
        t0 = parse_gmt(progress["t0"])
        start_status = progress.get("status_index", 0)
        resume_lo = parse_gmt(progress.get("lo"))
    else:
        t0 = until or (now_utc() - timedelta(seconds=entity.settle_seconds))
        start_status, resume_lo = 0, None
    if live:
        lo = cursor - timedelta(seconds=entity.overlap_seconds) if cursor else None
    else:
        lo = since
    statuses = list(entity.statuses)
    # autocommit: each page's `transaction()` must commit on its own, whatever ran between them.
    with psycopg.connect(dsn, autocommit=True) as conn:
        for index in range(start_status, len(statuses)):
            status = statuses[index]
            first_lo = resume_lo if (index == start_status and resume_lo) else lo
            last_status = index == len(statuses) - 1
            # The next page is fetched while this one lands: reading and writing overlap.
            for page, next_lo, final in prefetched(keyset_pages(client, entity, status, first_lo, t0)):
                # Children only for parents that changed, not for those the overlap re-reads.
                fresh = page
                if entity.children:
                    known = already_landed(conn, entity, page)
                    fresh = [r for r in page if str(r.get(entity.key)) not in known]
                children = fetch_children(client, entity, fresh, live_cycle=live and cursor is not None)
                with conn.transaction():
                    run.add(land_page(conn, entity, page, run.run_id))
                    for child, prefix, records in children:
                        run.add(land_page(conn, child, records, run.run_id, key_prefix=prefix))
                    done = final and last_status
                    new_progress = None if done else {"t0": fmt(t0), "status_index": index + (1 if final else 0),
                                                      "lo": fmt(next_lo) if (next_lo and not final) else None}
                    set_watermark(conn, mark, t0 if (done and live) else None, run.run_id, {state_key: new_progress})
    return t0


def prefetched(pages: Iterator, depth: int = 1) -> Iterator:
    """Run a page generator one step ahead in a thread; errors surface in order, at the consumer."""
    import queue
    import threading

    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in pages:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as exc:  # handed to the consumer, raised there
            box.put((None, exc))

    worker = threading.Thread(target=produce, name="page-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = box.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()


def fetch_children(client: StoreClient, entity: Entity, page: list[dict], live_cycle: bool) -> list[tuple]:
    """Records that live under the page's records (variations, order notes): (entity, key prefix, records).

    ``live_only`` children (one request per parent) are read in live cycles after the first load only:
    a first load or a backfill of every order's notes would cost the store one request per order."""
    from store_sync.registry import entity as registry_entity

    out = []
    for spec in entity.children:
        if spec.get("live_only") and not live_cycle:
            continue
        child = registry_entity(spec["entity"])
        for parent in page:
            if any(parent.get(k) != v for k, v in (spec.get("when") or {}).items()) or parent.get("status") == "trash":
                continue
            endpoint = spec["endpoint"].format(id=parent[entity.key])
            records = (list(client.iter_records(endpoint, {}, entity.per_page)) if spec.get("paged")
                       else client.get(endpoint))
            prefix = "" if child.name == entity.name else f"{parent[entity.key]}:"
            out.append((child, prefix, records))
    return out


def keyset_pages(client: StoreClient, entity: Entity, status: str | None, lo: datetime | None,
                 t0: datetime) -> Iterator[tuple[list[dict], datetime | None, bool]]:
    """Yield (records, the lower bound to resume from, is_last) for the window (lo, t0)."""
    base = {**entity.params, "modified_before": fmt(t0)}
    if status:
        base["status"] = status
    progress = Progress(entity.name)
    while True:
        params = {**base, **({"modified_after": fmt(lo)} if lo else {})}
        page = client.get_page(entity.endpoint, params, 1, entity.per_page)
        progress.page(len(page.records), page.total_pages)
        if len(page.records) < entity.per_page:
            yield page.records, lo, True
            return
        # A record modified while we read shows its new time, past t0: it must not move the keyset
        # (it would skip everything between); it lands now and again in the next window.
        seconds = [m for m in (parse_gmt(r.get(entity.cursor)) for r in page.records) if m and m < t0]
        if not seconds:
            yield page.records, lo, False
            continue  # every record on the page left the window: the same query now returns the rest
        top = max(seconds)
        next_lo = top - SECOND
        if lo is not None and next_lo <= lo:
            # The whole page is one second: drain that second by page number, then move past it.
            yield page.records, lo, False
            inside = {**base, "modified_after": fmt(top - SECOND), "modified_before": fmt(min(top + SECOND, t0))}
            number = 2
            while True:
                more = client.get_page(entity.endpoint, inside, number, entity.per_page)
                if not more.records:
                    break
                yield more.records, lo, False
                if number >= more.total_pages:
                    break
                number += 1
            lo = top
            continue
        yield page.records, next_lo, False
        lo = next_lo


# -- by ids (on demand, customers from orders) ---------------------------------------------------------
def fetch_by_ids(dsn: str, client: StoreClient, entity: Entity, run: RunRecord, ids: list[int]) -> datetime:
    wanted = sorted({int(i) for i in ids})
    for start in range(0, len(wanted), 100):
        chunk = wanted[start:start + 100]
        params = {"include": ",".join(map(str, chunk)), **({"role": "all"} if entity.name == "customers" else {})}
        if entity.statuses != (None,):
            params["status"] = "any"
        records = client.get_page(entity.endpoint, params, 1, 100).records
        gone = set(chunk) - {int(r[entity.key]) for r in records}
        if entity.statuses != (None,) and gone:  # trashed ones are not in "any"
            trashed = client.get_page(entity.endpoint, {**params, "status": "trash"}, 1, 100).records
            records += trashed
            gone -= {int(r[entity.key]) for r in trashed}
        with psycopg.connect(dsn) as conn, conn.transaction():
            run.add(land_page(conn, entity, records, run.run_id))
            if gone:
                run.add(land_deletes(conn, entity, gone, run.run_id))
    return now_utc()


def land_deletes(conn: psycopg.Connection, entity: Entity, keys, run_id: str) -> PageResult:
    """A record that left the store lands as a delete event (once: same payload, same hash)."""
    events = [{entity.key: int(k) if str(k).isdigit() else k, "deleted": True} for k in sorted(keys, key=str)]
    return land_page(conn, entity, events, run_id, deletes=True)


def landed_keys(conn: psycopg.Connection, entity: str) -> dict[str, datetime | None]:
    """The latest landed state per key that is not deleted: {source_key: source_modified_at}."""
    rows = conn.execute(
        "SELECT DISTINCT ON (source_key) source_key, source_modified_at, is_delete FROM inbox.record "
        "WHERE entity=%s ORDER BY source_key, received_at DESC, inbox_id DESC", (entity,)).fetchall()
    return {k: m for k, m, deleted in rows if not deleted}


# -- id_scan -----------------------------------------------------------------------------------------
def id_scan(dsn: str, client: StoreClient, entity: Entity, run: RunRecord, full: bool = False) -> datetime:
    started = now_utc()
    with psycopg.connect(dsn) as conn:
        _, state = get_watermark(conn, entity.name)
        max_id = int(state.get("max_id") or 0)
        orders_seen = int(state.get("orders_inbox_id") or 0)
        hooks_seen = int(state.get("webhook_event_id") or 0)
    # 1. new customers: highest ids first, down to what we know
    newest = max_id
    for page in client.iter_pages(entity.endpoint, {**entity.params, "order": "desc"}, entity.per_page):
        fresh = [r for r in page.records if int(r[entity.key]) > max_id]
        if fresh:
            newest = max(newest, max(int(r[entity.key]) for r in fresh))
            with psycopg.connect(dsn) as conn, conn.transaction():
                run.add(land_page(conn, entity, fresh, run.run_id))
        if len(fresh) < len(page.records):
            break
    # 2. customers whose orders just landed (their profile often changes at checkout)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT max(inbox_id), array_agg(DISTINCT (payload->>'customer_id')::bigint) FILTER "
            "(WHERE (payload->>'customer_id')::bigint > 0) FROM inbox.record WHERE entity='orders' AND inbox_id > %s",
            (orders_seen,)).fetchone()
    if rows and rows[1]:
        fetch_by_ids(dsn, client, entity, run, rows[1])
    orders_seen = rows[0] if rows and rows[0] else orders_seen
    # 2b. customers the store told us about by webhook (created, updated, deleted)
    with psycopg.connect(dsn) as conn:
        hooks = conn.execute("SELECT max(event_id), array_agg(DISTINCT source_key::bigint) FROM sync.webhook_event "
                             "WHERE entity=%s AND event_id > %s", (entity.name, hooks_seen)).fetchone()
    if hooks and hooks[1]:
        fetch_by_ids(dsn, client, entity, run, hooks[1])
    hooks_seen = hooks[0] if hooks and hooks[0] else hooks_seen
    # 3. the cheap full scan: changed and deleted customers
    last_scan = parse_gmt(state.get("last_scan"))
    if full or last_scan is None or started - last_scan >= timedelta(minutes=entity.scan_every_minutes):
        store_view = {}
        for page in client.iter_pages(entity.endpoint, {**entity.params, "order": "asc",
                                                        "_fields": f"{entity.key},{entity.cursor}"}, entity.per_page):
            for r in page.records:
                store_view[str(r[entity.key])] = parse_gmt(r.get(entity.cursor))
        with psycopg.connect(dsn) as conn:
            known = landed_keys(conn, entity.name)
        changed = [int(k) for k, m in store_view.items() if k not in known or (m and known[k] != m)]
        if changed:
            fetch_by_ids(dsn, client, entity, run, changed)
        gone = set(known) - set(store_view)
        if gone:
            with psycopg.connect(dsn) as conn, conn.transaction():
                run.add(land_deletes(conn, entity, gone, run.run_id))
        last_scan = started
    with psycopg.connect(dsn) as conn, conn.transaction():
        set_watermark(conn, entity.name, started, run.run_id,
                      {"max_id": newest, "orders_inbox_id": orders_seen, "webhook_event_id": hooks_seen,
                       "last_scan": fmt(last_scan)})
    return started


# -- snapshot ----------------------------------------------------------------------------------------
def snapshot(dsn: str, client: StoreClient, entity: Entity, run: RunRecord) -> datetime:
    started = now_utc()
    if entity.paged:
        records = [r for page in client.iter_pages(entity.endpoint, {}, entity.per_page) for r in page.records]
    else:
        data = client.get(entity.endpoint)
        records = [{"code": k, "name": v} for k, v in data.items()] if entity.map_to_list else data
    for r in records:
        r.pop("_links", None)  # the store's own URLs change with the host, not with the data
    with psycopg.connect(dsn) as conn, conn.transaction():
        known = landed_keys(conn, entity.name)
        run.add(land_page(conn, entity, records, run.run_id))
        gone = set(known) - {str(r.get(entity.key)) for r in records}
        if gone:
            run.add(land_deletes(conn, entity, gone, run.run_id))
        set_watermark(conn, entity.name, started, run.run_id)
    return started


# -- hard deletes ------------------------------------------------------------------------------------
def reconcile_deletes(dsn: str, client: StoreClient, entity: Entity, run_id: str) -> dict:
    """Ids landed but no longer in the store at all (permanent deletes leave no trace): delete events."""
    run = RunRecord(dsn, run_id, entity.name, "reconcile")
    in_store: set[str] = set()
    for status in entity.statuses:
        params = {"_fields": "id", "orderby": "id", "order": "asc", **({"status": status} if status else {})}
        for page in client.iter_pages(entity.endpoint, params, entity.per_page):
            in_store.update(str(r["id"]) for r in page.records)
    with psycopg.connect(dsn) as conn, conn.transaction():
        # Records landed as children of their own entity (variations) are not in its list: not gone.
        children = {r[0] for r in conn.execute(
            "SELECT DISTINCT source_key FROM inbox.record WHERE entity=%s AND (payload->>'parent_id')::bigint > 0 "
            "AND payload->>'type' = 'variation'", (entity.name,))}
        gone = set(landed_keys(conn, entity.name)) - in_store - children
        if gone:
            run.add(land_deletes(conn, entity, gone, run_id))
    return run.finish("success", 0)
