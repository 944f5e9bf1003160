"""Fetch on demand: sync.fetch_request as a queue, crm.request_fetch, the view, and the DAG that drains it,
run through Airflow (``dag.test()``) against the sandbox store and a real PostgreSQL."""

from __future__ import annotations

import copy
import threading
import time

import psycopg
import pytest

from store_sync.crm.migrations import migrate
from store_sync.dag_defaults import FETCH_POOL, POOLS
from store_sync.fetch_trigger import APPLICATION_NAME
from store_sync.outbound.fetch_queue import fetchable, lands_in
from store_sync.registry import entities, entity

DAG_ID = "store_fetch_on_demand"


def requests_of(dsn: str) -> dict[tuple[str, str], dict]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM sync.fetch_request")
        names = [c.name for c in cur.description]
        return {(r[0], r[1]): dict(zip(names, r, strict=True)) for r in cur.fetchall()}


def form_run(dag, conf: dict):
    """``dag.test(run_conf=...)``, then the params as they were: dag.test runs the task in this process, where
    merging a run's conf into the params sets the value of the DAG's own Param objects (a worker runs each
    task in a fresh process, so this is a test-only concern), and later runs of the shared DagBag would
    see this run's ids."""
    params = [p for holder in (dag.params, *(t.params for t in dag.tasks)) for p in holder.values()]
    before = [copy.deepcopy(p.value) for p in params]
    try:
        return dag.test(run_conf=conf)
    finally:
        for p, value in zip(params, before, strict=True):
            p.value = value


def land_only(dsn: str, sandbox, name: str, ids: list[int]) -> None:
    """Land some records of one entity, as if live sync had read them and nothing else yet."""
    from store_sync.inbound.detect import sync_entity

    migrate(dsn)
    assert sync_entity(dsn, sandbox.client(), entity(name), f"test-land-{name}", mode="backfill", ids=ids)["landed"]


# -- the queue in SQL -----------------------------------------------------------------------------------
def test_what_can_be_asked_for_is_the_registry_plus_related_records(crm_dsn):
    migrate(crm_dsn)
    with psycopg.connect(crm_dsn) as conn:
        targets = dict(conn.execute("SELECT entity, lands_as FROM sync.fetch_target").fetchall())
    assert sorted(targets) == fetchable()
    assert set(targets.values()) <= set(entities()) and set(lands_in()) <= set(entities())
    assert {"order_notes", "order_refunds", "subscription_orders", "customers", "products", "orders"} <= set(targets)
    assert not {n for n, e in entities().items() if e.strategy == "snapshot"} & set(targets)


def test_request_fetch_dedupes_requeues_and_refuses_unknown_entities(crm_dsn):
    migrate(crm_dsn)
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        first = conn.execute("SELECT crm.request_fetch('customers', 42)").fetchone()[0]
        again = conn.execute("SELECT crm.request_fetch('customers', 42, 'asked twice')").fetchone()[0]
        other = conn.execute("SELECT crm.request_fetch('order_notes', 42)").fetchone()[0]
        assert first == again != other
        assert conn.execute("SELECT count(*) FROM sync.fetch_request WHERE source_key = '42'").fetchone()[0] == 2
        with pytest.raises(psycopg.errors.InvalidParameterValue) as bad:
            conn.execute("SELECT crm.request_fetch('unicorns', 1)")
        assert "unknown entity 'unicorns'" in str(bad.value) and "order_notes" in bad.value.diag.message_hint
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT crm.request_fetch('orders', 0)")
        # done (here: a transform received the customer), then asked again: back in the queue
        conn.execute("SELECT sync.fetch_request_done('customers', ARRAY['42'], 'fetched', 'r1')")
        assert conn.execute("SELECT status FROM sync.fetch_request WHERE entity='customers'").fetchone()[0] == "done"
        assert conn.execute("SELECT crm.request_fetch('customers', 42)").fetchone()[0] == first
        status, attempts, outcome = conn.execute(
            "SELECT status, attempts, outcome FROM sync.fetch_request WHERE entity='customers'").fetchone()
        assert (status, attempts, outcome) == ("pending", 0, None)
        # the transforms' own inserts (ON CONFLICT DO NOTHING, no new columns) still work and queue
        conn.execute("INSERT INTO sync.fetch_request (entity, source_key, reason) VALUES ('products', '7', 'x') "
                     "ON CONFLICT DO NOTHING")
        view = {r[0]: r[1:] for r in conn.execute(
            "SELECT entity, pending, due_now, done, failed FROM sync.fetch_queue_status")}
    assert view["customers"] == (1, 1, 0, 0) and view["products"] == (1, 1, 0, 0) and view["orders"] == (0, 0, 0, 0)


