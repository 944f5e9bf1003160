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

import functools
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg

from store_sync.inbound.landing import (
    PageResult,
    RunRecord,
    already_landed,
    get_watermark,
    land_page,
    landed_keys,
    parse_gmt,
    set_watermark,
)
from store_sync.registry import Entity
from store_sync.store.client import StoreClient, StoreNotFound

log = logging.getLogger(__name__)
GMT = "%Y-%m-%dT%H:%M:%S"
SECOND = timedelta(seconds=1)


def key_of(record, entity: Entity) -> str | None:
    """A record's key as text, or None for what is no record (not an object, no key): landing quarantines those."""
    if not isinstance(record, dict) or record.get(entity.key) in (None, ""):
        return None
    return str(record[entity.key])


def int_key(record, entity: Entity) -> int | None:
    key = key_of(record, entity)
    return int(key) if key is not None and key.isdigit() else None


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
                since: datetime | None = None, until: datetime | None = None, ids: list[int] | None = None,
                on_landed=None) -> dict:
    """One cycle (or one backfill chunk) for one entity; returns the run record's counts.

    ``on_landed()``, when given, is called after each page of a ``modified_window`` entity has landed and
    before its children are read (the live landing applies the page's transform there)."""
    retries_before = client.stats.retries
    run = RunRecord(dsn, run_id, entity.name, mode, since, until)
    try:
        if ids:
            window_to = fetch_by_ids(dsn, client, entity, run, ids)
        elif entity.strategy == "modified_window":
            window_to = modified_window(dsn, client, entity, run, mode=mode, since=since, until=until,
                                        on_landed=on_landed)
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
    # children_due: parents whose children (order notes) wait for the next cycles' room
    return {**run.finish("success", client.stats.retries - retries_before, window_to=window_to),
            "children_due": run.children_due}


