"""Fetch on demand: drain ``sync.fetch_request``, the queue of records the CRM asked for.

Who fills it: the transforms (an order whose customer or products have not arrived, a refund whose
order has not) and people (``SELECT crm.request_fetch('customers', 42)``, or the Params form of the
``store_fetch_on_demand`` DAG). What can be asked for is ``fetchable()``, mirrored in SQL by
``sync.fetch_target``:

* a registry entity read by id (``orders``, ``refunds``, ``subscriptions``, ``products``, ``customers``):
  ``include=`` reads of up to 100 ids, ``status=any`` then ``trash`` as ``detect.fetch_by_ids`` does;
* records under a parent, keyed by the **parent's** id: ``order_notes`` (``orders/{id}/notes``),
  ``order_refunds`` (``orders/{id}/refunds``) and ``subscription_orders`` (``subscriptions/{id}/orders``).
  Refunds and related orders are listed under their parent for their ids, then read by ``include=``
  from ``refunds`` / ``orders``: a real store leaves ``parent_id`` out of ``orders/{id}/refunds`` and adds
  ``order_type`` to ``subscriptions/{id}/orders``, and landing those shapes would make a second,
  different version of records live sync lands.

Answers land in the inboxes like any other landing (``mode='on_demand'`` in ``sync.landing_run``), so
the ordinary transforms apply them. Only a direct ``404`` is a delete (``confirm_deletes`` and
``land_deletes``); a parent answering 404 is asked for by id, and a gone parent lands as deleted. A
failed attempt (the store down, a record quarantined) is due again after a backoff that doubles up to
a cap; after ``max_attempts`` the request is ``failed`` until someone asks again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict

import psycopg

log = logging.getLogger(__name__)

# Kinds of related records, asked for by their parent's id: name -> (parent entity, what lands).
RELATED = {
    "order_notes": ("orders", "order_notes"),
    "order_refunds": ("orders", "refunds"),
    "subscription_orders": ("subscriptions", "orders"),
}
BATCH = 100  # include= takes at most 100 ids (per_page's ceiling)

# Settings, overridable at run time with the Variable store_sync_overrides: {"fetch_on_demand": {...}}.
DEFAULTS = {
    "poll_seconds": 2.0,            # how often the trigger asks the CRM "anything due?" (one indexed query)
    "max_quiet_seconds": 60.0,      # with nothing due, end the run this often (a queued form run goes next)
    "retry_base_seconds": 30.0,     # first backoff after a failed attempt; doubles each attempt
    "retry_max_seconds": 3600.0,    # backoff ceiling
    "max_attempts": 10,             # then the request is 'failed' until asked again
    "max_requests_per_run": 1000,   # the rest waits for the next run
    "max_run_seconds": 600.0,       # stop starting new reads after this long; the rest is still due
}
DUE_SQL = "SELECT min(next_attempt_at), now() FROM sync.fetch_request WHERE fetched_at IS NULL AND failed_at IS NULL"


def by_id_entities() -> list[str]:
    """Registry entities with a numeric id and a route per record (not code lists, not children)."""
    from store_sync.registry import entities

    return sorted(n for n, e in entities().items() if e.strategy in ("modified_window", "id_scan"))


def fetchable() -> list[str]:
    """Every entity name ``crm.request_fetch`` and the form accept."""
    return sorted(by_id_entities() + list(RELATED))


def lands_in() -> list[str]:
    """The inbox entities a drain may land in (the DAG's Asset outlets)."""
    return sorted(set(by_id_entities()) | {child for _, child in RELATED.values()} | {p for p, _ in RELATED.values()})


def fetch_settings() -> dict:
    try:
        from airflow.sdk import Variable

        every = Variable.get("store_sync_overrides", default={}, deserialize_json=True) or {}
    except Exception:  # no Variable backend reachable (a bare script): the defaults apply
        every = {}
    given = every.get("fetch_on_demand") or {}
    return {k: type(v)(given.get(k, v)) for k, v in DEFAULTS.items()}


def request_fetch(dsn: str, entity: str, ids: list[int], reason: str | None = None) -> list[int]:
    """``crm.request_fetch`` for each id; returns the request ids (the same id again while pending)."""
    with psycopg.connect(dsn) as conn:
        return [conn.execute("SELECT crm.request_fetch(%s, %s, %s)", (entity, int(i), reason)).fetchone()[0]
                for i in ids]


def due_now(dsn: str) -> bool:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        first, now = conn.execute(DUE_SQL).fetchone()
    return first is not None and first <= now


def backlog(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT entity, count(*) FROM sync.fetch_request WHERE status = 'pending' "
                             "GROUP BY entity ORDER BY entity").fetchall())