def test_failed_attempts_back_off_doubling_then_give_up(crm_dsn):
    migrate(crm_dsn)
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        conn.execute("SELECT crm.request_fetch('orders', 5)")
        delays = []
        for _ in range(4):
            conn.execute("SELECT sync.fetch_request_failed('orders', ARRAY['5'], 'HTTP 500', 'r', 10, 45, 4)")
            delays.append(conn.execute("SELECT extract(epoch FROM next_attempt_at - last_attempt_at), status "
                                       "FROM sync.fetch_request WHERE entity='orders'").fetchone())
        row = conn.execute("SELECT failed, last_error, pending FROM sync.fetch_queue_status "
                           "WHERE entity='orders'").fetchone()
    assert [round(float(d)) for d, _ in delays] == [10, 20, 40, 45]  # doubling, capped
    assert [s for _, s in delays] == ["pending", "pending", "pending", "failed"]
    assert row == (1, "HTTP 500", 0)


# -- the DAG ----------------------------------------------------------------------------------------
def test_the_dag_waits_in_the_triggerer_in_its_own_low_priority_pool(dagbag):
    from airflow.sdk.definitions.param import ParamsDict

    from store_sync.fetch_operator import FetchOnDemandOperator

    dag = dagbag.get_dag(DAG_ID)
    assert dag is not None and FETCH_POOL in POOLS and POOLS[FETCH_POOL][0] == 1
    (task,) = dag.tasks
    assert isinstance(task, FetchOnDemandOperator) and task.deferrable and task.pool == FETCH_POOL
    assert task.priority_weight < 1 and dag.max_active_runs == 1
    assert {o.name for o in task.outlets} == {f"crm_inbox_{n}" for n in lands_in()}
    for bad in ({"entity": "unicorns"}, {"entity": "countries"}, {"ids": ["x"]}, {"ids": [0]}):
        params = ParamsDict(dag.params)
        with pytest.raises(Exception):  # noqa: B017 - ParamValidationError, surfaced by the trigger form
            params.update(bad)
            params.validate()
    good = ParamsDict(dag.params)
    good.update({"entity": "order_notes", "ids": [12, 13]})
    assert good.validate()["ids"] == [12, 13]


def test_an_order_before_its_customer_and_products_ends_with_both_fetched_and_linked(dagbag, wired,
                                                                                      writable_sandbox):
    sandbox = writable_sandbox
    dsn = wired(sandbox)
    customers = {c["id"]: c for c in sandbox.export("customers")}
    order = next(o for o in sandbox.export("orders") if o["customer_id"] in customers and o["line_items"])
    products = {li["product_id"] for li in order["line_items"] if li["product_id"]}
    # A gift bought under another email: only the customer's arrival can link the buyer to them.
    sandbox.client().put(f"orders/{order['id']}", {"billing": {"email": "gift.buyer@example.org"}})
    land_only(dsn, sandbox, "orders", [order["id"]])
    assert dagbag.get_dag("crm_transform").test().state == "success"
    queued = requests_of(dsn)
    assert queued[("customers", str(order["customer_id"]))]["status"] == "pending"
    assert {k for e, k in queued if e == "products"} == {str(p) for p in products}

    assert dagbag.get_dag(DAG_ID).test().state == "success"  # requests are due: drains at once
    assert dagbag.get_dag("crm_transform").test().state == "success"  # as the inbox Assets would trigger it

    with psycopg.connect(dsn) as conn:
        linked = conn.execute(
            "SELECT cu.id, ct.customer_id FROM crm.sales_order o JOIN crm.customer cu ON cu.id = o.customer_id "
            "JOIN crm.contact ct ON ct.contact_id = o.contact_id WHERE o.id = %s", (order["id"],)).fetchone()
        lines = conn.execute("SELECT l.product_id, p.id FROM crm.sales_order_line l LEFT JOIN crm.product p "
                             "ON p.id = l.product_id WHERE l.order_id = %s", (order["id"],)).fetchall()
        runs = conn.execute("SELECT entity, landed FROM sync.landing_run WHERE mode = 'on_demand'").fetchall()
    assert linked == (order["customer_id"], order["customer_id"]), "the buyer's contact is linked to the late customer"
    assert lines and all(p is not None for _, p in lines), f"every line's product arrived: {lines}"
    done = requests_of(dsn)
    assert {(e, r["status"], r["outcome"]) for (e, _), r in done.items()} == {
        ("customers", "done", "fetched"), ("products", "done", "fetched")}
    assert {e for e, n in runs if n} == {"customers", "products"}


