"""Landing over the sandbox store and a real PostgreSQL: nothing lost, nothing doubled."""

from __future__ import annotations

import time

import psycopg
import pytest

from store_sync.crm.migrations import migrate
from store_sync.inbound.detect import reconcile_deletes, sync_entity
from store_sync.registry import entities, entity
from tests.helpers import assert_inbox_matches_truth, latest

WINDOWED = ["orders", "refunds", "subscriptions", "products"]


@pytest.fixture
def crm(crm_dsn):
    migrate(crm_dsn)
    return crm_dsn


def test_migrations_are_idempotent(crm):
    assert migrate(crm) == []


def test_initial_load_lands_every_record_of_a_small_store(crm, sandbox_factory):
    sandbox = sandbox_factory(size="small", seed=4)
    client = sandbox.client()
    for name in entities():
        counts = sync_entity(crm, client, entity(name), "initial")
        assert counts["status"] == "success"
    for name in WINDOWED:
        assert_inbox_matches_truth(crm, sandbox, name)
    truth_customers = {str(c["id"]) for c in sandbox.export("customers")}
    assert truth_customers <= set(latest(crm, "customers"))
    with psycopg.connect(crm) as conn:
        runs = conn.execute("SELECT entity, records_read, landed, status FROM sync.landing_run WHERE run_id='initial'").fetchall()
        assert {r[0] for r in runs} == set(entities()) and all(r[3] == "success" for r in runs)
        orders_run = next(r for r in runs if r[0] == "orders")
        assert orders_run[2] == len(sandbox.export("orders"))
    # A second cycle lands nothing new: identical payloads are skipped.
    again = sync_entity(crm, client, entity("orders"), "again")
    assert again["landed"] == 0


def test_changes_faults_and_shifting_pages_lose_nothing(crm, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=6, extra=[
        "--changes-per-second", "40", "--faults", "429=0.05,500=0.05,502=0.02,truncated=0.03,shift=0.3",
        "--slow-seconds", "0.05"])
    client = sandbox.client(max_retries=15)
    orders = entity("orders")
    small_pages = type(orders)(**{**orders.__dict__, "per_page": 7})  # many pages, so pages shift under us
    deadline = time.monotonic() + 8
    cycle = 0
    while time.monotonic() < deadline or cycle < 3:
        sync_entity(crm, client, small_pages, f"live-{cycle}")
        cycle += 1
    # Stop the simulator, let the last changes settle past the frozen upper bound, catch up.
    sandbox.stop()
    still = sandbox_factory(size="tiny", seed=6, fresh=False, db=sandbox.db, port=sandbox.port)
    time.sleep(orders.settle_seconds + 1)
    sync_entity(crm, still.client(), small_pages, "final")
    assert cycle >= 3
    assert_inbox_matches_truth(crm, still, "orders")


def test_bad_records_are_quarantined_while_neighbours_land(crm):
    from store_sync.inbound.landing import land_page

    orders = entity("orders")
    good = {"id": 1, "status": "processing", "date_modified_gmt": "2026-01-01T10:00:00", "total": "10.00",
            "customer_id": 0, "line_items": [], "meta_data": []}
    bad_total = {**good, "id": 2, "total": "ten euros"}
    no_id = {k: v for k, v in good.items() if k != "id"}
    with psycopg.connect(crm) as conn, conn.transaction():
        result = land_page(conn, orders, [good, bad_total, no_id, {**good, "id": 3}], "q1")
    assert (result.landed, result.quarantined) == (2, 2)
    with psycopg.connect(crm) as conn:
        rows = conn.execute("SELECT source_key, reason, raw->>'total' FROM sync.quarantine ORDER BY quarantine_id").fetchall()
        assert rows[0][0] == "2" and "total" in rows[0][1] and rows[0][2] == "ten euros"
        assert rows[1][0] is None and "id" in rows[1][1]
        assert {r[0] for r in conn.execute("SELECT source_key FROM inbox.record")} == {"1", "3"}


