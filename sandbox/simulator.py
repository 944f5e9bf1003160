"""The change simulator: the mix of writes a live shop produces, at a steady rate.

Every change goes through ``Domain`` (the same code the REST writes use), so notes, paid and
completed dates, ``date_modified`` bumps and webhooks follow as they would on a real store.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from .domain import Domain, StoreError

log = logging.getLogger("sandbox.simulator")

MIX = [
    ("new_order", 30), ("order_transition", 25), ("new_customer", 10), ("customer_update", 8),
    ("price_edit", 7), ("renewal", 6), ("subscription_change", 5), ("refund", 3), ("trash_order", 2),
    ("same_second_burst", 4),
]
NEXT_STATUS = {"pending": ["processing", "cancelled", "failed"], "on-hold": ["processing", "cancelled"],
               "processing": ["completed", "completed", "on-hold"], "failed": ["pending"]}


class ChangeSimulator:
    def __init__(self, domain: Domain, rate: float, seed: int = 1):
        self.domain, self.rate = domain, rate
        self.rng = random.Random(seed * 7919)
        self.stop_event = threading.Event()
        self.done = 0
        self.thread = threading.Thread(target=self._run, name="simulator", daemon=True)

    def start(self) -> None:
        if self.rate > 0:
            self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            next_at += interval
            try:
                self.step()
            except StoreError as exc:
                log.debug("simulated change refused: %s", exc.message)
            except Exception:
                log.exception("simulated change failed")
            self.done += 1
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)

    def _pick(self, sql: str, args=()) -> int | None:
        row = self.domain.db.execute(sql + " ORDER BY RANDOM() LIMIT 1", args).fetchone()
        return row[0] if row else None

    def step(self, action: str | None = None) -> str:
        rng, d = self.rng, self.domain
        action = action or rng.choices([a for a, _ in MIX], [w for _, w in MIX])[0]
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
        return action

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