def test_order_notes_asked_for_in_sql_are_in_the_crm_within_seconds(dagbag, wired, writable_sandbox, monkeypatch):
    sandbox = writable_sandbox
    dsn = wired(sandbox)
    client = sandbox.client()
    order_id = sandbox.export("orders")[0]["id"]
    for text in ("Called the customer", "Gift wrap requested"):
        client.post(f"orders/{order_id}/notes", {"note": text})
    notes = {n["id"] for n in client.get(f"orders/{order_id}/notes")}
    migrate(dsn)
    dag = dagbag.get_dag(DAG_ID)
    # Nothing due and a quiet period over: the run ends as skipped (no Asset event, no transform).
    monkeypatch.setenv("AIRFLOW_VAR_STORE_SYNC_OVERRIDES", '{"fetch_on_demand": {"max_quiet_seconds": 1}}')
    quiet = dag.test()
    assert quiet.state == "success" and {ti.state for ti in quiet.get_task_instances()} == {"skipped"}
    monkeypatch.setenv("AIRFLOW_VAR_STORE_SYNC_OVERRIDES", '{"fetch_on_demand": {"max_quiet_seconds": 120}}')
    asked: dict = {}

    def ask():
        with psycopg.connect(dsn, autocommit=True) as conn:
            asked["id"] = conn.execute("SELECT crm.request_fetch('order_notes', %s)", (order_id,)).fetchone()[0]
        asked["at"] = time.monotonic()

    def ask_once_the_trigger_waits():
        deadline = time.monotonic() + 120
        with psycopg.connect(dsn, autocommit=True) as conn:
            while time.monotonic() < deadline and not conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                    (APPLICATION_NAME,)).fetchone():
                time.sleep(0.1)
        asked["trigger_seen"] = time.monotonic() < deadline
        time.sleep(1)
        ask()

    threading.Thread(target=ask_once_the_trigger_waits, daemon=True).start()
    run = dag.test()
    assert run.state == "success" and asked.get("trigger_seen"), "the run waited in the trigger for the request"
    assert dagbag.get_dag("crm_transform").test().state == "success"
    answered = time.monotonic() - asked["at"]
    with psycopg.connect(dsn) as conn:
        in_crm = {r[0] for r in conn.execute("SELECT id FROM crm.sales_order_note WHERE order_id = %s "
                                             "AND deleted_at IS NULL", (order_id,))}
        status, outcome = conn.execute("SELECT status, outcome FROM sync.fetch_request WHERE request_id = %s",
                                       (asked["id"],)).fetchone()
    assert in_crm == notes and (status, outcome) == ("done", "fetched")
    assert answered < 15, f"answered in {answered:.1f}s"

    # A note deleted at the store: asking again re-queues the done request and the note is gone in the CRM.
    gone = min(notes)
    client.request("DELETE", f"orders/{order_id}/notes/{gone}", {"force": True})
    ask()
    assert dagbag.get_dag(DAG_ID).test().state == "success"
    assert dagbag.get_dag("crm_transform").test().state == "success"
    with psycopg.connect(dsn) as conn:
        deleted = conn.execute("SELECT deleted_at IS NOT NULL FROM crm.sales_order_note WHERE id = %s",
                               (gone,)).fetchone()[0]
    assert deleted