def test_killed_run_resumes_without_loss_or_duplicates(crm, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=7)
    orders = entity("orders")
    small_pages = type(orders)(**{**orders.__dict__, "per_page": 5})
    client = sandbox.client()
    calls = {"n": 0}
    real = client.get_page

    def dies_on_fourth_page(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("worker killed")
        return real(*args, **kwargs)

    client.get_page = dies_on_fourth_page
    with pytest.raises(KeyboardInterrupt):
        sync_entity(crm, client, small_pages, "killed")
    with psycopg.connect(crm) as conn:
        partial = conn.execute("SELECT count(*) FROM inbox.record").fetchone()[0]
        cursor = conn.execute("SELECT cursor_at, state->'progress' FROM sync.watermark WHERE entity='orders'").fetchone()
    assert 0 < partial < len(sandbox.export("orders")) and cursor[0] is None and cursor[1]["t0"]
    rerun_client = sandbox.client()
    asked = []
    real_rerun = rerun_client.get_page

    def recording(endpoint, params, *args, **kwargs):
        asked.append(dict(params))
        return real_rerun(endpoint, params, *args, **kwargs)

    rerun_client.get_page = recording
    rerun = sync_entity(crm, rerun_client, small_pages, "rerun")
    assert asked[0].get("modified_after") == cursor[1]["lo"], "the rerun must resume where the killed run stopped"
    assert asked[0]["modified_before"] == cursor[1]["t0"], "... inside the same frozen window"
    assert rerun["landed"] + partial == len(sandbox.export("orders"))
    assert_inbox_matches_truth(crm, sandbox, "orders")


def test_trash_and_hard_deletes_land_as_delete_events(crm, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=8)
    client = sandbox.client()
    sync_entity(crm, client, entity("orders"), "first")
    ids = [o["id"] for o in client.get("orders", {"status": "completed", "per_page": 2})]
    client.request("DELETE", f"orders/{ids[0]}")
    client.request("DELETE", f"orders/{ids[1]}", {"force": "true"})
    time.sleep(entity("orders").settle_seconds + 1.1)
    sync_entity(crm, client, entity("orders"), "second")
    reconcile_deletes(crm, client, entity("orders"), "reconcile")
    landed = latest(crm, "orders")
    assert landed[str(ids[0])][1] is True and landed[str(ids[0])][0]["status"] == "trash"
    with psycopg.connect(crm) as conn:
        gone = conn.execute("SELECT payload FROM inbox.record WHERE entity='orders' AND source_key=%s AND is_delete "
                            "AND payload ? 'deleted'", (str(ids[1]),)).fetchall()
    assert gone == [({"id": ids[1], "deleted": True},)]


def test_rereading_products_lands_no_new_version_though_related_ids_are_shuffled(crm, sandbox_factory):
    """A real store shuffles related_ids on every read (and the sandbox does too): the registry calls
    them volatile, so a second read of unchanged products (a backfill over the same window) lands
    nothing, the payload keeps the field as read, and a real change still lands."""
    from datetime import UTC, datetime, timedelta

    from store_sync.inbound.backfill import run_backfill

    sandbox = sandbox_factory(size="tiny", seed=9)
    client = sandbox.client()
    products = entity("products")
    assert "related_ids" in products.volatile
    first = sync_entity(crm, client, products, "first")
    assert first["landed"] > 0
    shuffled = [p["related_ids"] for p in client.get("products", {"per_page": 100, "orderby": "id"})]
    reread = [p["related_ids"] for p in client.get("products", {"per_page": 100, "orderby": "id"})]
    assert shuffled != reread, "the sandbox shuffles related_ids per read, as a real store does"
    since = datetime.now(UTC) - timedelta(days=3 * 365)  # older than any generated record
    versions = product_versions(crm)
    again = run_backfill(crm, client, products, "again", since=since, chunk_hours=24 * 4000)
    assert again["read"] > 0 and again["landed"] == 0
    assert product_versions(crm) == versions
    landed = latest(crm, "products")
    assert all("related_ids" in payload for payload, _ in landed.values() if payload["type"] != "variation")
    # A real change of one product lands one new version.
    target = next(p for p in client.get("products", {"per_page": 5, "type": "simple"}))
    client.put(f"products/{target['id']}", {"regular_price": "123.45"})
    time.sleep(1.1)  # past the whole second of the change, so the window holds it
    changed = run_backfill(crm, client, products, "changed", since=since, chunk_hours=24 * 4000)
    assert changed["landed"] == 1 and product_versions(crm) == versions + 1
    assert latest(crm, "products")[str(target["id"])][0]["regular_price"] == "123.45"


def product_versions(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM inbox.record WHERE entity = 'products'").fetchone()[0]


def test_the_delete_reconciliation_waits_for_the_first_load(crm, wired, sandbox_factory):
    """Before an entity's first load has finished there is nothing landed to compare: the hourly
    reconciliation (which lists every id) skips it instead of taking requests from the first load; after
    it, a delete for good is found (in the reconcile lane of the store's budget)."""
    from store_sync.tasks import reconcile_entity

    sandbox = sandbox_factory(size="tiny", seed=9)
    wired(sandbox)
    skipped = reconcile_entity("orders", "too-early")
    with psycopg.connect(crm) as conn:
        runs = conn.execute("SELECT count(*) FROM sync.landing_run WHERE run_id = 'too-early'").fetchone()[0]
    assert skipped["status"] == "skipped" and "first load" in skipped["reason"] and runs == 0
    client = sandbox.client()
    sync_entity(crm, client, entity("orders"), "first")
    doomed = client.get("orders", {"per_page": 1})[0]["id"]
    client.request("DELETE", f"orders/{doomed}", {"force": "true"})
    assert reconcile_entity("orders", "after")["status"] == "success"
    assert latest(crm, "orders")[str(doomed)][1] is True, "the delete for good, found"
    with psycopg.connect(crm) as conn:
        lanes = {r[0] for r in conn.execute("SELECT lane FROM sync.store_budget")}
    assert "reconcile" in lanes, "its requests spent the reconcile lane"


def test_documents_up_to_a_page_are_kept_uncompressed(crm, sandbox_factory):
    """An order (~3 kB) is stored inline without pglz (0055): no compression on landing, none to undo in
    every transform batch; only documents past a page are still compressed."""
    sandbox = sandbox_factory(size="tiny", seed=10)
    sync_entity(crm, sandbox.client(), entity("orders"), "first")
    with psycopg.connect(crm) as conn:
        small, compressed = conn.execute(
            "SELECT count(*) FILTER (WHERE pg_column_size(payload) BETWEEN 2100 AND 7000), "
            "count(*) FILTER (WHERE pg_column_size(payload) <= 7000 AND pg_column_compression(payload) IS NOT NULL) "
            "FROM inbox.record WHERE entity = 'orders'").fetchone()
    assert small > 0 and compressed == 0, "documents past 2 kB (where pglz began) stay uncompressed"


def test_the_daily_comparison_leaves_entities_still_in_their_first_load(crm, wired, sandbox_factory):
    """crm_reconcile, run at once after an install, would list every record not landed yet as missing:
    it compares only the entities whose first load has finished, on the reconcile lane."""
    from store_sync.tasks import compare_crm

    sandbox = sandbox_factory(size="tiny", seed=13)
    wired(sandbox)
    reports, waiting = compare_crm()
    assert reports == [] and "orders" in waiting and "customers" in waiting
    sync_entity(crm, sandbox.client(), entity("orders"), "first")
    reports, waiting = compare_crm()
    assert [r.entity for r in reports] == ["orders"] and "orders" not in waiting and "customers" in waiting
