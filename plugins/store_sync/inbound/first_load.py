"""First loads: a new shop's whole history, fast, and still within what the store may bear.

* Entities land **concurrently**: threads in one process, all spending one request budget, the
  store's first-load lane (connection extras ``first_load_requests_per_second`` /
  ``first_load_max_in_flight``; live sync keeps its own polite lane).
* Dated entities (orders, refunds, subscriptions, products) are cut into **time slices** read side by
  side; each slice is a frozen window ``[lo, hi)`` read keyset-style exactly as live sync reads (so a
  record modified mid-read is never lost, a busy second is drained by id), landing idempotently:
  slices meet at whole seconds, and a record read twice is skipped as identical. Customers (no date
  filter) are read by page number, ids ascending, several pages at a time.
* The **transform overlaps the landing**: one consumer thread applies each transform step while rows
  arrive, once every entity of the steps before it has landed (a customer before its orders, so no
  order queues a fetch for a customer about to land); the transform's advisory lock keeps one writer.
* At the end every entity's live watermark is where a live cycle would have left it (``t0``, the
  customers' highest id), so the watch DAGs carry on from there. A killed first load is rerun whole:
  what already landed is skipped, nothing doubles.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timedelta

import psycopg

from store_sync.inbound.detect import SECOND, first_page, fmt, int_key, now_utc, sync_entity
from store_sync.inbound.landing import RunRecord, get_watermark, land_page, parse_gmt, set_watermark
from store_sync.registry import Entity, entities
from store_sync.store.client import StoreClient

log = logging.getLogger(__name__)
MODE = "first_load"
PAGES_PER_SLICE = 10  # a slice of about 10 pages: enough slices to keep every thread busy to the end


def needs_first_load(dsn: str, entity: Entity) -> bool:
    """True when the entity has never completed a live cycle (its live watermark is empty)."""
    if entity.strategy not in ("modified_window", "id_scan"):
        return False
    with psycopg.connect(dsn) as conn:
        cursor, state = get_watermark(conn, entity.name)
    if entity.strategy == "id_scan":
        return not state.get("max_id")
    return cursor is None and not (state.get("progress") or {}).get("t0")


def plan_slices(client: StoreClient, entity: Entity, t0: datetime, threads: int) -> list[tuple[datetime, datetime]]:
    """Whole-second windows ``[lo, hi)`` covering every record modified before ``t0``, about
    ``PAGES_PER_SLICE`` pages each (the store's count and its oldest record, two cheap requests per status)."""
    oldest, total = None, 0
    for status in entity.statuses:
        params = {**entity.params, "modified_before": fmt(t0), "_fields": f"{entity.key},{entity.cursor}",
                  **({"status": status} if status else {})}
        page = client.get_page(entity.endpoint, params, 1, 1)
        total += page.total or len(page.records)
        for r in page.records:
            m = parse_gmt(r.get(entity.cursor)) if isinstance(r, dict) else None
            if m and (oldest is None or m < oldest):
                oldest = m
        if page.total and not page.records:  # a transient empty page: read the window whole, unsliced
            return [(datetime(1970, 1, 2, tzinfo=t0.tzinfo), t0)]
    if oldest is None:
        return [(datetime(1970, 1, 2, tzinfo=t0.tzinfo), t0)] if total else []
    parts = max(1, min(threads * 4, math.ceil(total / (entity.per_page * PAGES_PER_SLICE))))
    span = max(1, math.ceil((t0 - oldest).total_seconds() / parts))
    # The first slice starts far back: a record the store dates before `oldest` (written meanwhile
    # with an old date, a clock skew) is read all the same.
    edges = [datetime(1970, 1, 2, tzinfo=t0.tzinfo)] + [oldest + timedelta(seconds=span * i) for i in range(1, parts)]
    edges = [e for e in edges if e < t0] + [t0]
    return list(zip(edges[:-1], edges[1:], strict=True))


class Loader:
    """One first load (or a catch-up cycle for entities already loaded) of the given entities."""

    def __init__(self, dsn: str, client: StoreClient, run_id: str, names: list[str] | None = None,
                 threads: int | None = None, transform: bool = True):
        self.dsn, self.client, self.run_id = dsn, client, run_id
        every = entities()
        self.specs = {n: s for n, s in every.items() if s.strategy != "children" and (names is None or n in names)}
        self.threads = threads or max(2, client.budget.max_in_flight)
        self.transform = transform
        self.landed: set[str] = set()
        self.counts: dict[str, dict] = {}
        self.applied: list[dict] = []
        self.errors: list[tuple[str, Exception]] = []
        self._lock = threading.Lock()
        self._changed = threading.Event()

    # -- landing ---------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.monotonic()
        consumer = None
        if self.transform:
            consumer = threading.Thread(target=self._transform_while_landing, name="first-load-transform", daemon=True)
            consumer.start()
        try:
            self._land_all()
        finally:
            with self._lock:
                self.landed.update(self.specs)  # the consumer stops at its next look, even after a failure
            self._changed.set()
            if consumer is not None:
                consumer.join()
        if self.transform and not self.errors:
            from store_sync.crm.transform import transform

            self.applied += transform(self.dsn)  # whatever arrived after the consumer's last pass
        if len(self.errors) == 1:
            raise self.errors[0][1]  # the store's own error (refused key, unreachable...), as a live cycle raises it
        if self.errors:
            raise RuntimeError("first load failed:\n  " + "\n  ".join(
                f"{name}: {type(exc).__name__}: {exc}" for name, exc in self.errors)) from self.errors[0][1]
        return {"entities": self.counts, "transform": self.applied, "seconds": round(time.monotonic() - started, 2),
                "requests": self.client.stats.requests}

    def _land_all(self) -> None:
        t0 = now_utc()
        jobs: list[tuple[str, object]] = []  # (entity, a callable landing one part of it), smallest first
        for name, spec in self.specs.items():
            if not needs_first_load(self.dsn, spec):
                jobs.append((name, lambda s=spec: sync_entity(self.dsn, self.client, s, self.run_id)))
            elif spec.strategy == "id_scan":
                jobs.append((name, lambda s=spec: self._customers(s)))
            else:
                until = t0 - timedelta(seconds=spec.settle_seconds)
                try:
                    slices = plan_slices(self.client, spec, until, self.threads)
                except Exception as exc:  # the store refused even the planning: a failed run, in words
                    RunRecord(self.dsn, self.run_id, name, MODE).finish("failed", 0, f"{type(exc).__name__}: {exc}"[:2000])
                    self._failed(name, exc)
                    continue
                for lo, hi in slices:
                    jobs.append((name, lambda s=spec, lo=lo, hi=hi: sync_entity(
                        self.dsn, self.client, s, f"{self.run_id}:{fmt(lo)}", mode=MODE, since=lo - SECOND, until=hi)))
        order = {step: i for i, step in enumerate(sorted({s.transform or "" for s in self.specs.values()}))}
        jobs.sort(key=lambda j: order[self.specs[j[0]].transform or ""])  # dependency order: customers before orders
        left = {name: sum(1 for n, _ in jobs if n == name) for name in self.specs}
        for name, n in left.items():
            if n == 0:
                self._entity_done(name, t0)
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="first-load") as pool:
            running: dict[Future, str] = {pool.submit(job): name for name, job in jobs}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    try:
                        counts = future.result()
                    except Exception as exc:  # the other entities go on; the load fails at the end
                        self._failed(name, exc)
                        left[name] = -1
                        continue
                    self._add(name, counts)
                    if left[name] > 0:
                        left[name] -= 1
                        if left[name] == 0:
                            self._entity_done(name, t0)

    def _failed(self, name: str, exc: Exception) -> None:
        log.error("first load of %s failed: %s: %s", name, type(exc).__name__, exc)
        with self._lock:
            self.errors.append((name, exc))

    def _add(self, name: str, counts: dict) -> None:
        with self._lock:
            total = self.counts.setdefault(name, {"read": 0, "landed": 0, "skipped": 0, "quarantined": 0, "parts": 0})
            for k in ("read", "landed", "skipped", "quarantined"):
                total[k] += counts.get(k, 0)
            total["parts"] += 1

    def _entity_done(self, name: str, t0: datetime) -> None:
        spec = self.specs[name]
        if spec.strategy == "modified_window" and needs_first_load(self.dsn, spec):
            until = t0 - timedelta(seconds=spec.settle_seconds)
            with psycopg.connect(self.dsn) as conn, conn.transaction():
                set_watermark(conn, name, until, self.run_id, {"progress": None})  # as a completed live cycle leaves it
        log.info("first load: %s landed %s", name, self.counts.get(name))
        with self._lock:
            self.landed.add(name)
        self._changed.set()

    def _customers(self, spec: Entity) -> dict:
        """Every customer by page number, ids ascending, pages read side by side within the budget.

        A customer created meanwhile has a higher id (the next live cycle's descending read finds it);
        one deleted or changed meanwhile is found by the periodic scan, due within its period."""
        started = now_utc()
        with psycopg.connect(self.dsn) as conn:
            hooks_seen = conn.execute("SELECT coalesce(max(event_id), 0) FROM sync.webhook_event").fetchone()[0]
        run = RunRecord(self.dsn, self.run_id, spec.name, MODE)
        params = {**spec.params, "order": "asc"}
        newest = 0
        try:
            first = first_page(self.client, spec, params)
            rest = self.client.fetch_pages(spec.endpoint, params, range(2, first.total_pages + 1), spec.per_page)
            with psycopg.connect(self.dsn, autocommit=True) as conn:  # one connection, a transaction per page
                for page in itertools.chain([first], rest):
                    newest = max([newest, *(int_key(r, spec) or 0 for r in page.records)])
                    with conn.transaction():
                        run.add(land_page(conn, spec, page.records, run.run_id))
            with psycopg.connect(self.dsn) as conn, conn.transaction():
                # The orders landed so far had their customers read just now; later ones are asked about
                # in the next live cycles, as usual.
                orders_seen = conn.execute("SELECT coalesce(max(inbox_id), 0) FROM inbox.record "
                                           "WHERE entity = 'orders'").fetchone()[0]
                set_watermark(conn, spec.name, started, run.run_id,
                              {"max_id": newest, "orders_inbox_id": orders_seen, "webhook_event_id": hooks_seen,
                               "last_scan": fmt(started)})
        except Exception as exc:
            run.finish("failed", 0, f"{type(exc).__name__}: {exc}"[:2000])
            raise
        return run.finish("success", 0, window_to=started)

    # -- the transform, overlapping -----------------------------------------------------------------
    def _transform_while_landing(self) -> None:
        from store_sync.crm.transform import run_step, steps

        plan = steps()
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while True:
                    with self._lock:
                        landed = set(self.landed)
                    finished = landed >= set(self.specs)
                    if finished:
                        return  # the final pass (all steps, in order) runs after the landing
                    self._changed.clear()
                    did = 0
                    for i, (sql_file, names) in enumerate(plan):
                        wanted = [n for n in names if n in self.specs]
                        if not wanted:
                            continue
                        if not {n for _, earlier in plan[:i] for n in earlier if n in self.specs} <= landed:
                            break  # the steps after wait for these entities to have landed whole
                        stats = run_step(conn, sql_file, wanted)
                        did += stats["inbox_rows"]
                        if stats["inbox_rows"]:
                            self.applied.append(stats)
                    if not did:
                        self._changed.wait(0.5)
        except Exception as exc:
            log.exception("transform while landing failed")
            self._failed("transform", exc)


def first_load(dsn: str, client: StoreClient, run_id: str, names: list[str] | None = None, *,
               threads: int | None = None, transform: bool = True) -> dict:
    """Land every entity (or ``names``) concurrently and, with ``transform``, apply the CRM transform as
    rows arrive; entities already loaded run one ordinary live cycle instead."""
    return Loader(dsn, client, run_id, names, threads, transform).run()
