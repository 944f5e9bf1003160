"""The change simulator: the mix of writes a live shop produces, at a steady rate.

Every change goes through ``Domain`` (the same code the REST writes use), so notes, paid and
completed dates, ``date_modified`` bumps and webhooks follow as they would on a real store.

Profiles: ``default`` (``MIX``) and ``chaos`` (``CHAOS_MIX``: the default mix plus trashes, restores
and permanent deletes of orders and products). Bulk edits (``bulk_every`` seconds) touch hundreds
of orders or products in one burst, committed together and stamped with one ``date_modified``
second, as an admin's bulk action or a CSV import does. ``mount_control`` adds loopback endpoints
to start/stop the simulator, change the faults, and read what was done (``/sandbox/stats``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter

from fastapi import Request

from .domain import Domain, StoreError

log = logging.getLogger("sandbox.simulator")

MIX = [
    ("new_order", 30), ("order_transition", 25), ("new_customer", 10), ("customer_update", 8),
    ("price_edit", 7), ("renewal", 6), ("subscription_change", 5), ("refund", 3), ("trash_order", 2),
    ("same_second_burst", 4),
]
# What the chaos bench runs: the live mix plus the writes that remove records from the lists.
CHAOS_MIX = MIX + [
    ("trash_order", 2), ("restore_order", 2), ("delete_order", 1), ("trash_product", 1), ("restore_product", 1),
    ("delete_product", 0.3),
]
PROFILES = {"default": MIX, "chaos": CHAOS_MIX}
BULK_KINDS = ("bulk_order_status", "bulk_order_meta", "bulk_product_price")
NEXT_STATUS = {"pending": ["processing", "cancelled", "failed"], "on-hold": ["processing", "cancelled"],
               "processing": ["completed", "completed", "on-hold"], "failed": ["pending"]}


class ChangeSimulator:
    def __init__(self, domain: Domain, rate: float, seed: int = 1, profile: str = "default",
                 bulk_every: float = 0, bulk_size: tuple[int, int] = (200, 600)):
        self.domain, self.rate = domain, rate
        self.rng = random.Random(seed * 7919)
        self.mix = PROFILES[profile]
        self.bulk_every, self.bulk_size = bulk_every, bulk_size
        self.stop_event = threading.Event()
        self.done = 0
        self.counts: Counter[str] = Counter()  # actions that changed the store
        self.refused: Counter[str] = Counter()  # actions the store refused (or that found nothing to do)
        self.records: Counter[str] = Counter()  # records written by bulk edits, by kind
        self.events: Counter[str] = Counter()  # what the store emitted ("order.updated"), whoever wrote
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self.events_source = None  # with several workers: every worker's store events, from shared memory
        domain.changes.listeners.append(self._on_change)

    def _on_change(self, resource: str, event: str, record_id: int) -> None:
        with self.lock:
            self.events[f"{resource}.{event}"] += 1

    def start(self) -> None:
        if self.rate > 0 and not self.thread.is_alive():
            if self.stop_event.is_set():  # stopped before: a thread and an event of its own
                self.stop_event = threading.Event()
                self.thread = threading.Thread(target=self._run, name="simulator", daemon=True)
            self.thread.start()

    def stop(self, wait: float = 0) -> None:
        self.stop_event.set()
        if wait and self.thread.is_alive():
            self.thread.join(wait)

    def configure(self, rate: float | None = None, profile: str | None = None, bulk_every: float | None = None,
                  bulk_size: tuple[int, int] | None = None) -> None:
        """Change the rate (0 stops and waits for the change in hand), the mix and the bulk edits."""
        if profile is not None:
            self.mix = PROFILES[profile]
        if bulk_every is not None:
            self.bulk_every = bulk_every
        if bulk_size is not None:
            self.bulk_size = (int(bulk_size[0]), int(bulk_size[1]))
        if rate is not None:
            self.rate = rate
            if rate <= 0:
                self.stop(wait=60)
            else:
                self.start()

    def stats(self) -> dict:
        with self.lock:
            return {"running": self.thread.is_alive() and not self.stop_event.is_set(), "rate": self.rate,
                    "steps": self.done, "changes": dict(self.counts), "refused": dict(self.refused),
                    "bulk_records": dict(self.records),
                    "store_events": self.events_source() if self.events_source else dict(self.events)}

    def _run(self) -> None:
        next_at = time.monotonic()
        next_bulk = next_at + (self.bulk_every or 0)
        while not self.stop_event.is_set():
            next_at += 1.0 / max(self.rate, 1e-3)
            if self.bulk_every and time.monotonic() >= next_bulk:
                next_bulk = time.monotonic() + self.bulk_every
                self._attempt(self.bulk_edit)
                next_at = max(next_at, time.monotonic())  # the burst took its time: no catch-up rush
            self._attempt(self.step)
            self.done += 1
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)

    def _attempt(self, fn) -> None:
        action = None
        try:
            action = fn()
        except StoreError as exc:
            log.debug("simulated change refused: %s", exc.message)
            action = getattr(exc, "action", None)
            with self.lock:
                self.refused[action or "store_error"] += 1
            return
        except Exception:
            log.exception("simulated change failed")
            with self.lock:
                self.refused["error"] += 1
            return
        with self.lock:
            if action and not action.startswith("-"):
                self.counts[action] += 1
            elif action:
                self.refused[action[1:]] += 1

    def _pick(self, sql: str, args=()) -> int | None:
        row = self.domain.db.execute(sql + " ORDER BY RANDOM() LIMIT 1", args).fetchone()
        return row[0] if row else None

    def step(self, action: str | None = None) -> str:
        """One change of the mix; returns its name ("-name" when there was nothing to change)."""
        action = action or self.rng.choices([a for a, _ in self.mix], [w for _, w in self.mix])[0]
        try:
            # One change at a time against every other writer (other workers included): a save is a
            # read-then-write sequence (MAX(id) + 1, update-or-insert meta).
            with self.domain.store.write_lock:
                done = self._step(action)
        except StoreError as exc:
            exc.action = action
            raise
        return action if done is not False else "-" + action

    def _step(self, action: str) -> bool | None:
        rng, d = self.rng, self.domain
        if action == "new_order":
            self._new_order()
        elif action == "order_transition":
            oid = self._pick("SELECT id FROM posts WHERE post_type='shop_order' AND post_status IN "
                             "('pending','on-hold','processing','failed') AND id > (SELECT MAX(id) - 3000 FROM posts)")
            if oid:
                status = d.db.execute("SELECT post_status FROM posts WHERE id=?", (oid,)).fetchone()[0]
                d.update_order(oid, {"status": rng.choice(NEXT_STATUS[status])})
        elif action == "new_customer":
            n = rng.getrandbits(40)
            d.create_customer({"email": f"new{n:x}@example.com", "first_name": "New", "last_name": f"Buyer {n % 1000}",
                               "billing": {"country": "ES", "state": "M", "city": "Madrid",
                                           "email": f"new{n:x}@example.com"}})
        elif action == "customer_update":
            uid = self._pick("SELECT id FROM users WHERE role='customer'")
            if uid:
                d.update_customer(uid, {"billing": {"phone": f"+34 6{rng.randint(10000000, 99999999)}"}})
        elif action == "price_edit":
            pid = self._pick("SELECT id FROM posts WHERE post_type='product' AND post_status='publish'")
            if pid:
                d.update_product(pid, {"regular_price": f"{rng.uniform(5, 300):.2f}"})
        elif action == "renewal":
            sid = self._pick("SELECT id FROM posts WHERE post_type='shop_subscription' AND post_status='active'")
            if sid:
                d.create_renewal(sid, paid=rng.random() < 0.9)
        elif action == "subscription_change":
            sid = self._pick("SELECT id FROM posts WHERE post_type='shop_subscription' AND post_status IN ('active','on-hold')")
            if sid:
                d.update_order(sid, {"transition_status": rng.choice(["cancelled", "on-hold", "active", "pending-cancel"])},
                               post_type="shop_subscription")
        elif action == "refund":
            oid = self._pick("SELECT id FROM posts WHERE post_type='shop_order' AND post_status='completed'")
            if oid:
                d.create_refund(oid, round(rng.uniform(1, 5), 2), "Goodwill")
        elif action == "trash_order":
            oid = self._pick("SELECT id FROM posts WHERE post_type='shop_order' AND post_status IN ('cancelled','failed')")
            if oid:
                with d.store.write_lock:
                    d.trash(oid, "order")
        elif action == "same_second_burst":
            # several orders modified within one second: what strict, whole-second filters lose
            for _ in range(3):
                self._new_order()
        elif action in ("restore_order", "restore_product"):
            post_type, resource = ("shop_order", "order") if action == "restore_order" else ("product", "product")
            pid = self._pick("SELECT id FROM posts WHERE post_type=? AND post_status='trash'", (post_type,))
            if not pid:
                return False
            with d.store.write_lock:
                d.untrash(pid, resource)
        elif action == "trash_product":
            pid = self._pick("SELECT id FROM posts WHERE post_type='product' AND post_status='publish'")
            if not pid:
                return False
            with d.store.write_lock:
                d.trash(pid, "product")
        elif action in ("delete_order", "delete_product"):
            # permanent delete (an admin empties the trash, or deletes with force=true): no webhook, no tombstone
            post_type = "shop_order" if action == "delete_order" else "product"
            extra = "AND id NOT IN (SELECT post_parent FROM posts WHERE post_type IN " \
                    "('shop_order_refund','product_variation'))"
            pid = self._pick(f"SELECT id FROM posts WHERE post_type=? AND post_status='trash' {extra}", (post_type,))
            if not pid:
                return False
            with d.store.write_lock:
                d.delete_post(pid)
        return None

    def bulk_edit(self, kind: str | None = None, size: int | None = None) -> str:
        """Hundreds of records written in one burst and one transaction, all stamped with one second.

        What an admin's bulk action ("mark completed", a price change) or a CSV import does: a page of
        ``orderby=modified`` holds nothing but that second, and only the id can tell its records apart.
        """
        d, rng = self.domain, self.rng
        kind = kind or rng.choice(BULK_KINDS)
        size = size or rng.randint(*self.bulk_size)
        if kind == "bulk_order_status":
            sql = ("SELECT id, post_status FROM posts WHERE post_type='shop_order' AND post_status IN "
                   "('processing','on-hold','pending') ORDER BY RANDOM() LIMIT ?")
        elif kind == "bulk_order_meta":
            sql = "SELECT id, post_status FROM posts WHERE post_type='shop_order' AND post_status!='trash' " \
                  "ORDER BY RANDOM() LIMIT ?"
        else:
            sql = "SELECT id, post_status FROM posts WHERE post_type='product' AND post_status!='trash' " \
                  "ORDER BY RANDOM() LIMIT ?"
        target = {"pending": "processing", "on-hold": "processing", "processing": "completed"}
        tag = f"import-{rng.getrandbits(24):06x}"
        with d.store.write_lock:
            db = d.db
            rows = db.execute(sql, (size,)).fetchall()
            if not rows:
                return "-" + kind
            ids = [r[0] for r in rows]
            db.execute("BEGIN IMMEDIATE")
            try:
                for pid, status in rows:
                    if kind == "bulk_order_status":
                        d.update_order(pid, {"status": target[status]})
                    elif kind == "bulk_order_meta":
                        d.update_order(pid, {"meta_data": [{"key": "_crm_segment", "value": tag}]})
                    else:
                        price = d.store.post_meta(pid).get("_regular_price") or "10"
                        try:
                            new = float(price) * rng.choice([0.9, 1.1])
                        except ValueError:
                            new = 10.0
                        d.update_product(pid, {"regular_price": f"{max(new, 1):.2f}"})
                local, gmt = d.store.stamp()  # one second for the whole burst
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    db.execute(f"UPDATE posts SET post_modified=?, post_modified_gmt=? WHERE id IN "
                               f"({','.join('?' * len(chunk))})", (local, gmt, *chunk))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        with self.lock:
            self.records[kind] += len(ids)
        log.info("bulk edit %s: %d records at %s", kind, len(ids), gmt)
        return kind

    def _new_order(self) -> int:
        d, rng = self.domain, self.rng
        customer = self._pick("SELECT id FROM users WHERE role='customer'") if rng.random() < 0.75 else 0
        products = [self._pick("SELECT id FROM posts WHERE post_type IN ('product','product_variation') "
                               "AND post_status='publish' AND id NOT IN (SELECT post_parent FROM posts "
                               "WHERE post_type='product_variation')") for _ in range(rng.choice([1, 1, 2, 3]))]
        email = f"guest{rng.getrandbits(32):x}@mail.com"
        return d.create_order({
            "customer_id": customer or 0, "status": rng.choice(["pending", "processing", "on-hold"]),
            "payment_method": "bacs", "payment_method_title": "Direct bank transfer", "created_via": "checkout",
            "billing": {"first_name": "Sim", "last_name": "Buyer", "email": email, "country": "ES", "state": "B"},
            "line_items": [{"product_id": p, "quantity": rng.choice([1, 2])} for p in products if p],
        })


def mount_control(app, simulator: ChangeSimulator, faults) -> None:
    """Loopback endpoints for benchmarks (outside ``/wp-json``, so no auth and no faults):

    * ``GET /sandbox/stats``: what the simulator did and which faults were injected, by kind;
    * ``POST /sandbox/control`` ``{"rate": 3, "profile": "chaos", "bulk_every": 60, "bulk_size": [200, 600],
      "faults": "429=0.02,shift=0.05"}``: any subset; ``"rate": 0`` stops the simulator (after the change
      in hand), ``"faults": ""`` turns every fault off.
    """
    @app.get("/sandbox/stats")
    def sandbox_stats():
        with faults.lock:
            injected = {k: v for k, v in faults.counts.items() if v}
            rates = dict(faults.rates)
        out = {"simulator": simulator.stats(), "faults": injected, "fault_rates": rates,
               "clock_offset_seconds": simulator.domain.store.clock_offset.total_seconds()}
        renderer = getattr(app.state, "renderer", None)
        if renderer is not None:
            out["prerender"] = {"rendered_since_start": renderer.rendered, "pending": renderer.pending()}
        shop = getattr(app.state, "shop", None)
        if shop is not None and shop.max_concurrent:
            out["host"] = {"max_concurrent": shop.max_concurrent, "in_flight": shop.in_flight()}
        return out

    @app.post("/sandbox/control")
    async def sandbox_control(request: Request):
        import asyncio

        body = await request.json()
        if "faults" in body:
            faults.configure(body["faults"])
        keys = ("rate", "profile", "bulk_every", "bulk_size")
        if any(k in body for k in keys):
            await asyncio.to_thread(simulator.configure, **{k: body[k] for k in keys if k in body})
        return sandbox_stats()
