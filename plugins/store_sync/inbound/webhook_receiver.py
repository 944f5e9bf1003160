"""Receive the store's webhooks: verify the signature over the raw body, record the event once.

Served by the Airflow api-server through ``plugins/store_webhooks_plugin.py`` at
``POST /store-webhooks/receive``; ``store_sync.store.webhooks`` registers it on the store. Events only say
"look at record N now": the customer cycle fetches the record itself, because a webhook's payload
may be stale or coalesced.

The api-server's event loop serves the whole Airflow UI and API, so nothing here blocks it: the body
is counted while it streams in (``413`` past ``STORE_WEBHOOK_MAX_BYTES``, 1 MiB by default, before a
byte is read when ``Content-Length`` says so), and the secret and CRM lookups (an Airflow connection,
maybe a secrets backend or the metadata database) run in a thread and are cached.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time

from fastapi import FastAPI, Request, Response

log = logging.getLogger(__name__)
ENTITY_OF_RESOURCE = {"order": "orders", "customer": "customers", "product": "products",
                      "subscription": "subscriptions", "coupon": "coupons"}
DEFAULT_MAX_BYTES = 1 << 20  # a customer is ~3 KB, a large order ~100 KB
MAX_ID = 10**18 - 1  # what migration 0010 and the customer scan accept as a store id
SECRET_CACHE_SECONDS = 30.0
_secret_cache: list = [0.0, None]


def max_body_bytes() -> int:
    from store_sync.store.config import as_number

    return as_number(os.environ.get("STORE_WEBHOOK_MAX_BYTES", DEFAULT_MAX_BYTES), "STORE_WEBHOOK_MAX_BYTES",
                     "environment", kind=int, minimum=1024)


def cached_secret() -> str | None:
    """The webhook secret (blocking lookup: call it in a thread), remembered for half a minute."""
    from store_sync.store.webhooks import webhook_secret

    stamp, value = _secret_cache
    if value is None or time.monotonic() - stamp > SECRET_CACHE_SECONDS:
        try:
            value = webhook_secret()
        except Exception as exc:  # no connection, or a backend that does not answer: refuse, say why
            log.error("store webhooks: cannot read the webhook secret (%s)", type(exc).__name__)
            value = None
        _secret_cache[:] = [time.monotonic(), value]
    return value


def valid_signature(raw_body: bytes, signature: str, secret: str) -> bool:
    mac = base64.b64encode(hmac.new(secret.encode(), raw_body, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(mac, signature or "")


def record_id(payload) -> int | None:
    """The store id an event is about, or None when it is missing or no positive integer."""
    value = payload.get("id") if isinstance(payload, dict) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and 0 < value <= MAX_ID else None


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ValueError("bad Content-Length")
        if int(declared) > limit:
            raise BodyTooLarge  # refused before a byte of the body is read
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies (or lying headers) are counted as they come
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app() -> FastAPI:
    app = FastAPI(title="Store webhooks", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/receive")
    async def receive(request: Request) -> Response:
        limit = max_body_bytes()
        try:
            raw = await read_body(request, limit)
        except BodyTooLarge:
            return Response(f"body larger than {limit} bytes", status_code=413)
        except ValueError:
            return Response("bad Content-Length", status_code=400)
        if raw.startswith(b"webhook_id="):
            return Response(status_code=200)  # the store's ping when a webhook is created
        secret = await asyncio.to_thread(cached_secret)
        if not secret:
            return Response("webhook secret not configured", status_code=503)
        if not valid_signature(raw, request.headers.get("x-wc-webhook-signature", ""), secret):
            return Response("bad signature", status_code=401)
        topic = request.headers.get("x-wc-webhook-topic", "")
        entity = ENTITY_OF_RESOURCE.get(request.headers.get("x-wc-webhook-resource", ""))
        if entity is None:
            return Response(status_code=202)  # a topic the package does not follow (action.*, …)
        delivery_id = request.headers.get("x-wc-webhook-delivery-id") or None
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"body": raw[:2000].decode("utf-8", "replace")}
        key = record_id(payload)
        if key is None:
            # Signed by the store, yet no usable id: kept aside with the reason, never in the customer
            # scan's way. Answered 2xx: a 4xx counts as a failed delivery, and failures disable the
            # webhook (class-wc-webhook.php, failed_delivery; store-api.md §5.3).
            await asyncio.to_thread(quarantine_event, entity, topic, delivery_id, payload)
            return Response("quarantined: no usable record id", status_code=202)
        fresh = await asyncio.to_thread(record_event, entity, str(key), topic, delivery_id)
        return Response(status_code=200, headers={} if fresh else {"X-Duplicate-Delivery": "1"})

    return app


def _write(sql: str, params: tuple) -> int:
    import psycopg

    from store_sync.crm.database import crm_dsn
    from store_sync.crm.migrations import migrate

    dsn = crm_dsn()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        try:
            return conn.execute(sql, params).rowcount
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidColumnReference):
            # The receiver can be first to touch a new (or not yet migrated) CRM database.
            migrate(dsn)
            return conn.execute(sql, params).rowcount


def record_event(entity: str, key: str, topic: str, delivery_id: str | None) -> bool:
    """Record one event; False when this delivery of this record was recorded before (a redelivery)."""
    return _write("INSERT INTO sync.webhook_event (entity, source_key, topic, delivery_id) VALUES (%s, %s, %s, %s) "
                  "ON CONFLICT (delivery_id, entity, source_key) WHERE delivery_id IS NOT NULL DO NOTHING",
                  (entity, key, topic, delivery_id)) == 1


def quarantine_event(entity: str, topic: str, delivery_id: str | None, payload) -> None:
    from psycopg.types.json import Jsonb

    raw_id = payload.get("id") if isinstance(payload, dict) else None
    reason = (f"webhook {topic or '?'}: " + ("the body has no record id" if raw_id is None
                                             else f"the record id {raw_id!r} is not a positive integer"))
    log.warning("store webhooks: %s (delivery %s); quarantined", reason, delivery_id)
    _write("INSERT INTO sync.quarantine (entity, source_key, reason, raw, run_id) VALUES (%s, %s, %s, %s, %s)",
           (entity, None if raw_id is None else str(raw_id)[:200], reason,
            Jsonb(payload if isinstance(payload, dict) else {"body": payload}), f"webhook:{delivery_id or '-'}"))
