"""Receive the store's webhooks: verify the signature over the raw body, record the event.

Served by the Airflow api-server through ``plugins/store_webhooks_plugin.py`` at
``POST /store-webhooks/receive``. The secret is ``STORE_WEBHOOK_SECRET`` (or the ``webhook_secret``
extra of the ``store_api`` connection). Events only say "look at record N now": the sensors fetch
the record itself, because a webhook's payload may be stale or coalesced.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os

from fastapi import FastAPI, Request, Response

log = logging.getLogger(__name__)
ENTITY_OF_RESOURCE = {"order": "orders", "customer": "customers", "product": "products",
                      "subscription": "subscriptions", "coupon": "coupons"}


def webhook_secret() -> str | None:
    if secret := os.environ.get("STORE_WEBHOOK_SECRET"):
        return secret
    try:
        from store_sync.hooks import StoreApiHook

        return StoreApiHook.get_connection("store_api").extra_dejson.get("webhook_secret")
    except Exception:
        return None


def valid_signature(raw_body: bytes, signature: str, secret: str) -> bool:
    mac = base64.b64encode(hmac.new(secret.encode(), raw_body, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(mac, signature or "")


def create_app() -> FastAPI:
    app = FastAPI(title="Store webhooks", docs_url=None, redoc_url=None)

    @app.post("/receive")
    async def receive(request: Request) -> Response:
        raw = await request.body()
        if raw.startswith(b"webhook_id="):
            return Response(status_code=200)  # the store's ping when a webhook is created
        secret = webhook_secret()
        if not secret or not valid_signature(raw, request.headers.get("x-wc-webhook-signature", ""), secret):
            return Response("bad signature", status_code=401)
        resource = request.headers.get("x-wc-webhook-resource", "")
        entity = ENTITY_OF_RESOURCE.get(resource)
        try:
            record_id = json.loads(raw).get("id")
        except ValueError:
            return Response("not JSON", status_code=400)
        if entity is None or record_id is None:
            return Response(status_code=202)
        from asgiref.sync import sync_to_async

        await sync_to_async(record_event)(entity, str(record_id), request.headers.get("x-wc-webhook-topic", ""),
                                          request.headers.get("x-wc-webhook-delivery-id"))
        return Response(status_code=200)

    return app


def record_event(entity: str, key: str, topic: str, delivery_id: str | None) -> None:
    import psycopg

    from store_sync.migrations import migrate
    from store_sync.tasks import crm_dsn

    dsn = crm_dsn()
    sql = "INSERT INTO sync.webhook_event (entity, source_key, topic, delivery_id) VALUES (%s, %s, %s, %s)"
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(sql, (entity, key, topic, delivery_id))
        except psycopg.errors.UndefinedTable:  # the receiver can be first to touch a new CRM database
            migrate(dsn)
            conn.execute(sql, (entity, key, topic, delivery_id))


def register(client, delivery_url: str, secret: str, topics=("customer.created", "customer.updated",
                                                             "customer.deleted")) -> list[int]:
    """Create (once) the store webhooks that point at our receiver."""
    existing = {(w["topic"], w["delivery_url"]) for w in client.get("webhooks")}
    made = []
    for topic in topics:
        if (topic, delivery_url) not in existing:
            made.append(client.post("webhooks", {"name": f"CRM sync {topic}", "topic": topic,
                                                 "delivery_url": delivery_url, "secret": secret})["id"])
    return made
