"""Store webhooks: the receiver on the api-server (size limit, event loop, one record per delivery,
bad ids quarantined, pruning) and the registration on the store (create, re-enable, never twice),
over real HTTP, a real CRM database and the sandbox store's own deliveries."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time

import psycopg
import pytest

from store_sync.crm.migrations import migrate
from tests.helpers import free_port

SECRET = "test-webhook-secret-value"


def sign(body: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def headers_for(body: bytes, topic: str = "customer.updated", delivery: str | None = "d-1") -> dict:
    out = {"Content-Type": "application/json", "X-WC-Webhook-Topic": topic,
           "X-WC-Webhook-Resource": topic.split(".")[0], "X-WC-Webhook-Event": topic.split(".")[1],
           "X-WC-Webhook-Signature": sign(body), "X-WC-Webhook-ID": "7"}
    if delivery:
        out["X-WC-Webhook-Delivery-ID"] = delivery
    return out


class Receiver:
    """The receiver app under uvicorn on a loopback port, as the api-server serves it."""

    def __init__(self) -> None:
        import uvicorn

        import store_sync.store.hooks  # noqa: F401 - Airflow imported already, as in the api-server
        from store_sync.inbound.webhook_receiver import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/receive"
        self.server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def crm(crm_dsn, monkeypatch, sandbox):
    from store_sync.crm import database as crm_database
    from store_sync.inbound import webhook_receiver

    migrate(crm_dsn)
    monkeypatch.setenv("CRM_DATABASE_URL", crm_dsn)
    monkeypatch.delenv("STORE_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_STORE_API", json.dumps({
        "conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox",
        "extra": {"webhook_secret": SECRET}}))
    crm_database._cache.clear()
    webhook_receiver._secret_cache[:] = [0.0, None]
    yield crm_dsn
    webhook_receiver._secret_cache[:] = [0.0, None]


@pytest.fixture
def receiver(crm):
    r = Receiver()
    yield r
    r.stop()


def rows(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


# -- the receiver ----------------------------------------------------------------------------------
def test_a_declared_oversized_body_is_refused_before_it_is_read(receiver):
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as s:
        s.sendall(b"POST /receive HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 50000000\r\n\r\n")  # and not one byte of the 50 MB
        started = time.monotonic()
        answer = s.recv(200)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert time.monotonic() - started < 3


def test_a_streamed_oversized_body_is_cut_off_at_the_limit(receiver, monkeypatch):
    import requests

    monkeypatch.setenv("STORE_WEBHOOK_MAX_BYTES", "4096")
    sent = {"bytes": 0}

    def chunks():  # chunked transfer: no Content-Length to trust
        for _ in range(1000):
            sent["bytes"] += 1024
            yield b"x" * 1024

    answer = requests.post(receiver.url, data=chunks(), headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 413


def test_each_delivery_is_recorded_once(receiver, crm):
    import requests

    body = json.dumps({"id": 5, "first_name": "A"}).encode()
    for _ in range(2):  # the same delivery twice (a proxy's retry)
        assert requests.post(receiver.url, data=body, headers=headers_for(body, delivery="same"), timeout=5).ok
    # The delivery id is wp_hash(webhook id . time()) in whole seconds: another customer delivered in the
    # same second by the same webhook carries the same id, and is another event.
    other = json.dumps({"id": 6}).encode()
    assert requests.post(receiver.url, data=other, headers=headers_for(other, delivery="same"), timeout=5).ok
    assert sorted(rows(crm, "SELECT source_key FROM sync.webhook_event")) == [("5",), ("6",)]


@pytest.mark.parametrize("payload,why", [({"id": "abc"}, "'abc' is not a positive integer"),
                                         ({"first_name": "no id"}, "no record id"),
                                         ({"id": -3}, "-3 is not a positive integer")])
def test_a_signed_event_without_a_usable_id_is_quarantined_and_the_customer_cycle_goes_on(
        receiver, crm, sandbox, payload, why):
    import requests

    from store_sync.tasks import land_entity

    body = json.dumps(payload).encode()
    answer = requests.post(receiver.url, data=body, headers=headers_for(body, delivery=f"bad-{why[:3]}"), timeout=5)
    assert answer.status_code < 300  # a 4xx counts toward the store disabling the webhook
    quarantined = rows(crm, "SELECT entity, reason, raw FROM sync.quarantine")
    assert len(quarantined) == 1 and quarantined[0][0] == "customers" and why in quarantined[0][1]
    assert quarantined[0][2] == payload
    assert rows(crm, "SELECT count(*) FROM sync.webhook_event") == [(0,)]
    counts = land_entity("customers", "after-a-bad-webhook")  # used to die on source_key::bigint
    assert counts["landed"] > 0


def test_bad_events_recorded_before_the_fix_are_moved_to_quarantine(crm):
    """Migration 0010 on a CRM that already holds an event the customer scan cannot cast."""
    from store_sync.tasks import land_entity

    with psycopg.connect(crm, autocommit=True) as conn:  # the CRM as it was before 0010
        conn.execute("DELETE FROM sync.schema_migration WHERE version LIKE '0010%'")
        conn.execute("DROP INDEX sync.webhook_event_delivery_once")
        conn.execute("INSERT INTO sync.webhook_event (entity, source_key, topic, delivery_id) VALUES "
                     "('customers', 'abc', 'customer.updated', 'x'), ('customers', '3', 'customer.updated', 'y'), "
                     "('customers', '3', 'customer.updated', 'y')")
    migrate(crm)
    assert rows(crm, "SELECT source_key FROM sync.webhook_event") == [("3",)]
    assert rows(crm, "SELECT source_key FROM sync.quarantine") == [("abc",)]
    assert land_entity("customers", "after-migration")["landed"] > 0


def test_slow_connection_lookups_do_not_stall_the_api_servers_event_loop(crm, monkeypatch):
    """The secret lives in a connection (a secrets backend or the metadata database): a slow answer must
    not freeze every other request the api-server is serving."""
    import httpx

    from store_sync.inbound.webhook_receiver import create_app
    from store_sync.store.hooks import StoreApiHook

    real = StoreApiHook.get_connection.__func__

    def slow(cls, conn_id):
        time.sleep(1.0)  # a secrets backend taking its time
        return real(cls, conn_id)

    monkeypatch.setattr(StoreApiHook, "get_connection", classmethod(slow))
    body = json.dumps({"id": 9}).encode()

    async def scenario() -> tuple[float, int]:
        gaps, stop = [], asyncio.Event()

        async def heartbeat():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)  # the heartbeat is ticking before the request starts
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app()), base_url="http://t") as client:
            answer = await client.post("/receive", content=body, headers=headers_for(body))
        stop.set()
        await beat
        return max(gaps), answer.status_code

    longest, status = asyncio.run(scenario())
    assert status == 200
    assert longest < 0.5, f"the event loop stood still for {longest:.2f}s"


def test_consumed_events_are_pruned_after_their_days(crm):
    from store_sync.store.webhooks import prune_events

    with psycopg.connect(crm, autocommit=True) as conn:
        conn.execute("INSERT INTO sync.webhook_event (event_id, entity, source_key, topic, received_at) VALUES "
                     "(1, 'customers', '1', 'customer.updated', now() - interval '9 days'), "   # consumed, old
                     "(2, 'customers', '2', 'customer.updated', now() - interval '9 days'), "   # old, not yet read
                     "(3, 'customers', '3', 'customer.updated', now()), "                       # fresh
                     "(4, 'orders', '4', 'order.updated', now() - interval '9 days')")          # nobody reads these
        conn.execute("INSERT INTO sync.watermark (entity, state) VALUES ('customers', '{\"webhook_event_id\": 1}')")
    assert prune_events(crm, keep_days=7) == 2
    assert rows(crm, "SELECT event_id FROM sync.webhook_event ORDER BY 1") == [(2,), (3,)]


# -- registration on the store ---------------------------------------------------------------------
def _store(monkeypatch, sandbox, **extra) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_STORE_API", json.dumps({
        "conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox", "extra": extra}))


def test_without_a_public_url_webhooks_are_off_and_the_log_says_so(monkeypatch, writable_sandbox, caplog):
    from store_sync.store.webhooks import register_webhooks

    _store(monkeypatch, writable_sandbox, webhook_secret=SECRET)
    with caplog.at_level("WARNING"):
        assert register_webhooks() == {"status": "off"}
    assert "webhooks are OFF" in caplog.text and "customer scan" in caplog.text
    assert writable_sandbox.client().get("webhooks") == []


def test_registration_creates_re_enables_and_never_duplicates(monkeypatch, writable_sandbox, caplog):
    from store_sync.store.webhooks import TOPICS, register_webhooks

    _store(monkeypatch, writable_sandbox, webhook_url="http://127.0.0.1:9/", webhook_secret=SECRET)
    client = writable_sandbox.client()
    with caplog.at_level("DEBUG"):
        first = register_webhooks()
    assert first["delivery_url"] == "http://127.0.0.1:9/store-webhooks/receive" and len(first["created"]) == 3
    hooks = client.get("webhooks")
    assert sorted(h["topic"] for h in hooks) == sorted(TOPICS) and {h["status"] for h in hooks} == {"active"}

    again = register_webhooks()
    assert again["created"] == [] and sorted(again["kept"]) == sorted(first["created"])
    assert len(client.get("webhooks")) == 3

    # The store disables a webhook after failed deliveries; an older tool left a copy behind.
    client.put(f"webhooks/{first['created'][0]}", {"status": "disabled"})
    copy = client.post("webhooks", {"name": "copy", "topic": TOPICS[1], "delivery_url": first["delivery_url"],
                                    "secret": SECRET})
    healed = register_webhooks()
    assert healed["enabled"] == [first["created"][0]] and healed["removed"] == [copy["id"]]
    hooks = client.get("webhooks")
    assert len(hooks) == 3 and {h["status"] for h in hooks} == {"active"}
    assert SECRET not in caplog.text


def test_a_url_without_a_secret_is_a_configuration_error(monkeypatch, writable_sandbox):
    from store_sync.store.config import ConfigError
    from store_sync.store.webhooks import register_webhooks

    monkeypatch.delenv("STORE_WEBHOOK_SECRET", raising=False)
    _store(monkeypatch, writable_sandbox, webhook_url="https://airflow.example.com")
    with pytest.raises(ConfigError, match="webhook_secret"):
        register_webhooks()


def test_a_customer_renamed_in_the_store_reaches_the_inbox_through_the_registered_webhook(
        receiver, crm, monkeypatch, sandbox_factory):
    """The whole path: registration, the store's signed delivery, the receiver, the customer cycle."""
    from store_sync.store.webhooks import register_webhooks
    from store_sync.tasks import land_entity
    from tests.helpers import latest

    store = sandbox_factory(size="tiny", seed=21, extra=["--webhook-delay", "0.1"])
    _store(monkeypatch, store, webhook_url=f"http://127.0.0.1:{receiver.port}", webhook_secret=SECRET)
    # The app is mounted at /store-webhooks on the api-server; here it is served at the root.
    monkeypatch.setattr("store_sync.store.webhooks.RECEIVER_PATH", "/receive")
    assert register_webhooks()["status"] == "on"
    land_entity("customers", "first-load")
    client = store.client()
    customer = client.get("customers", {"per_page": 1})[0]
    client.put(f"customers/{customer['id']}", {"first_name": "Renamed"})
    deadline = time.monotonic() + 10
    while not rows(crm, f"SELECT 1 FROM sync.webhook_event WHERE source_key = '{customer['id']}'"):
        assert time.monotonic() < deadline, "the store's webhook never reached the receiver"
        time.sleep(0.1)
    land_entity("customers", "after-the-webhook")  # the id came by webhook, not by the 10-minute scan
    assert latest(crm, "customers")[str(customer["id"])][0]["first_name"] == "Renamed"


# -- the DAG -----------------------------------------------------------------------------------------
def test_register_dag_runs_through_airflow_and_reruns_change_nothing(dagbag, crm_dsn, monkeypatch, writable_sandbox):
    monkeypatch.setenv("CRM_DATABASE_URL", crm_dsn)
    _store(monkeypatch, writable_sandbox, webhook_url="http://127.0.0.1:9", webhook_secret=SECRET)
    dag = dagbag.get_dag("store_register_webhooks")
    assert dag.test().state == "success"
    assert dag.test().state == "success"
    assert len(writable_sandbox.client().get("webhooks")) == 3
    with psycopg.connect(crm_dsn) as conn:  # the prune task migrated and ran against the CRM
        assert conn.execute("SELECT count(*) FROM sync.schema_migration WHERE version LIKE '0010%'").fetchone()[0] == 1
