"""Webhook delivery the way WooCommerce does it.

* payload built at delivery time (the REST representation then), ``{"id": N}`` for ``deleted``;
* raw body = PHP ``wp_json_encode`` (``\\/`` and ``\\uXXXX`` escapes), signed base64(HMAC-SHA256);
* deliveries queued and sent asynchronously; an identical pending (webhook, resource id) delivery is
  not queued twice (coalescing);
* no retry; ``failed_delivery`` (includes/class-wc-webhook.php) counts a failure only while the
  count is at most 5 and disables the webhook when it is already above 5: the 7th consecutive
  failure disables it, leaving ``failure_count`` at 6.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import queue
import secrets
import threading
import time

import httpx

from .storage import Store

log = logging.getLogger("sandbox.webhooks")


def php_json(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/").encode()


def default_secret() -> str:
    """``wp_generate_password( 50, true, true )``: what the webhooks REST controller stores when no
    secret is given (class-wc-rest-webhooks-v1-controller.php create_item)."""
    chars = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" "!@#$%^&*()"
             "-_ []{}<>~`+=,.;:/?|")
    return "".join(secrets.choice(chars) for _ in range(50))


def sign(body: bytes, secret: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


class WebhookDeliverer:
    def __init__(self, store: Store, render, delay: float = 0.5, source_url: str = "http://sandbox.local/"):
        """``render(resource, id)`` returns the REST representation of a record, or None."""
        self.store, self.render, self.delay, self.source_url = store, render, delay, source_url
        self.queue: queue.Queue = queue.Queue()
        self.pending: set[tuple[int, int, str]] = set()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.client = httpx.Client(timeout=60, follow_redirects=False)
        self.delivered = 0
        self.thread = threading.Thread(target=self._run, name="webhooks", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def on_change(self, resource: str, event: str, record_id: int) -> None:
        topic = f"{resource}.{event}"
        rows = self.store.db.execute(
            "SELECT id, topic FROM webhooks WHERE status='active' AND topic=?", (topic,)).fetchall()
        for row in rows:
            key = (row["id"], record_id, event if event == "deleted" else "upsert")
            with self.lock:
                if key in self.pending:
                    continue  # coalesced: the pending delivery will carry the state at send time
                self.pending.add(key)
            self.queue.put((time.monotonic() + self.delay, row["id"], topic, record_id, key))

    def ping(self, webhook_id: int) -> None:
        row = self.store.db.execute("SELECT * FROM webhooks WHERE id=?", (webhook_id,)).fetchone()
        try:
            self.client.post(row["delivery_url"], content=f"webhook_id={webhook_id}".encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=5)
        except httpx.HTTPError:
            log.info("ping to %s failed", row["delivery_url"])

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                due, webhook_id, topic, record_id, key = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self.lock:
                self.pending.discard(key)
            try:
                self.deliver(webhook_id, topic, record_id)
            except Exception:  # a delivery bug must not kill the thread
                log.exception("webhook delivery failed")

    def deliver(self, webhook_id: int, topic: str, record_id: int) -> int | None:
        row = self.store.db.execute("SELECT * FROM webhooks WHERE id=?", (webhook_id,)).fetchone()
        if row is None or row["status"] != "active":
            return None
        resource, event = topic.split(".", 1)
        payload = {"id": record_id} if event == "deleted" else self.render(resource, record_id)
        if payload is None:
            payload = {"id": record_id}
        body = php_json(payload)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "WooCommerce/9.4.0 Hookshot (WordPress/6.7)",
            "X-WC-Webhook-Source": self.source_url,
            "X-WC-Webhook-Topic": topic,
            "X-WC-Webhook-Resource": resource,
            "X-WC-Webhook-Event": event,
            "X-WC-Webhook-Signature": sign(body, row["secret"]),
            "X-WC-Webhook-ID": str(webhook_id),
            "X-WC-Webhook-Delivery-ID": secrets.token_hex(16),
        }
        try:
            status = self.client.post(row["delivery_url"], content=body, headers=headers).status_code
        except httpx.HTTPError:
            status = 0
        with self.store.write_lock:
            if 200 <= status < 303:
                self.store.db.execute("UPDATE webhooks SET failure_count=0 WHERE id=?", (webhook_id,))
                self.delivered += 1
            else:
                self.store.db.execute(
                    "UPDATE webhooks SET failure_count=CASE WHEN failure_count > 5 THEN failure_count "
                    "ELSE failure_count+1 END, status=CASE WHEN failure_count > 5 THEN 'disabled' ELSE status END "
                    "WHERE id=?", (webhook_id,))
        return status