def test_a_404_lands_as_deleted_at_the_source_and_closes_the_request(dagbag, wired, writable_sandbox):
    sandbox = writable_sandbox
    dsn = wired(sandbox)
    client = sandbox.client()
    orders = sandbox.export("orders")
    doomed = orders[0]["id"]
    customer = next(c["id"] for c in sandbox.export("customers") if c["id"] != orders[0]["customer_id"])
    land_only(dsn, sandbox, "orders", [doomed])
    assert dagbag.get_dag("crm_transform").test().state == "success"
    client.request("DELETE", f"orders/{doomed}", {"force": True})  # permanently: only a 404 is left
    missing = 9_000_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        for target, key in (("orders", doomed), ("order_notes", missing), ("order_refunds", missing + 1),
                            ("subscription_orders", missing + 2)):
            conn.execute("SELECT crm.request_fetch(%s, %s)", (target, key))
    # ... and from the form: a customer that exists and one that never did.
    run = form_run(dagbag.get_dag(DAG_ID), {"entity": "customers", "ids": [customer, missing + 3]})
    assert run.state == "success"
    assert dagbag.get_dag("crm_transform").test().state == "success"
    gone = ("done", "deleted_at_source")
    expected = {("orders", str(doomed)): gone, ("order_notes", str(missing)): gone,
                ("order_refunds", str(missing + 1)): gone, ("subscription_orders", str(missing + 2)): gone,
                ("customers", str(customer)): ("done", "fetched"), ("customers", str(missing + 3)): gone}
    everything = requests_of(dsn)
    assert {k: (everything[k]["status"], everything[k]["outcome"]) for k in expected if k in everything} == expected
    with psycopg.connect(dsn) as conn:
        deleted_at = conn.execute("SELECT deleted_at FROM crm.sales_order WHERE id = %s", (doomed,)).fetchone()[0]
        events = {(e, k) for e, k in conn.execute(
            "SELECT l.entity, l.source_key FROM inbox.latest l JOIN inbox.record r USING (inbox_id) "
            "WHERE l.is_delete AND r.payload ? 'deleted'")}
        form = conn.execute("SELECT reason FROM sync.fetch_request WHERE entity = 'customers' AND source_key = %s",
                            (str(customer),)).fetchone()[0]
        view = conn.execute("SELECT sum(deleted_at_source), sum(pending), sum(failed) "
                            "FROM sync.fetch_queue_status").fetchone()
    assert deleted_at is not None, "the order deleted at the store is deleted in the CRM"
    assert {("orders", str(doomed)), ("orders", str(missing)), ("subscriptions", str(missing + 2)),
            ("customers", str(missing + 3))} <= events
    assert form.startswith("asked from the Airflow form")
    assert view == (5, 0, 0), "the order's own customer and products, queued by the transform, were fetched too"