class Drain:
    """One drain run: what is due, read from the store, landed, and each request's outcome recorded."""

    def __init__(self, dsn: str, client, run_id: str, settings: dict | None = None):
        self.dsn, self.client, self.run_id = dsn, client, run_id
        self.cfg = {**DEFAULTS, **(settings or {})}
        self.counts = {"requested": 0, "fetched": 0, "deleted_at_source": 0, "failed": 0, "gave_up": 0,
                       "due_left": 0}
        self.deadline = time.monotonic() + float(self.cfg["max_run_seconds"])
        self.runs: dict[str, object] = {}

    # -- bookkeeping ------------------------------------------------------------------------------
    def run_record(self, target: str, entity: str):
        """One ``sync.landing_run`` row per (run, target); its id scopes the run's quarantine rows."""
        from store_sync.inbound.landing import RunRecord

        if target not in self.runs:
            self.runs[target] = RunRecord(self.dsn, f"{self.run_id}:fetch:{target}", entity, "on_demand")
        return self.runs[target]

    def done(self, target: str, keys, outcome: str) -> None:
        if not keys:
            return
        with psycopg.connect(self.dsn) as conn:
            n = conn.execute("SELECT sync.fetch_request_done(%s, %s, %s, %s)",
                             (target, sorted(map(str, keys)), outcome, self.run_id)).fetchone()[0]
        self.counts["fetched" if outcome == "fetched" else "deleted_at_source"] += n

    def failed(self, target: str, keys, error: str, final: bool = False) -> None:
        if not keys:
            return
        log.warning("%s %s: attempt failed: %s", target, ",".join(sorted(map(str, keys)))[:200], error)
        with psycopg.connect(self.dsn) as conn:
            n = conn.execute("SELECT sync.fetch_request_failed(%s, %s, %s, %s, %s, %s, %s)",
                             (target, sorted(map(str, keys)), error, self.run_id, float(self.cfg["retry_base_seconds"]),
                              float(self.cfg["retry_max_seconds"]), 1 if final else int(self.cfg["max_attempts"]))
                             ).fetchone()[0]
            gave_up = conn.execute("SELECT count(*) FROM sync.fetch_request WHERE entity = %s AND source_key = ANY(%s) "
                                   "AND failed_at IS NOT NULL AND run_id = %s",
                                   (target, sorted(map(str, keys)), self.run_id)).fetchone()[0]
        self.counts["failed"] += n
        self.counts["gave_up"] += gave_up

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT entity, source_key FROM sync.fetch_request WHERE fetched_at IS NULL AND failed_at IS NULL "
                "AND next_attempt_at <= now() ORDER BY next_attempt_at, request_id LIMIT %s",
                (int(self.cfg["max_requests_per_run"]),)).fetchall()
        due: dict[str, list[str]] = defaultdict(list)
        for entity, key in rows:
            due[entity].append(key)
        self.counts["requested"] = len(rows)
        known = set(fetchable())
        retries: dict[str, int] = defaultdict(int)
        try:
            for target, keys in sorted(due.items()):
                bad = [k for k in keys if not k.isdigit() or int(k) < 1]
                if target not in known:  # nothing the store could answer: failed at once (asking again re-queues)
                    self.failed(target, keys, f"cannot fetch {target!r}: not in sync.fetch_target", final=True)
                    continue
                if bad:
                    self.failed(target, bad, "not a store id (a positive integer)", final=True)
                    keys = [k for k in keys if k not in bad]
                if not keys:
                    continue
                before = self.client.stats.retries
                try:
                    if target in RELATED:
                        self.related(target, sorted(keys, key=int))
                    else:
                        self.by_id(target, sorted(keys, key=int))
                finally:
                    retries[target] += self.client.stats.retries - before
        except Exception as exc:
            for target, rec in self.runs.items():
                rec.finish("failed", retries[target], _describe(exc))
            raise
        for target, rec in self.runs.items():
            rec.finish("success", retries[target])
        with psycopg.connect(self.dsn) as conn:
            left = backlog(conn)
            self.counts["due_left"] = conn.execute(
                "SELECT count(*) FROM sync.fetch_request WHERE fetched_at IS NULL AND failed_at IS NULL "
                "AND next_attempt_at <= now()").fetchone()[0]
        self.counts["backlog"] = sum(left.values())
        self.counts["backlog_by_entity"] = left
        self.counts["store_requests"] = self.client.stats.requests
        self.counts["store_retries"] = self.client.stats.retries
        return self.counts

    # -- records by id ----------------------------------------------------------------------------
    def by_id(self, target: str, keys: list[str]) -> None:
        from store_sync.inbound.detect import fetch_by_ids
        from store_sync.registry import entity as registry_entity

        spec = registry_entity(target)
        run = self.run_record(target, target)
        for start in range(0, len(keys), BATCH):
            chunk = keys[start:start + BATCH]
            if self.out_of_time():
                return
            try:
                fetch_by_ids(self.dsn, self.client, spec, run, [int(k) for k in chunk])
            except Exception as exc:
                if _is_auth(exc):
                    raise
                self.failed(target, chunk, _describe(exc))
                continue
            self.settle(target, spec.name, chunk, run.run_id)

    def settle(self, target: str, entity: str, keys: list[str], run_id: str) -> None:
        """After a landing: each key fetched, deleted at the source (a 404 landed), or quarantined."""
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT k, l.inbox_id IS NOT NULL, COALESCE(l.is_delete AND r.payload ? 'deleted', false), q.reason "
                "FROM unnest(%s::text[]) k "
                "LEFT JOIN inbox.latest l ON l.entity = %s AND l.source_key = k "
                "LEFT JOIN inbox.record r ON r.inbox_id = l.inbox_id "
                "LEFT JOIN LATERAL (SELECT reason FROM sync.quarantine q WHERE q.entity = %s AND q.source_key = k "
                "                   AND q.run_id = %s ORDER BY quarantine_id DESC LIMIT 1) q ON true",
                (keys, entity, entity, run_id)).fetchall()
        fetched, gone, quarantined, missing = [], [], defaultdict(list), []
        for key, landed, deleted, reason in rows:
            if reason:
                quarantined[reason].append(key)
            elif deleted:
                gone.append(key)
            elif landed:
                fetched.append(key)
            else:
                missing.append(key)
        self.done(target, fetched, "fetched")
        self.done(target, gone, "deleted_at_source")
        for reason, ks in quarantined.items():
            self.failed(target, ks, f"the store's record failed its JSON Schema (sync.quarantine): {reason}")
        self.failed(target, missing, "the store answered but the record did not land")

    # -- records under a parent -------------------------------------------------------------------
    def related(self, target: str, parents: list[str]) -> None:
        from store_sync.store.client import StoreNotFound

        parent_name, child_name = RELATED[target]
        listed: dict[str, list[int]] = {}
        for parent in parents:
            if self.out_of_time():
                break
            try:
                if target == "order_notes":
                    self.notes(parent)
                    continue
                listed[parent] = self.list_ids(target, parent)
            except StoreNotFound as exc:
                if exc.code == "rest_no_route":
                    self.failed(target, [parent], _describe(exc))
                else:
                    self.parent_gone(target, parent_name, parent, exc)
            except Exception as exc:
                if _is_auth(exc):
                    raise
                self.failed(target, [parent], _describe(exc))
        if listed:
            self.read_children(target, child_name, listed)

    def list_ids(self, target: str, parent: str) -> list[int]:
        if target == "order_refunds":
            return [int(r["id"]) for r in self.client.iter_records(f"orders/{parent}/refunds", {"_fields": "id"}, BATCH)]
        records = self.client.get(f"subscriptions/{parent}/orders", {"_fields": "id"})
        return [int(r["id"]) for r in records if isinstance(r, dict) and r.get("id")]

    def read_children(self, target: str, child_name: str, listed: dict[str, list[int]],
                      outcome: str = "fetched") -> None:
        """Refunds / related orders by include= from their own route (the shape live sync lands), with the
        ones landed before under these parents, so a child deleted at the store is asked for and lands as gone."""
        from store_sync.inbound.detect import fetch_by_ids
        from store_sync.registry import entity as registry_entity

        spec = registry_entity(child_name)
        ids = {i for found in listed.values() for i in found}
        if target == "order_refunds":
            with psycopg.connect(self.dsn) as conn:
                ids |= {int(r[0]) for r in conn.execute(
                    "SELECT l.source_key FROM inbox.latest l JOIN inbox.record r ON r.inbox_id = l.inbox_id "
                    "WHERE l.entity = 'refunds' AND NOT l.is_delete AND r.payload->>'parent_id' = ANY(%s)",
                    (list(listed),))}
        try:
            if ids:
                fetch_by_ids(self.dsn, self.client, spec, self.run_record(target, child_name), sorted(ids))
        except Exception as exc:
            if _is_auth(exc):
                raise
            self.failed(target, list(listed), _describe(exc))
            return
        self.done(target, list(listed), outcome)

    def notes(self, order_id: str) -> None:
        """An order's notes as live sync reads them (``fetch_children``), deleted notes included."""
        from store_sync.inbound.detect import fetch_children, land_deletes
        from store_sync.inbound.landing import land_page
        from store_sync.registry import entity as registry_entity

        orders = registry_entity("orders")
        only_notes = dataclasses.replace(orders, children=tuple(c for c in orders.children
                                                                if c["entity"] == "order_notes"))
        run = self.run_record("order_notes", "order_notes")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            children = fetch_children(self.client, only_notes, [{"id": int(order_id)}], live_cycle=True, conn=conn)
            with conn.transaction():
                for child, prefix, records, gone in children:
                    run.add(land_page(conn, child, records, run.run_id, key_prefix=prefix))
                    if gone:
                        run.add(land_deletes(conn, child, gone, run.run_id, key_prefix=prefix))
        self.done("order_notes", [order_id], "fetched")

    def parent_gone(self, target: str, parent_name: str, parent: str, exc: Exception) -> None:
        """The parent's route answered 404: ask for the parent itself; only its own 404 is a delete."""
        from store_sync.inbound.detect import confirm_deletes, land_deletes, landed_children
        from store_sync.inbound.landing import land_page
        from store_sync.registry import entity as registry_entity

        spec = registry_entity(parent_name)
        found, gone = confirm_deletes(self.client, spec, {int(parent)}, lambda key: f"{spec.endpoint}/{key}")
        run = self.run_record(target, parent_name)
        with psycopg.connect(self.dsn) as conn, conn.transaction():
            if found:
                run.add(land_page(conn, spec, found, run.run_id))
            if gone:
                run.add(land_deletes(conn, spec, gone, run.run_id))
                if target == "order_notes":  # the notes of a deleted order are gone with it
                    notes = registry_entity("order_notes")
                    before = landed_children(conn, notes, spec, [parent]).get(parent, set())
                    if before:
                        run.add(land_deletes(conn, notes, before, run.run_id, key_prefix=f"{parent}:"))
        if not gone:
            self.failed(target, [parent], f"{_describe(exc)}, yet {parent_name} {parent} answers")
            return
        if target == "order_refunds":  # refunds landed under a deleted order: asked for one by one
            self.read_children(target, "refunds", {parent: []}, outcome="deleted_at_source")
            return
        self.done(target, [parent], "deleted_at_source")


def _is_auth(exc: Exception) -> bool:
    from store_sync.store.client import StoreAuthError

    return isinstance(exc, StoreAuthError)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def drain(dsn: str, client, run_id: str, settings: dict | None = None) -> dict:
    return Drain(dsn, client, run_id, settings).run()
