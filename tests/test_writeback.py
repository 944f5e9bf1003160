"""Write-back through Airflow against the sandbox store: CRM requests reach the store exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from store_sync.crm.migrations import migrate
from store_sync.crm.transform import transform
from store_sync.inbound.detect import sync_entity
from store_sync.outbound.writeback import send
from store_sync.registry import entity
from tests.helpers import REPO


def quick(name: str):
    spec = entity(name)
    return type(spec)(**{**spec.__dict__, "overlap_seconds": 2, "children": ()})


def sync(dsn: str, client, *names: str) -> None:
    """What the watch DAGs and the transform DAG do: land the changes, apply them to the CRM."""
    time.sleep(1.1)  # past the second of the last change: the frozen upper bound of a cycle
    for name in names:
        sync_entity(dsn, client, quick(name), f"sync-{name}-{time.monotonic()}")
    transform(dsn)


@pytest.fixture
def shop(wired, sandbox_factory):
    """A store of its own, its orders and subscriptions in the CRM, the connections pointed at both."""

    def make(*extra: str, size: str = "tiny"):
        sandbox = sandbox_factory(size=size, seed=21, extra=list(extra))
        dsn = wired(sandbox)
        migrate(dsn)
        client = sandbox.client(max_retries=10)
        sync(dsn, client, "orders", "subscriptions")
        return sandbox, dsn, client

    return make


def outbox(dsn: str, request_id: int) -> dict:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM sync.outbox WHERE request_id=%s", (request_id,))
        return dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))


def ask(dsn: str, sql: str, *args) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchone()[0]


def first(client, endpoint: str, status: str) -> dict:
    return client.get(endpoint, {"status": status, "per_page": 1, "orderby": "id", "order": "asc"})[0]


def test_an_order_status_change_reaches_the_store_and_comes_back(dagbag, shop):
    sandbox, dsn, client = shop()
    order = first(client, "orders", "processing")
    rid = ask(dsn, "SELECT crm.request_order_status(%s, 'completed', 'Shipped with DHL 123')", order["id"])
    with psycopg.connect(dsn) as conn:  # the CRM shows the store's state until the store confirms
        assert conn.execute("SELECT status FROM crm.sales_order WHERE id=%s", (order["id"],)).fetchone()[0] == "processing"
    run = dagbag.get_dag("crm_writeback").test()
    assert run.state == "success"
    assert outbox(dsn, rid)["state"] == "applied"
    at_store = client.get(f"orders/{order['id']}")
    assert at_store["status"] == "completed" and at_store["date_completed_gmt"]
    notes = [n["note"] for n in client.get(f"orders/{order['id']}/notes")]
    assert "Order status changed from Processing to Completed." in notes
    assert any(n.startswith("Shipped with DHL 123") and f"[CRM request {rid}]" in n for n in notes)
    sync(dsn, client, "orders")
    with psycopg.connect(dsn) as conn:
        status, completed = conn.execute("SELECT status, date_completed FROM crm.sales_order WHERE id=%s",
                                         (order["id"],)).fetchone()
    assert status == "completed" and completed is not None
    dagbag.get_dag("crm_writeback_manual").test(run_conf={"request_ids": [rid]})
    assert outbox(dsn, rid)["confirmed_at"] is not None
    assert sum("Order status changed" in n["note"] for n in client.get(f"orders/{order['id']}/notes")) == \
        sum("Order status changed" in n for n in notes), "a second run writes nothing more"


def test_a_subscription_put_on_hold_and_reactivated(shop):
    sandbox, dsn, client = shop()
    sub = first(client, "subscriptions", "active")
    hold = ask(dsn, "SELECT crm.request_subscription_status(%s, 'on-hold', 'customer asked for a pause')", sub["id"])
    send(dsn, client)
    assert outbox(dsn, hold)["state"] == "applied"
    assert client.get(f"subscriptions/{sub['id']}")["status"] == "on-hold"
    sync(dsn, client, "subscriptions")
    again = ask(dsn, "SELECT crm.request_subscription_status(%s, 'active', NULL)", sub["id"])
    send(dsn, client)
    assert outbox(dsn, again)["state"] == "applied"
    at_store = client.get(f"subscriptions/{sub['id']}")
    assert at_store["status"] == "active" and at_store["next_payment_date_gmt"]


def test_a_refused_transition_is_recorded_with_the_stores_message(shop):
    sandbox, dsn, client = shop()
    sub = first(client, "subscriptions", "cancelled")
    rid = ask(dsn, "SELECT crm.request_subscription_status(%s, 'active', NULL)", sub["id"])
    send(dsn, client)
    row = outbox(dsn, rid)
    assert row["state"] == "rejected"
    assert 'Unable to change subscription status to "active"' in row["last_error"]
    assert client.get(f"subscriptions/{sub['id']}")["status"] == "cancelled"


def test_a_refund_requested_in_the_crm_is_created_at_the_store(shop):
    sandbox, dsn, client = shop()
    order = first(client, "orders", "completed")
    before = len(client.get(f"orders/{order['id']}/refunds"))
    rid = ask(dsn, "SELECT crm.request_refund(%s, 1.50, 'damaged box')", order["id"])
    send(dsn, client)
    send(dsn, client)  # a second pass finds it done
    row = outbox(dsn, rid)
    assert row["state"] == "applied" and row["result"]["refund_id"]
    refunds = client.get(f"orders/{order['id']}/refunds")
    assert len(refunds) == before + 1
    assert refunds[0]["amount"] == "1.50" and "damaged box" in refunds[0]["reason"]
    too_much = ask(dsn, "SELECT crm.request_refund(%s, 1000000, 'oops')", order["id"])
    send(dsn, client)
    assert outbox(dsn, too_much)["state"] == "rejected"
    assert "Invalid refund amount" in outbox(dsn, too_much)["last_error"]


def test_a_change_made_at_the_store_meanwhile_is_a_conflict(shop):
    sandbox, dsn, client = shop()
    order = first(client, "orders", "processing")
    rid = ask(dsn, "SELECT crm.request_order_status(%s, 'completed', NULL)", order["id"])
    client.put(f"orders/{order['id']}", {"status": "on-hold"})  # a shop manager, at the same time
    send(dsn, client)
    row = outbox(dsn, rid)
    assert row["state"] == "conflict"
    assert row["based_on"] == {"status": "processing"} and row["store_version"]["status"] == "on-hold"
    assert client.get(f"orders/{order['id']}")["status"] == "on-hold", "the store's change stands"
    assert ask(dsn, "SELECT count(*) FROM sync.outbox_conflicts WHERE request_id=%s", rid) == 1


def test_dry_run_reports_and_changes_nothing(dagbag, shop):
    sandbox, dsn, client = shop()
    order = first(client, "orders", "processing")
    rid = ask(dsn, "SELECT crm.request_order_status(%s, 'on-hold', NULL)", order["id"])
    run = dagbag.get_dag("crm_writeback_manual").test(run_conf={"request_ids": [rid], "dry_run": True})
    assert run.state == "success"
    assert outbox(dsn, rid)["state"] == "pending"
    assert client.get(f"orders/{order['id']}")["status"] == "processing"


def test_250_requests_in_3_batch_calls_through_faults(shop):
    # 5xx, gateway timeouts and 429 while writing: retried, each change applied once.
    sandbox, dsn, client = shop("--faults", "500=0.1,502=0.05,429=0.1", "--slow-seconds", "0.2", size="small")
    with psycopg.connect(dsn) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM crm.sales_order WHERE status='processing' ORDER BY id LIMIT 250")]
        assert len(ids) == 250
        for oid in ids:
            conn.execute("SELECT crm.request_order_status(%s, 'completed', NULL)", (oid,))
    calls = []
    real = client.post

    def counting(endpoint, body, **kwargs):
        calls.append(endpoint)
        return real(endpoint, body, **kwargs)

    client.post = counting
    counts = send(dsn, client)
    assert calls.count("orders/batch") >= 3 and counts["batch_calls"] == 3
    with psycopg.connect(dsn) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM sync.outbox GROUP BY 1").fetchall())
    assert states == {"applied": 250}
    found = {o["id"]: o for o in client.get("orders", {"include": ",".join(map(str, ids[:100])), "per_page": 100})}
    assert all(o["status"] == "completed" for o in found.values())
    notes = client.get(f"orders/{ids[0]}/notes")
    assert sum("to Completed" in n["note"] for n in notes) == 1


def test_killed_after_the_store_applied_then_rerun_applies_once(shop, tmp_path):
    # Every write is applied at once and answered 5 s late: the task dies while it waits.
    sandbox, dsn, client = shop("--faults", "late=1.0", "--slow-seconds", "5")
    order = first(client, "orders", "processing")
    rid = ask(dsn, "SELECT crm.request_order_status(%s, 'completed', NULL)", order["id"])
    script = tmp_path / "send.py"
    script.write_text("from store_sync.store.hooks import StoreApiHook\nfrom store_sync.tasks import crm_dsn\n"
                      "from store_sync.outbound.writeback import send\nsend(crm_dsn(), StoreApiHook().get_client())\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'plugins'}:{REPO}"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while client.get(f"orders/{order['id']}")["status"] != "completed":
            assert time.monotonic() < deadline, "the store never got the write"
            time.sleep(0.1)
        assert outbox(dsn, rid)["state"] == "sent", "killed before the CRM could record the answer"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with psycopg.connect(dsn, autocommit=True) as conn:  # the lease of the dead task runs out
        conn.execute("UPDATE sync.outbox SET sent_at = now() - interval '10 minutes' WHERE request_id=%s", (rid,))
    counts = send(dsn, client)
    row = outbox(dsn, rid)
    assert row["state"] == "applied" and row["result"] == {"found": "marker"}
    assert counts["sent"] == 0, "nothing is written a second time"
    notes = client.get(f"orders/{order['id']}/notes")
    assert sum("Order status changed from Processing to Completed." == n["note"] for n in notes) == 1
    assert json.dumps(row["change"]) == '{"status": "completed"}'


def test_requests_are_checked_when_made(shop):
    sandbox, dsn, client = shop()
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT crm.request_order_status(1, 'shipped', NULL)")
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.NoDataFound):
        conn.execute("SELECT crm.request_order_status(999999, 'completed', NULL)")


def test_timeouts_on_writes_apply_each_change_once(shop):
    # The store applies every write and answers 3 s late; the client gives up after 1 s, three times.
    sandbox, dsn, client = shop("--faults", "late=1.0", "--slow-seconds", "3")
    impatient = sandbox.client(timeout=1, max_retries=2)
    orders = client.get("orders", {"status": "processing", "per_page": 3, "orderby": "id", "order": "asc"})
    asked = [ask(dsn, "SELECT crm.request_order_status(%s, 'on-hold', NULL)", o["id"]) for o in orders]
    first_pass = send(dsn, impatient)
    assert first_pass["retry"] == len(asked) and first_pass["applied"] == 0
    assert all(client.get(f"orders/{o['id']}")["status"] == "on-hold" for o in orders), "the store did apply them"
    with psycopg.connect(dsn, autocommit=True) as conn:  # the backoff runs out
        conn.execute("UPDATE sync.outbox SET next_attempt_at = now()")
    second = send(dsn, impatient)
    assert second["sent"] == 0 and second["applied"] == len(asked), "recognised by the marker, not written again"
    assert all(outbox(dsn, rid)["state"] == "applied" for rid in asked)
    for o in orders:
        notes = client.get(f"orders/{o['id']}/notes")
        assert sum(n["note"] == "Order status changed from Processing to On hold." for n in notes) == 1