def test_a_failing_store_is_retried_with_backoff_until_everything_arrives(dagbag, wired, sandbox_factory,
                                                                          monkeypatch):
    sandbox = sandbox_factory(size="tiny", seed=31, extra=["--faults", "500=0.5"])
    # No retries inside the client: every 500 fails the attempt, and the queue's backoff takes over.
    dsn = wired(sandbox, fetch_max_retries=0, fetch_requests_per_second=50)
    monkeypatch.setenv("AIRFLOW_VAR_STORE_SYNC_OVERRIDES",
                       '{"fetch_on_demand": {"retry_base_seconds": 1, "retry_max_seconds": 4, "poll_seconds": 0.2, '
                       '"max_attempts": 50}}')
    migrate(dsn)
    wanted = [("customers", c["id"]) for c in sandbox.export("customers")[:5]]
    wanted += [("products", p["id"]) for p in sandbox.export("products") if not p.get("parent_id")][:5]
    wanted += [("order_notes", o["id"]) for o in sandbox.export("orders")[:6]]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for target, key in wanted:
            conn.execute("SELECT crm.request_fetch(%s, %s)", (target, key))
    dag = dagbag.get_dag(DAG_ID)
    runs, backoffs, deadline = 0, [], time.monotonic() + 120
    while time.monotonic() < deadline:
        assert dag.test().state == "success"
        runs += 1
        state = requests_of(dsn)
        backoffs += [(r["attempts"], (r["next_attempt_at"] - r["last_attempt_at"]).total_seconds())
                     for r in state.values() if r["status"] == "pending" and r["attempts"]]
        if all(r["status"] == "done" for r in state.values()):
            break
    state = requests_of(dsn)
    assert all(r["status"] == "done" and r["outcome"] == "fetched" for r in state.values()), \
        {k: (r["status"], r["outcome"], r["attempts"], r["last_error"]) for k, r in state.items()
         if (r["status"], r["outcome"]) != ("done", "fetched")}
    retried = [r for r in state.values() if r["attempts"] > 1]
    assert retried and all("500" in r["last_error"] for r in retried), "the 500s failed attempts, retried later"
    assert backoffs and all(abs(delay - min(4, 2 ** (attempts - 1))) < 0.05 for attempts, delay in backoffs), backoffs
    assert runs >= 2
    with psycopg.connect(dsn) as conn:
        landed = conn.execute("SELECT count(DISTINCT source_key) FROM inbox.latest WHERE entity = 'customers'").fetchone()[0]
        notes = conn.execute("SELECT count(DISTINCT split_part(source_key, ':', 1)) FROM inbox.latest "
                             "WHERE entity = 'order_notes'").fetchone()[0]
    reader = sandbox.client(max_retries=20)  # the test's own look at the store, through the same faults
    with_notes = sum(1 for t, key in wanted if t == "order_notes" and reader.get(f"orders/{key}/notes"))
    assert landed == 5 and notes == with_notes > 0


def test_refunds_and_related_orders_asked_for_by_their_parent(dagbag, wired, writable_sandbox):
    sandbox = writable_sandbox
    dsn = wired(sandbox)
    client = sandbox.client()
    order_id = sandbox.export("refunds")[0]["parent_id"]
    refunds = {r["id"] for r in client.get(f"orders/{order_id}/refunds")}
    sub = sandbox.export("subscriptions")[0]
    renewal = client.post("orders", {"status": "processing", "customer_id": sub["customer_id"],
                                     "meta_data": [{"key": "_subscription_renewal", "value": str(sub["id"])}]})["id"]
    related = {o["id"] for o in client.get(f"subscriptions/{sub['id']}/orders")}
    assert {renewal, sub["parent_id"]} <= related
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT crm.request_fetch('order_refunds', %s)", (order_id,))
        conn.execute("SELECT crm.request_fetch('subscription_orders', %s)", (sub["id"],))
    dag, transform = dagbag.get_dag(DAG_ID), dagbag.get_dag("crm_transform")
    assert dag.test().state == "success" and transform.test().state == "success"
    with psycopg.connect(dsn) as conn:
        in_crm = {r[0] for r in conn.execute("SELECT id FROM crm.refund WHERE order_id = %s", (order_id,))}
        orders = {int(k): p for k, p in conn.execute(
            "SELECT l.source_key, r.payload FROM inbox.latest l JOIN inbox.record r USING (inbox_id) "
            "WHERE l.entity = 'orders'")}
        relations = set(conn.execute("SELECT order_id, relation FROM crm.subscription_order WHERE subscription_id = %s",
                                     (sub["id"],)).fetchall())
        queued = conn.execute("SELECT status FROM sync.fetch_request WHERE entity = 'orders' AND source_key = %s",
                              (str(order_id),)).fetchone()
    assert in_crm == refunds, "the order's refunds, read by include= from /refunds (with parent_id)"
    assert related <= set(orders) and not any("order_type" in p for p in orders.values()), \
        "related orders land in the shape live sync lands"
    assert (renewal, "renewal") in relations
    assert queued == ("pending",), "the refunds transform queued the refund's order, absent from the CRM"
    # ... which the next drain fetches: the loop needs no one.
    assert dag.test().state == "success" and transform.test().state == "success"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM crm.sales_order WHERE id = %s", (order_id,)).fetchone()[0] == 1
    done = requests_of(dsn)
    assert {done[k]["status"] for k in (("order_refunds", str(order_id)), ("subscription_orders", str(sub["id"])),
                                        ("orders", str(order_id)))} == {"done"}