# -- modified_window ---------------------------------------------------------------------------------
def modified_window(dsn: str, client: StoreClient, entity: Entity, run: RunRecord, *, mode: str,
                    since: datetime | None, until: datetime | None, on_landed=None) -> datetime:
    live = mode == "live"
    # Backfills keep their place in a row of their own: the live cursor is never theirs to move.
    mark = entity.name if live else f"{entity.name}@{'first_load' if mode == 'first_load' else 'backfill'}"
    state_key = "progress" if live else f"run:{run.run_id}"
    with psycopg.connect(dsn) as conn:
        cursor, state = get_watermark(conn, mark)
    progress = state.get(state_key) or {}
    # Parents landed before their children were read (a page lands first when ``on_landed`` is given):
    # a run killed in between reads their children when it reads them again, though they are no longer new.
    due_key = "children_due" if live else f"children_due:{run.run_id}"
    due = set(state.get(due_key) or ())
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
    live_cycle = live and cursor is not None
    # A live cycle reads the children (order notes: one request per order) of at most children_per_cycle
    # parents; the others wait in children_due for the next cycles, so a backlog (every order changed while
    # a first load ran) never holds fresh changes back. Up to half of it goes to parents due before.
    cap = int(entity.children_per_cycle) if live_cycle and entity.children else None
    room = cap - min(len(due), cap // 2) if cap is not None else None
    read: set = set()  # parents whose children this cycle read
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
                # (live-only children, order notes, are not read on first loads and backfills: no need to look)
                if any(live_cycle or not c.get("live_only") for c in entity.children):
                    known = already_landed(conn, entity, page) - due
                    fresh = [r for r in page if key_of(r, entity) is not None and key_of(r, entity) not in known]
                later: set = set()
                if room is not None:
                    wanting = [r for r in fresh if wants_children(entity, r, live_cycle)]
                    fresh, later = wanting[:room], {key_of(r, entity) for r in wanting[room:]}
                    room -= len(fresh)
                fresh_keys = {key_of(r, entity) for r in fresh}
                # The page first, its children after (one request per parent): the parents reach the CRM sooner.
                first = bool(entity.children and on_landed)
                if first:
                    due |= fresh_keys | later
                    with conn.transaction():
                        run.add(land_page(conn, entity, page, run.run_id))
                        set_watermark(conn, mark, None, run.run_id, {due_key: sorted(due)})
                children_of = functools.partial(fetch_children, client, entity, fresh, live_cycle=live_cycle, conn=conn)
                if first:  # the children's reads overlap the parents' transform (the CRM on its own connections)
                    with ThreadPoolExecutor(1, thread_name_prefix="children") as reader:
                        reading = reader.submit(children_of)
                        on_landed()
                        children = reading.result()
                else:
                    children = children_of()
                with conn.transaction():
                    if not first:
                        run.add(land_page(conn, entity, page, run.run_id))
                    land_children(conn, run, children)
                    done = final and last_status
                    new_progress = None if done else {"t0": fmt(t0), "status_index": index + (1 if final else 0),
                                                      "lo": fmt(next_lo) if (next_lo and not final) else None}
                    # Without a cap, parents still due when the window is done were modified again: the next
                    # window reads them. With one, they wait for the next cycles' room.
                    due = set() if (done and cap is None) else (due | later) - fresh_keys
                    set_watermark(conn, mark, t0 if (done and live) else None, run.run_id,
                                  {state_key: new_progress, **({due_key: sorted(due) or None} if first or due else {})})
                read |= fresh_keys
                if on_landed and not first:
                    on_landed()
        if cap is not None and due - read:
            due = read_due_children(conn, client, entity, run, due, read, cap - len(read), mark, due_key)
    run.children_due = len(due)
    return t0


def wants_children(entity: Entity, record: dict, live_cycle: bool) -> bool:
    """Whether a live or backfill read of ``record`` reads children under it (notes, variations)."""
    return (isinstance(record, dict) and key_of(record, entity) is not None and record.get("status") != "trash"
            and any((live_cycle or not spec.get("live_only"))
                    and all(record.get(k) == v for k, v in (spec.get("when") or {}).items())
                    for spec in entity.children))


def land_children(conn: psycopg.Connection, run: RunRecord, children: list[tuple]) -> None:
    for child, prefix, records, gone in children:
        run.add(land_page(conn, child, records, run.run_id, key_prefix=prefix))
        if gone:
            run.add(land_deletes(conn, child, gone, run.run_id, key_prefix=prefix))


def read_due_children(conn: psycopg.Connection, client: StoreClient, entity: Entity, run: RunRecord, due: set,
                      read: set, room: int, mark: str, due_key: str) -> set:
    """The children of parents due from earlier cycles (landed, children not read yet), at most ``room``
    parents, lowest keys first, as their landed version says; returns the parents still due."""
    backlog = sorted(due - read, key=lambda k: (len(k), k))[:max(room, 0)]
    if not backlog:
        return due
    rows = conn.execute(
        "SELECT r.payload FROM inbox.latest l JOIN inbox.record r ON r.inbox_id = l.inbox_id "
        "WHERE l.entity = %s AND NOT l.is_delete AND l.source_key = ANY(%s)", (entity.name, backlog)).fetchall()
    # A parent gone from the inbox since (deleted) has no children left to read.
    children = fetch_children(client, entity, [r[0] for r in rows], live_cycle=True, conn=conn, skip_gone=True)
    with conn.transaction():
        land_children(conn, run, children)
        due = due - set(backlog)
        set_watermark(conn, mark, None, run.run_id, {due_key: sorted(due) or None})
    log.info("%s: read the children of %d parents due from earlier cycles; %d still due", entity.name,
             len(backlog), len(due))
    return due


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


def fetch_children(client: StoreClient, entity: Entity, page: list[dict], live_cycle: bool,
                   conn: psycopg.Connection, skip_gone: bool = False) -> list[tuple]:
    """Records that live under the page's records (variations, order notes): (entity, key prefix, records, gone).

    ``gone`` holds the children landed before that the parent's list no longer shows and that the store,
    asked one by one, says are deleted (a deleted note or variation leaves no other trace).
    ``live_only`` children (one request per parent) are read in live cycles after the first load only:
    a first load or a backfill of every order's notes would cost the store one request per order.
    A parent the store answers 404 for raises ``StoreNotFound``; with ``skip_gone`` it is left out."""
    from store_sync.registry import entity as registry_entity

    out = []
    for spec in entity.children:
        if spec.get("live_only") and not live_cycle:
            continue
        child = registry_entity(spec["entity"])
        parents = [p for p in page if key_of(p, entity) is not None and p.get("status") != "trash"
                   and not any(p.get(k) != v for k, v in (spec.get("when") or {}).items())]
        landed = landed_children(conn, child, entity, [str(p[entity.key]) for p in parents])
        for parent in parents:
            endpoint = spec["endpoint"].format(id=parent[entity.key])
            try:
                records = (list(client.iter_records(endpoint, {}, entity.per_page)) if spec.get("paged")
                           else client.get(endpoint))
            except StoreNotFound:
                if not skip_gone:  # (fetch on demand closes its request on this 404)
                    raise
                # a parent due from an earlier cycle, gone since: its delete is landed on its own
                log.warning("%s %s: gone from the store before its %s were read", entity.name, parent[entity.key],
                            child.name)
                continue
            prefix = "" if child.name == entity.name else f"{parent[entity.key]}:"
            before = landed.get(str(parent[entity.key]), set())
            listed = {str(r.get(child.key)) for r in records if isinstance(r, dict)}
            gone: set = set()
            if before - listed:
                try:
                    refuse_short_listing(f"{child.name} of {entity.name} {parent[entity.key]}", len(listed), len(before))
                    found, gone = confirm_deletes(client, child, before - listed,
                                                  lambda key, e=endpoint: f"{e}/{key}")
                    records = list(records) + found
                except ListingRefused as exc:
                    log.error("%s", exc)
            out.append((child, prefix, records, gone))
    return out


def landed_children(conn: psycopg.Connection, child: Entity, parent: Entity, parents: list[str]) -> dict[str, set]:
    """{parent key: the keys (without prefix) of its live landed children}."""
    if not parents:
        return {}
    if child.name == parent.name:  # variations: their product is in the payload
        rows = conn.execute(
            "SELECT r.payload->>'parent_id', l.source_key FROM inbox.latest l JOIN inbox.record r ON r.inbox_id = l.inbox_id "
            "WHERE l.entity = %s AND NOT l.is_delete AND r.payload->>'parent_id' = ANY(%s)", (child.name, parents))
    else:  # keys are "<parent>:<child>"
        rows = conn.execute(
            "SELECT split_part(source_key, ':', 1), split_part(source_key, ':', 2) FROM inbox.latest "
            "WHERE entity = %s AND NOT is_delete AND split_part(source_key, ':', 1) = ANY(%s)", (child.name, parents))
    out: dict[str, set] = {}
    for parent_key, key in rows:
        out.setdefault(parent_key, set()).add(key)
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
        page = first_page(client, entity, params)
        progress.page(len(page.records), page.total_pages)
        if len(page.records) < entity.per_page:
            yield page.records, lo, True
            return
        # A record modified while we read shows its new time, past t0: it must not move the keyset
        # (it would skip everything between); it lands now and again in the next window.
        seconds = [m for m in (parse_gmt(r.get(entity.cursor)) for r in page.records if isinstance(r, dict))
                   if m and m < t0]
        if not seconds:
            yield page.records, lo, False
            continue  # every record on the page left the window: the same query now returns the rest
        top = max(seconds)
        next_lo = top - SECOND
        floor = fold_floor(client, entity, page.records)
        if floor is not None and floor <= next_lo:
            # The page ends in the hour a clock goes back: the store sorts on local time, which that hour
            # shows twice, so a record not read yet may be up to an hour earlier in GMT than the page's
            # newest. Read (floor, top] by id (complete whatever the sort), then go on after top.
            log.info("%s: a page ends in a clock's fall-back hour (%s local); reading %sZ to %sZ by id",
                     entity.name, floor, fmt(floor), fmt(top))
            yield page.records, lo, False
            known = {key_of(r, entity) for r in page.records} - {None}
            after = max(floor - SECOND, lo) if lo is not None else floor - SECOND
            for records in drain_second(client, entity, base, top, t0, known, after=after):
                yield records, lo, False
            lo = top
            continue
        if lo is not None and next_lo <= lo:
            # The whole page is one second: read that second completely, then move past it.
            yield page.records, lo, False
            known = {key_of(r, entity) for r in page.records} - {None}
            for records in drain_second(client, entity, base, top, t0, known):
                yield records, lo, False
            lo = top
            continue
        yield page.records, next_lo, False
        lo = next_lo


class StoreInconsistent(Exception):
    """The store's answers did not settle: the window is not complete and the watermark must not move."""


def first_page(client: StoreClient, entity: Entity, params: dict, tries: int = 3):
    """One page; a short page whose X-WP-Total says more records match (a transient ``200 []``, a
    stale cache) would end a window early and lose the rest, so it is asked again."""
    for _ in range(tries):
        page = client.get_page(entity.endpoint, params, 1, entity.per_page)
        short = len(page.records) < entity.per_page
        if not short or page.total is None or page.total - int(params.get("offset", 0)) <= len(page.records):
            return page
        log.warning("%s: a page of %d records where the store counts %d: asking again", entity.name,
                    len(page.records), page.total)
    raise StoreInconsistent(f"{entity.name}: the store keeps answering short pages that contradict its own "
                            "X-WP-Total; the window stays open and is read again next cycle")


def fold_floor(client: StoreClient, entity: Entity, records: list[dict]) -> datetime | None:
    """When the newest local time of a page sorted by ``orderby=modified`` (WordPress sorts on the local
    ``post_modified``: WP_Query::parse_orderby in wp-includes/class-wp-query.php) is one the site's clock
    shows twice, the GMT of its first showing: the earliest a record after the page can have. None
    otherwise, and for entities whose records carry no local time.

    The site's timezone comes from WordPress's REST index; without it, a page whose records hold two UTC
    offsets (local minus GMT) is taken for a fold, floored by the larger offset."""
    local_field = entity.cursor.removesuffix("_gmt") if entity.cursor else None
    pairs = []
    for r in records:
        try:
            pairs.append((datetime.fromisoformat(r[local_field]), datetime.fromisoformat(r[entity.cursor])))
        except (KeyError, TypeError, ValueError):
            continue
    if not pairs or local_field == entity.cursor:
        return None
    last = max(local for local, _ in pairs).replace(tzinfo=None)
    zone = client.site_timezone()
    if zone is None:
        offsets = {local.replace(tzinfo=None) - gmt.replace(tzinfo=None) for local, gmt in pairs}
        return (last - max(offsets)).replace(tzinfo=UTC) if len(offsets) > 1 else None
    first, second = (last.replace(tzinfo=zone, fold=f).astimezone(UTC) for f in (0, 1))
    return first if first != second else None


def drain_second(client: StoreClient, entity: Entity, base: dict, second: datetime, t0: datetime,
                 known: set[str], max_backoffs: int = 200, after: datetime | None = None) -> Iterator[list[dict]]:
    """Every record modified in one second, when more share it than fit on a page (a bulk edit, an import);
    with ``after``, every record modified after it up to that second (a clock's fall-back hour).

    The store sorts `modified` ties in no stable order (WordPress WP_Query::parse_orderby adds no id
    tie-break; only `orderby=date` gets one, in WC_REST_CRUD_Controller::prepare_objects_query), so
    this second is read by `orderby=id`, which is unique, as a keyset emulated with `offset`: each read
    overlaps the previous one by a margin and must start at or below the highest id read so far. A
    record edited meanwhile leaves the second (its modified time moves forward, into a later window)
    and shifts the ids behind it down; records cannot enter a past second. So positions only fall:
    a read that still overlaps leaves no gap, and one that does not is repeated from lower down.
    Yields the records not yet seen (``known``: already read from the page that led here)."""
    params = {**base, "orderby": "id", "order": "asc", "modified_after": fmt(second - SECOND if after is None else after),
              "modified_before": fmt(min(second + SECOND, t0))}
    size = entity.per_page
    step = size - max(1, size // 4)
    seen = set(known)
    offset, highest, backoffs = 0, None, 0
    while True:
        records = first_page(client, entity, {**params, "offset": offset}).records
        ids = [i for i in (int_key(r, entity) for r in records) if i is not None]
        if highest is not None and offset > 0 and (not ids or ids[0] > highest):
            # More records before this offset left the second than the overlap covers: step back.
            backoffs += 1
            if backoffs > max_backoffs:
                raise StoreInconsistent(f"{entity.name}: the records of {fmt(second)}Z kept moving; the window stays "
                                        "open and is read again next cycle")
            offset = max(0, offset - step)
            continue
        fresh = [r for r in records if key_of(r, entity) not in seen]
        seen.update(key_of(r, entity) for r in fresh)
        if fresh:
            yield fresh
        if len(records) < size:
            return
        highest = max([highest or 0, *ids])
        offset += step


# -- by ids (on demand, customers from orders) ---------------------------------------------------------
def fetch_by_ids(dsn: str, client: StoreClient, entity: Entity, run: RunRecord, ids: list[int]) -> datetime:
    wanted = sorted({int(i) for i in ids})
    for start in range(0, len(wanted), 100):
        chunk = wanted[start:start + 100]
        params = {"include": ",".join(map(str, chunk)), **({"role": "all"} if entity.name == "customers" else {})}
        if entity.statuses != (None,):
            params["status"] = "any"
        records = client.get_page(entity.endpoint, params, 1, 100).records
        gone = set(chunk) - {int_key(r, entity) for r in records}
        if entity.statuses != (None,) and gone:  # trashed ones are not in "any"
            trashed = client.get_page(entity.endpoint, {**params, "status": "trash"}, 1, 100).records
            records += trashed
            gone -= {int_key(r, entity) for r in trashed}
        # Absent from a listing is not deleted (a transient empty page, a proxy): ask for each one.
        found, gone = confirm_deletes(client, entity, gone, lambda key: f"{entity.endpoint}/{key}")
        with psycopg.connect(dsn) as conn, conn.transaction():
            run.add(land_page(conn, entity, records + found, run.run_id))
            if gone:
                run.add(land_deletes(conn, entity, gone, run.run_id))
    return now_utc()


def land_deletes(conn: psycopg.Connection, entity: Entity, keys, run_id: str, key_prefix: str = "") -> PageResult:
    """Records the store said are gone land as delete events (once: the same event twice is skipped)."""
    events = [{entity.key: int(k) if str(k).isdigit() else k, "deleted": True} for k in sorted(keys, key=str)]
    return land_page(conn, entity, events, run_id, deletes=True, key_prefix=key_prefix)


# -- deletes, only on the store's word ------------------------------------------------------------
class ListingRefused(Exception):
    """A listing came back far shorter than what has landed: taken as broken, not as mass deletes."""


def refuse_short_listing(what: str, listed: int, landed: int) -> None:
    """Page-number listings race with trashing and creating, a proxy may strip X-WP-TotalPages and a
    store may answer a transient ``200 []``: a listing with under half the records landed is refused."""
    if landed >= 10 and listed < landed / 2:
        raise ListingRefused(f"{what}: the store listed {listed} records where {landed} have landed; a listing "
                             "that short is taken as broken (a proxy, a transient empty page), not as deletes")


def confirm_deletes(client: StoreClient, entity: Entity, candidates, path, limit: int = 500) -> tuple[list[dict], set]:
    """Ask the store for each record a listing no longer shows: ``(records that answered, keys it says are gone)``.

    Only a direct ``GET`` answering 404 is the store's word that a record is gone (a trashed record
    still answers, with status trash); a record that answers lands again, which heals a false delete.
    At most ``limit`` requests per call: the rest wait for the next pass."""
    found, gone = [], set()
    pending = sorted(candidates, key=str)
    if len(pending) > limit:
        log.warning("%s: %d possible deletes, checking %d now and the rest next pass", entity.name, len(pending), limit)
    for key in pending[:limit]:
        try:
            record = client.get(path(key))
        except StoreNotFound as exc:
            if exc.code == "rest_no_route":  # the route, not the record, is missing: no conclusion
                raise
            gone.add(key)
            continue
        if isinstance(record, dict) and record.get(entity.key) not in (None, ""):
            found.append(record)
    return found, gone


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
        # What has no usable id lands too, so that landing quarantines it with its reason.
        fresh = [r for r in page.records if (int_key(r, entity) or max_id + 1) > max_id]
        if fresh:
            newest = max(newest, max(int_key(r, entity) or 0 for r in fresh))
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
    # 3. the rolling scan: changed and deleted customers, a slice per cycle (see rolling_scan)
    scan = {k: state.get(k) for k in ("scan_offset", "scan_last_id", "scan_pass_started", "scan_next_at",
                                      "last_scan", "scan_pass_requests")}
    if full or scan_due(scan, entity, started):
        scan = rolling_scan(dsn, client, entity, run, scan, started, whole_pass=full)
    with psycopg.connect(dsn) as conn, conn.transaction():
        set_watermark(conn, entity.name, started, run.run_id,
                      {"max_id": newest, "orders_inbox_id": orders_seen, "webhook_event_id": hooks_seen, **scan})
    return started


SCAN_OVERLAP = 10  # records re-read at each slice's start: deletes below the position shift the offsets


def scan_due(state: dict, entity: Entity, now: datetime) -> bool:
    """The next scan slice is due (``scan_next_at``; state from before the rolling scan: ``last_scan``)."""
    next_at = parse_gmt(state.get("scan_next_at"))
    if next_at is None and (last := parse_gmt(state.get("last_scan"))) is not None:
        next_at = last + timedelta(minutes=float(entity.scan_every_minutes))
    return next_at is None or next_at <= now


def rolling_scan(dsn: str, client: StoreClient, entity: Entity, run: RunRecord, scan: dict, started: datetime,
                 whole_pass: bool = False) -> dict:
    """One slice of the ``(id, date_modified_gmt)`` scan, continuing from where the last one stopped.

    Customers have no date filter, so only a scan finds a change no webhook or order told us about. At
    a million customers a whole pass is 10k requests: instead each cycle reads at most
    ``scan_pages_per_cycle`` pages by ascending id from a durable offset, and the next slice is due
    once the requests this one spent, at ``scan_share`` (10 %) of the live budget's rate, are paid
    for: the scan averages at most a tenth of the store's budget, and a pass takes as long as it must
    (logged at each pass's end). A small store is still read whole, at most every
    ``scan_every_minutes``. Ids only go up and a slice starts ``SCAN_OVERLAP`` records back and
    checks it overlaps what it read before (stepping back when more were deleted below), so every
    customer is read in each pass; a landed customer missing from a slice's id range is only a
    candidate, asked for by id, and only a 404 deletes it."""
    requests_before = client.stats.requests
    offset = 0 if whole_pass else int(scan.get("scan_offset") or 0)
    last_id = 0 if whole_pass else int(scan.get("scan_last_id") or 0)
    pass_started = scan.get("scan_pass_started") if offset else fmt(started)
    max_pages = 10**9 if whole_pass else max(1, int(entity.scan_pages_per_cycle))
    fields = {**entity.params, "orderby": "id", "order": "asc", "_fields": f"{entity.key},{entity.cursor}"}
    view: dict[str, datetime | None] = {}
    overlap = min(SCAN_OVERLAP, entity.per_page // 2)
    start, pages, ended, total, anchored, asked = max(0, offset - overlap), 0, False, None, not offset, 0
    while pages < max_pages:
        page = client.get_page(entity.endpoint, {**fields, "offset": start}, 1, entity.per_page)
        pages += 1
        total = page.total if page.total is not None else total
        ids = [i for i in (int_key(r, entity) for r in page.records) if i is not None]
        if not anchored and start and ids and min(ids) > last_id:
            start = max(0, start - entity.per_page)  # more deleted below than the overlap: never skip a record
            continue
        anchored = True
        if len(page.records) < entity.per_page and total is not None and start + len(page.records) < total \
                and asked < 2:
            asked += 1  # a short page the store's own X-WP-Total contradicts (a transient 200 []): ask again
            continue
        asked = 0
        for r in page.records:
            if (key := key_of(r, entity)) is not None and key.isdigit():
                view[key] = parse_gmt(r.get(entity.cursor))
        if len(page.records) < entity.per_page:
            ended = True
            break
        start += len(page.records)
        last_id = max([last_id, *ids])
    lo = 0 if not offset or whole_pass else int(scan.get("scan_last_id") or 0)
    hi = None if ended else last_id
    with psycopg.connect(dsn) as conn:
        known = landed_in_range(conn, entity.name, lo, hi)
    view = {k: m for k, m in view.items() if int(k) > lo and (hi is None or int(k) <= hi)}
    changed = [int(k) for k, m in view.items() if (k not in known or (m and known[k] != m))]
    if changed:
        fetch_by_ids(dsn, client, entity, run, changed)
    apply_confirmed_deletes(dsn, client, entity, run, set(known) - set(view), listed=len(view), landed=len(known),
                            path=lambda key: f"{entity.endpoint}/{key}", fail=False)
    spent = client.stats.requests - requests_before
    pass_requests = int(scan.get("scan_pass_requests") or 0) + spent
    rate = max(0.01, float(getattr(client.budget, "max_rate", 5)) * float(entity.scan_share))
    next_at = started + timedelta(seconds=spent / rate)
    if ended:
        began = parse_gmt(pass_started) or started
        log.info("%s: scan pass over %s customers done in %s (%d requests, %.0f%% of the live budget's rate); "
                 "at this size a pass takes about %.0f minutes", entity.name, total if total is not None else "?",
                 now_utc() - began, pass_requests, entity.scan_share * 100, pass_requests / rate / 60)
        # a small store is read whole at most every scan_every_minutes, as before
        next_at = max(next_at, began + timedelta(minutes=entity.scan_every_minutes))
        offset, last_id, pass_requests = 0, 0, 0
    else:
        offset = start
        log.info("%s: scan slice %d pages up to id %d (offset %d of %s); next slice after %s", entity.name, pages,
                 last_id, offset, total if total is not None else "?", fmt(next_at))
    return {"scan_offset": offset, "scan_last_id": last_id, "scan_pass_started": pass_started if offset else None,
            "scan_next_at": fmt(next_at), "last_scan": fmt(started), "scan_pass_requests": pass_requests}


def landed_in_range(conn: psycopg.Connection, entity: str, lo: int, hi: int | None) -> dict[str, datetime | None]:
    """Landed, live records with a numeric key in ``(lo, hi]`` (``hi`` None: no upper end)."""
    rows = conn.execute(
        "SELECT source_key, source_modified_at FROM inbox.latest WHERE entity = %s AND NOT is_delete "
        "AND source_key ~ '^[0-9]{1,18}$' AND source_key::bigint > %s AND (%s::bigint IS NULL OR source_key::bigint <= %s)",
        (entity, lo, hi, hi)).fetchall()
    return dict(rows)


# -- snapshot ----------------------------------------------------------------------------------------
def snapshot(dsn: str, client: StoreClient, entity: Entity, run: RunRecord) -> datetime:
    started = now_utc()
    if entity.paged:
        records = [r for page in client.iter_pages(entity.endpoint, {}, entity.per_page) for r in page.records]
    else:
        data = client.get(entity.endpoint)
        records = [{"code": k, "name": v} for k, v in data.items()] if entity.map_to_list else data
    for r in records:
        if isinstance(r, dict):
            r.pop("_links", None)  # the store's own URLs change with the host, not with the data
    with psycopg.connect(dsn) as conn, conn.transaction():
        known = landed_keys(conn, entity.name)
        run.add(land_page(conn, entity, records, run.run_id))
    gone = set(known) - {str(r.get(entity.key)) for r in records if isinstance(r, dict)}
    # Paged lists (the category tree) have a record per id to ask; code lists only have the whole list.
    path = (lambda key: f"{entity.endpoint}/{key}") if entity.paged else None
    apply_confirmed_deletes(dsn, client, entity, run, gone, listed=len(records), landed=len(known), path=path,
                            fail=False)
    with psycopg.connect(dsn) as conn, conn.transaction():
        set_watermark(conn, entity.name, started, run.run_id)
    return started


# -- hard deletes ------------------------------------------------------------------------------------
def apply_confirmed_deletes(dsn: str, client: StoreClient, entity: Entity, run: RunRecord, candidates: set,
                            *, listed: int, landed: int, path, fail: bool = True, key_prefix: str = "") -> int:
    """Land delete events for the candidates the store confirms gone, and again the records that answer.

    A short listing is refused: with ``fail`` the refusal raises (a reconciliation task shows it
    failed), otherwise it is logged and the live cycle goes on. ``path=None`` (code lists, which have
    no per-record route) trusts a listing that passed the length check."""
    if not candidates:
        return 0
    try:
        refuse_short_listing(f"{entity.name}{f' {key_prefix}' if key_prefix else ''}", listed, landed)
    except ListingRefused as exc:
        if fail:
            raise
        log.error("%s", exc)
        return 0
    found, gone = confirm_deletes(client, entity, candidates, path) if path else ([], set(candidates))
    with psycopg.connect(dsn) as conn, conn.transaction():
        if found:
            run.add(land_page(conn, entity, found, run.run_id, key_prefix=key_prefix))
        if gone:
            run.add(land_deletes(conn, entity, gone, run.run_id, key_prefix=key_prefix))
    if gone:
        log.info("%s: %d records deleted at the store (%d candidates answered: still there)", entity.name,
                 len(gone), len(found))
    return len(gone)


def list_ids(client: StoreClient, endpoint: str, params: dict, per_page: int) -> set[str]:
    """Every id a listing shows, paged until a short page (X-WP-TotalPages may be stripped by a proxy)."""
    ids: set[str] = set()
    for page in client.iter_pages(endpoint, {**params, "_fields": "id", "orderby": "id", "order": "asc"}, per_page):
        ids.update(str(r["id"]) for r in page.records if isinstance(r, dict) and r.get("id") is not None)
    return ids


def reconcile_deletes(dsn: str, client: StoreClient, entity: Entity, run_id: str) -> dict:
    """Records landed but gone from the store for good (permanent deletes leave no trace): delete events.

    Candidates are the ids a full listing no longer shows; each is asked for by id, and only a 404
    makes a delete. Variations, which the product list does not show, are checked per variable product."""
    run = RunRecord(dsn, run_id, entity.name, "reconcile")
    try:
        in_store: set[str] = set()
        for status in entity.statuses:
            in_store |= list_ids(client, entity.endpoint, {"status": status} if status else {}, entity.per_page)
        with psycopg.connect(dsn) as conn:
            # Trashed records are listed by status=trash; one deleted for good from the trash is not.
            known = landed_keys(conn, entity.name, with_trash=True)
            variations = landed_variations(conn, entity.name)
            deleted = {r[0] for r in conn.execute(
                "SELECT l.source_key FROM inbox.latest l JOIN inbox.record r ON r.inbox_id = l.inbox_id "
                "WHERE l.entity = %s AND l.is_delete AND r.payload ? 'deleted'", (entity.name,))}
        # Landed as deleted, yet the store lists them: read them again (a false delete heals).
        if revived := sorted(int(k) for k in deleted & in_store if k.isdigit()):
            log.warning("%s: %d records landed as deleted are live at the store: reading them again",
                        entity.name, len(revived))
            fetch_by_ids(dsn, client, entity, run, revived)
        top_level = set(known) - set(variations)
        apply_confirmed_deletes(dsn, client, entity, run, top_level - in_store, listed=len(in_store),
                                landed=len(top_level), path=lambda key: f"{entity.endpoint}/{key}")
        by_parent: dict[str, set[str]] = {}
        for key, parent in variations.items():
            by_parent.setdefault(parent, set()).add(key)
        for parent, keys in sorted(by_parent.items()):
            listed = list_ids(client, f"{entity.endpoint}/{parent}/variations", {}, entity.per_page)
            apply_confirmed_deletes(dsn, client, entity, run, keys - listed, listed=len(listed), landed=len(keys),
                                    path=lambda key, p=parent: f"{entity.endpoint}/{p}/variations/{key}", fail=False)
    except Exception as exc:
        run.finish("failed", 0, f"{type(exc).__name__}: {exc}"[:2000])
        raise
    return run.finish("success", 0)


def landed_variations(conn: psycopg.Connection, name: str) -> dict[str, str]:
    """{variation key: its product's id} for variations whose latest landed version is live."""
    rows = conn.execute(
        "SELECT l.source_key, r.payload->>'parent_id' FROM inbox.latest l JOIN inbox.record r ON r.inbox_id = l.inbox_id "
        "WHERE l.entity = %s AND NOT l.is_delete AND (r.payload->>'parent_id') ~ '^[1-9][0-9]*$' "
        "AND r.payload->>'type' = 'variation'", (name,)).fetchall()
    return dict(rows)
