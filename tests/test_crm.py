"""The CRM in 3NF against the sandbox's ground truth, computed here independently of the SQL."""

from __future__ import annotations

import html
import random
from collections import defaultdict
from decimal import Decimal

import psycopg
import pytest

from store_sync.crm.transform import run_checks, transform

PROMOTED_ORDER_META = {"_download_permissions_granted", "_wc_order_attribution_source_type", "_tracking",
                       "_subscription_renewal", "_subscription_switch"}


def money(value) -> Decimal | None:
    return None if value in (None, "") else Decimal(str(value))


def text(value):
    return None if value in (None, "") else html.unescape(value)


@pytest.fixture(scope="module")
def landed(crm_admin_dsn, sandbox_factory, dagbag):
    """A small store landed by the package's own DAGs (through Airflow) into a database of its own."""
    import json
    import os
    import time

    name = "crm_model_test"
    with psycopg.connect(crm_admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = crm_admin_dsn.rpartition("/")[0] + "/" + name
    sandbox = sandbox_factory(size="small", seed=21)
    saved = {k: os.environ.get(k) for k in ("CRM_DATABASE_URL", "AIRFLOW_CONN_STORE_API")}
    os.environ["CRM_DATABASE_URL"] = dsn
    os.environ["AIRFLOW_CONN_STORE_API"] = json.dumps({"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox",
                                                       "password": "cs_sandbox", "extra": {"requests_per_second": 50}})
    try:
        for dag_id in sorted(d for d in dagbag.dag_ids if d.startswith(("store_watch_", "store_snapshot_"))):
            assert dagbag.get_dag(dag_id).test().state == "success", dag_id
        # Some of the store changes after the first landing, so the inbox holds several versions.
        client = sandbox.client()
        changed = [o["id"] for o in client.get("orders", {"status": "processing", "per_page": 20})]
        for order_id in changed:
            client.put(f"orders/{order_id}", {"status": "completed"})
        for order in client.get("orders", {"status": "pending", "per_page": 3}):
            client.request("DELETE", f"orders/{order['id']}")
        time.sleep(1.1)
        assert dagbag.get_dag("store_watch_orders").test().state == "success"
        truth = {e: sandbox.export(e) for e in ("customers", "products", "variations", "categories", "orders", "refunds",
                                                "subscriptions")}
        truth["notes"] = {i: client.get(f"orders/{i}/notes") for i in changed}
        yield dsn, truth, sandbox
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with psycopg.connect(crm_admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def reset(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema='crm' AND table_type='BASE TABLE'")]
        conn.execute("TRUNCATE " + ", ".join(f"crm.{t}" for t in tables) + ", sync.fetch_request CASCADE")
        conn.execute("UPDATE inbox.record SET applied_at = NULL")
        conn.execute(open(__file__.replace("tests/test_crm.py", "include/sql/migrations/0003_crm_model.sql")).read())


def fingerprint(dsn: str) -> dict[str, str]:
    """What the CRM says, independent of surrogate keys (contacts compared by email)."""
    queries = {
        "orders": "SELECT md5(string_agg(concat_ws('|', o.id, o.status, o.total, o.customer_id, c.email_norm, o.deleted_at, "
                  "o.source_modified_at), ',' ORDER BY o.id)) FROM crm.sales_order o LEFT JOIN crm.contact c USING (contact_id)",
        "lines": "SELECT md5(string_agg(concat_ws('|', id, order_id, product_id, quantity, total), ',' ORDER BY id)) "
                 "FROM crm.sales_order_line",
        "customers": "SELECT md5(string_agg(concat_ws('|', id, email, first_name, source_modified_at), ',' ORDER BY id)) "
                     "FROM crm.customer",
        "contacts": "SELECT md5(string_agg(concat_ws('|', email_norm, customer_id), ',' ORDER BY email_norm)) FROM crm.contact",
        "subscriptions": "SELECT md5(string_agg(concat_ws('|', id, status, next_payment_date), ',' ORDER BY id)) "
                         "FROM crm.subscription",
        "relations": "SELECT md5(string_agg(concat_ws('|', subscription_id, order_id, relation), ',' "
                     "ORDER BY subscription_id, order_id)) FROM crm.subscription_order",
        "categories": "SELECT md5(string_agg(concat_ws('|', id, path), ',' ORDER BY id)) FROM crm.product_category",
        "meta": "SELECT md5(string_agg(concat_ws('|', order_id, meta_id, key, value), ',' ORDER BY order_id, meta_id)) "
                "FROM crm.sales_order_meta",
    }
    with psycopg.connect(dsn) as conn:
        return {k: conn.execute(q).fetchone()[0] for k, q in queries.items()}


def test_crm_matches_the_ground_truth(landed, dagbag):
    dsn, truth, _ = landed
    reset(dsn)
    assert dagbag.get_dag("crm_transform").test().state == "success"  # transforms and checks, through Airflow
    with psycopg.connect(dsn) as conn:
        q = lambda sql, *a: conn.execute(sql, a).fetchall()  # noqa: E731

        customers = {r[0]: r for r in q("SELECT id, email, first_name, last_name, date_created FROM crm.customer")}
        for c in truth["customers"]:
            row = customers[c["id"]]
            assert (row[1], row[2], row[3]) == (c["email"], text(c["first_name"]), text(c["last_name"]))
        addresses = {(r[0], r[1]): r[2:] for r in q("SELECT customer_id, kind, city, country_iso2, postcode FROM crm.customer_address")}
        for c in truth["customers"]:
            b = c["billing"]
            if not any(b.values()):
                assert (c["id"], "billing") not in addresses, "an empty address block is no address"
                continue
            assert addresses[(c["id"], "billing")] == (text(b["city"]), b["country"] or None, b["postcode"] or None)

        cats = {c["id"]: c for c in truth["categories"]}

        def path(cid):
            c = cats[cid]
            return (path(c["parent"]) + "/" if c["parent"] else "") + c["slug"]

        paths = dict(q("SELECT id, path FROM crm.product_category"))
        assert paths == {cid: path(cid) for cid in cats}
        products = {r[0]: r[1:] for r in q("SELECT id, price, name, status FROM crm.product")}
        links = defaultdict(set)
        for pid, cid in q("SELECT product_id, category_id FROM crm.product_category_link"):
            links[pid].add(cid)
        for p in truth["products"]:
            assert products[p["id"]] == (money(p["price"]), text(p["name"]), p["status"])
            assert links[p["id"]] == {c["id"] for c in p["categories"]}
        variations = dict(q("SELECT id, parent_id FROM crm.product WHERE type = 'variation'"))
        assert variations == {v["id"]: v["parent_id"] for v in truth["variations"]}

        # Notes of the orders that changed after the first load (the first load reads no notes).
        notes = defaultdict(set)
        for r in q("SELECT order_id, id, note, is_customer_note FROM crm.sales_order_note"):
            notes[r[0]].add(r[1:])
        assert truth["notes"] and any("Processing to Completed" in n["note"] for ns in truth["notes"].values() for n in ns)
        for order_id, expected_notes in truth["notes"].items():
            assert notes[order_id] == {(n["id"], text(n["note"]), n["customer_note"]) for n in expected_notes}

        orders = {r[0]: r[1:] for r in q("SELECT id, status, total, customer_id, currency, deleted_at IS NOT NULL FROM crm.sales_order")}
        lines = defaultdict(set)
        for r in q("SELECT order_id, id, quantity, total, product_id FROM crm.sales_order_line"):
            lines[r[0]].add(r[1:])
        taxes = defaultdict(set)
        for r in q("SELECT order_id, id, tax_total FROM crm.sales_order_tax"):
            taxes[r[0]].add(r[1:])
        meta = defaultdict(set)
        for r in q("SELECT order_id, key FROM crm.sales_order_meta"):
            meta[r[0]].add(r[1])
        assert set(orders) == {o["id"] for o in truth["orders"]}
        for o in truth["orders"]:
            assert orders[o["id"]] == (o["status"], money(o["total"]), o["customer_id"] or None, o["currency"],
                                       o["status"] == "trash"), o["id"]
            assert lines[o["id"]] == {(li["id"], Decimal(li["quantity"]), money(li["total"]), li["product_id"] or None)
                                      for li in o["line_items"]}
            assert taxes[o["id"]] == {(t["id"], money(t["tax_total"])) for t in o["tax_lines"]}
            assert meta[o["id"]] == {m["key"] for m in o["meta_data"]} - PROMOTED_ORDER_META, "every meta key kept"

        refunds = {r[0]: r[1:] for r in q("SELECT id, order_id, amount FROM crm.refund")}
        assert refunds == {r["id"]: (r["parent_id"], money(r["amount"])) for r in truth["refunds"]}

        subs = {r[0]: r[1:] for r in q("SELECT id, status, billing_period, next_payment_date IS NULL FROM crm.subscription")}
        assert subs == {s["id"]: (s["status"], s["billing_period"], s["next_payment_date_gmt"] == "") for s in truth["subscriptions"]}
        relations = set(q("SELECT subscription_id, order_id, relation FROM crm.subscription_order"))
        expected = {(s["id"], s["parent_id"], "parent") for s in truth["subscriptions"] if s["parent_id"]}
        expected |= {(int(m["value"]), o["id"], "renewal") for o in truth["orders"] for m in o["meta_data"]
                     if m["key"] == "_subscription_renewal"}
        assert relations == expected

        emails = {o["billing"]["email"].strip().lower() for o in truth["orders"] if o["billing"]["email"]}
        emails |= {c["email"].lower() for c in truth["customers"]}
        assert {r[0] for r in q("SELECT email_norm FROM crm.contact")} == emails
        unapplied = q("SELECT count(*) FROM inbox.record WHERE applied_at IS NULL")[0][0]
        assert unapplied == 0


def test_transform_is_idempotent_and_order_independent(landed):
    dsn, _, _ = landed
    reset(dsn)
    transform(dsn)
    straight = fingerprint(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE inbox.record SET applied_at = NULL")
    transform(dsn)  # everything again: nothing may change
    assert fingerprint(dsn) == straight
    reset(dsn)
    with psycopg.connect(dsn) as conn:
        ids = [r[0] for r in conn.execute("SELECT inbox_id FROM inbox.record")]
    random.Random(5).shuffle(ids)
    for start in range(0, len(ids), 700):  # shuffled batches: orders before their customers, new before old
        transform(dsn, only_inbox_ids=ids[start:start + 700])
    assert fingerprint(dsn) == straight
    run_checks(dsn)


def test_sessions_side_by_side_give_the_same_crm(landed):
    """A step with more than a batch waiting runs transform_sessions (orders: 2) sessions, each on its own
    partition of the records: the CRM ends the same as one session's, and a live landing's apply (the
    exclusive lock) waits for them."""
    from store_sync.crm.live_apply import transform_busy
    from store_sync.crm.transform import PART_LOCK

    dsn, _, _ = landed
    reset(dsn)
    transform(dsn)
    straight = fingerprint(dsn)
    reset(dsn)
    steps_run = {s["step"]: s for s in transform(dsn, batch_rows=400)}
    assert steps_run["50_orders.sql"].get("sessions") == 2 and steps_run["50_orders.sql"]["batches"] > 2
    assert "sessions" not in steps_run["30_customers.sql"], "one session where the registry says so"
    assert fingerprint(dsn) == straight
    run_checks(dsn)
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute(PART_LOCK)
        assert transform_busy(dsn, 0.2), "a live apply waits while a partition is applied"
    assert not transform_busy(dsn, 0.2)


def test_missing_references_are_queued_not_fatal(landed):
    dsn, _, _ = landed
    reset(dsn)
    transform(dsn, names=["orders"])  # orders before any customer or product
    with psycopg.connect(dsn) as conn:
        queued = dict(conn.execute("SELECT entity, count(*) FROM sync.fetch_request GROUP BY 1").fetchall())
        orders = conn.execute("SELECT count(*) FROM crm.sales_order").fetchone()[0]
    assert orders > 0 and queued.get("customers", 0) > 0 and queued.get("products", 0) > 0
    run_checks(dsn)
    transform(dsn)
    with psycopg.connect(dsn) as conn:
        waiting = conn.execute("SELECT count(*) FROM sync.fetch_request WHERE fetched_at IS NULL").fetchone()[0]
    assert waiting == 0, "records that arrived close their fetch requests"


def test_a_failed_check_names_the_rows(landed):
    from store_sync.crm.transform import CheckFailed

    dsn, _, _ = landed
    reset(dsn)
    transform(dsn)
    with psycopg.connect(dsn) as conn:
        victim = conn.execute("SELECT id FROM crm.sales_order WHERE deleted_at IS NULL ORDER BY id LIMIT 1").fetchone()[0]
        conn.execute("UPDATE crm.sales_order SET total = total + 100 WHERE id = %s", (victim,))
    with pytest.raises(CheckFailed, match=rf"order_totals_add_up: 1 rows, e.g. {victim}: total"):
        run_checks(dsn)



def test_an_order_part_without_its_order_is_named_by_the_checks(landed):
    """The references inside an order are checked set-based after each run (NOT ENFORCED on PostgreSQL 18+)."""
    from store_sync.crm.transform import CheckFailed

    dsn, _, _ = landed
    reset(dsn)
    transform(dsn)
    run_checks(dsn)
    with psycopg.connect(dsn) as conn:
        line = conn.execute("SELECT id FROM crm.sales_order_line ORDER BY id LIMIT 1").fetchone()[0]
        try:
            with conn.transaction():
                conn.execute("UPDATE crm.sales_order_line SET order_id = -1, tax_class = 'no such class' WHERE id = %s",
                             (line,))
        except psycopg.errors.ForeignKeyViolation:
            return  # PostgreSQL before 18: the foreign keys are enforced row by row, nothing gets in
    with pytest.raises(CheckFailed) as failed:
        run_checks(dsn)
    assert f"order_parts_have_their_order: 1 rows, e.g. line {line}: refers to order -1" in str(failed.value)
    assert f"orders_use_known_codes: 1 rows, e.g. line {line}: tax class no such class" in str(failed.value)

def test_reconcile_finds_what_differs(landed, monkeypatch, capsys):
    from store_sync.crm import reconcile

    dsn, truth, sandbox = landed
    reset(dsn)
    transform(dsn)
    client = sandbox.client()
    assert all(r.ok for r in reconcile.reconcile(dsn, client)), reconcile.render(reconcile.reconcile(dsn, client))
    with psycopg.connect(dsn) as conn:
        changed, gone = [r[0] for r in conn.execute(
            "SELECT id FROM crm.sales_order WHERE deleted_at IS NULL ORDER BY id LIMIT 2")]
        conn.execute("UPDATE crm.sales_order SET status = 'cancelled' WHERE id = %s", (changed,))
        conn.execute("DELETE FROM crm.sales_order WHERE id = %s", (gone,))
    monkeypatch.setenv("CRM_DATABASE_URL", dsn)
    monkeypatch.setenv("AIRFLOW_CONN_STORE_API", f'{{"conn_type": "http", "host": "{sandbox.url}", '
                                                 '"login": "ck_sandbox", "password": "cs_sandbox"}')
    assert reconcile.main(["--entity", "orders"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT" in out and f"{gone}" in out and "1 missing in the CRM" in out
    assert f"{changed}: status: store " in out and "CRM 'cancelled'" in out
