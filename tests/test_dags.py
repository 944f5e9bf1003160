"""The DAG folder: imports cleanly, follows the house rules, and the DAGs run through Airflow itself."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from store_sync.dag_defaults import POOLS
from store_sync.registry import entities
from tests.helpers import assert_inbox_matches_truth, latest


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    expected = {"store_backfill", "store_reconcile_deletes", "crm_transform", "crm_reconcile"}
    for name, spec in entities().items():
        if spec.strategy != "children":
            expected.add(f"store_snapshot_{name}" if spec.strategy == "snapshot" else f"store_watch_{name}")
    assert expected <= set(dagbag.dag_ids)


def test_dags_follow_house_rules(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and "store-sync" in dag.tags, dag_id
        assert dag.doc_md and "###" in dag.doc_md, dag_id
        assert dag.max_active_runs == 1, dag_id
        for t in dag.tasks:
            assert t.retries >= 2, f"{dag_id}.{t.task_id}"
            assert t.pool in POOLS, f"{dag_id}.{t.task_id}: store calls go through a store pool"


def test_watch_dags_wait_in_the_triggerer(dagbag):
    from store_sync.operators import LandStoreChangesOperator

    watchers = [t for d in dagbag.dags.values() for t in d.tasks if isinstance(t, LandStoreChangesOperator)]
    assert len(watchers) == sum(1 for e in entities().values() if e.strategy in ("modified_window", "id_scan"))
    assert all(w.deferrable and w.outlets for w in watchers)


def test_dags_serialize(dagbag):
    from airflow.serialization.serialized_objects import DagSerialization

    for dag in dagbag.dags.values():
        assert DagSerialization.serialize_dag(dag)


def test_initial_load_of_a_small_store_through_airflow(dagbag, wired, sandbox_factory):
    sandbox = sandbox_factory(size="small", seed=11)
    dsn = wired(sandbox)
    for dag_id in sorted(d for d in dagbag.dag_ids if d.startswith(("store_watch_", "store_snapshot_"))):
        run = dagbag.get_dag(dag_id).test()
        assert run.state == "success", dag_id
    for name in ("orders", "refunds", "subscriptions", "products"):
        assert_inbox_matches_truth(dsn, sandbox, name)
    customers = latest(dsn, "customers")
    assert {str(c["id"]) for c in sandbox.export("customers")} <= set(customers)
    # role=all: the shop's other users (who can buy too) land as well, with their role
    assert {p["role"] for p, _ in customers.values()} == {"customer", "administrator"}
    with psycopg.connect(dsn) as conn:
        countries = conn.execute("SELECT count(*) FROM inbox.record WHERE entity='countries'").fetchone()[0]
        runs = dict(conn.execute("SELECT entity, status FROM sync.landing_run").fetchall())
    assert countries == 8
    parents = {n for n, e in entities().items() if e.strategy != "children"}
    assert set(runs) >= parents and set(runs.values()) == {"success"}
    # ... and the transform DAG (scheduled on the inbox Assets) turns them into the CRM model.
    assert dagbag.get_dag("crm_transform").test().state == "success"
    with psycopg.connect(dsn) as conn:
        crm_orders = conn.execute("SELECT count(*) FROM crm.sales_order").fetchone()[0]
        unapplied = conn.execute("SELECT count(*) FROM inbox.record WHERE applied_at IS NULL").fetchone()[0]
    assert crm_orders == len(sandbox.export("orders")) and unapplied == 0


def test_backfill_beside_live_changes_nothing_it_should_not(dagbag, wired, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=12)
    dsn = wired(sandbox)
    assert dagbag.get_dag("store_watch_orders").test().state == "success"
    with psycopg.connect(dsn) as conn:
        live_before = conn.execute("SELECT cursor_at, state FROM sync.watermark WHERE entity='orders'").fetchone()
        rows_before = conn.execute("SELECT count(*) FROM inbox.record").fetchone()[0]
    oldest = min(o["date_modified_gmt"] for o in sandbox.export("orders"))
    run = dagbag.get_dag("store_backfill").test(run_conf={"entity": "orders", "since": oldest + "Z", "chunk_hours": 72})
    assert run.state == "success"
    with psycopg.connect(dsn) as conn:
        live_after = conn.execute("SELECT cursor_at, state FROM sync.watermark WHERE entity='orders'").fetchone()
        rows_after = conn.execute("SELECT count(*) FROM inbox.record").fetchone()[0]
        backfill_runs = conn.execute("SELECT count(*), sum(records_read), sum(landed) FROM sync.landing_run "
                                     "WHERE mode='backfill'").fetchone()
    assert live_after == live_before, "a backfill must not move the live watermark"
    assert rows_after == rows_before, "nothing already landed is landed again"
    assert backfill_runs[0] >= 2 and backfill_runs[1] >= len(sandbox.export("orders")) and backfill_runs[2] == 0
    assert_inbox_matches_truth(dsn, sandbox, "orders")


def test_backfill_by_ids_refreshes_those_records(dagbag, wired, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=13)
    dsn = wired(sandbox)
    ids = [o["id"] for o in sandbox.export("orders")[:3]]
    run = dagbag.get_dag("store_backfill").test(run_conf={"entity": "orders", "ids": ids})
    assert run.state == "success"
    assert set(latest(dsn, "orders")) == {str(i) for i in ids}


def test_backfill_form_rejects_bad_input(dagbag):
    from airflow.sdk.definitions.param import ParamsDict

    dag = dagbag.get_dag("store_backfill")
    for bad in ({"entity": "unicorns"}, {"since": "last tuesday"}, {"ids": ["x"]}, {"chunk_hours": 0}):
        params = ParamsDict(dag.params)
        with pytest.raises(Exception):  # noqa: B017 - ParamValidationError, surfaced by the trigger form
            params.update(bad)
            params.validate()


def test_watch_dag_defers_then_lands_a_change_made_while_it_waits(dagbag, wired, sandbox_factory):
    import threading
    import time

    sandbox = sandbox_factory(size="tiny", seed=14)
    dsn = wired(sandbox)
    dag = dagbag.get_dag("store_watch_orders")
    assert dag.test().state == "success"  # the first load lands at once, without waiting
    time.sleep(3)  # let the first window's upper bound pass so nothing is pending
    client = sandbox.client()
    order = client.get("orders", {"status": "processing", "per_page": 1})[0]
    threading.Timer(3.0, lambda: client.put(f"orders/{order['id']}", {"status": "completed"})).start()
    started = time.monotonic()
    assert dag.test().state == "success"
    assert time.monotonic() - started >= 3.0, "the run must have waited in the trigger for the change"
    if latest(dsn, "orders")[str(order["id"])][0]["status"] != "completed":
        # Landed in the change's own second: the window ends at the last whole second, so the
        # trigger fires again at once and the next run takes it.
        assert dag.test().state == "success"
    landed = latest(dsn, "orders")[str(order["id"])][0]
    assert landed["status"] == "completed"


def test_changes_and_faults_through_airflow_lose_nothing(dagbag, wired, sandbox_factory, monkeypatch):
    """Simulator at 40 changes/s, 429s, 5xx, truncated bodies and pages shifting under the reader."""
    import time

    faulty = sandbox_factory(size="tiny", seed=16, extra=[
        "--changes-per-second", "40", "--faults", "429=0.05,500=0.05,502=0.02,truncated=0.03,shift=0.3",
        "--slow-seconds", "0.05"])
    dsn = wired(faulty, requests_per_second=100, max_retries=15)
    # Many pages to shift; one landing cycle per run (a busy run would otherwise keep landing for minutes).
    monkeypatch.setenv("AIRFLOW_VAR_STORE_SYNC_OVERRIDES", '{"orders": {"per_page": 7, "stay_while_busy_seconds": 0}}')
    dag = dagbag.get_dag("store_watch_orders")
    # At least 10 s of changes and at least three cycles under them, however slow the machine is.
    runs, deadline = 0, time.monotonic() + 10
    while time.monotonic() < deadline or runs < 3:
        assert dag.test().state == "success"
        runs += 1
    faulty.stop()  # the shop goes quiet; one more cycle must catch up with everything
    quiet = sandbox_factory(size="tiny", seed=16, fresh=False, db=faulty.db, port=faulty.port)
    time.sleep(1.1)
    assert dag.test().state == "success"
    assert runs >= 3
    assert_inbox_matches_truth(dsn, quiet, "orders")
    with psycopg.connect(dsn) as conn:
        retries = conn.execute("SELECT sum(retries) FROM sync.landing_run").fetchone()[0]
    assert retries > 0, "the faults were there and the landings retried through them"


def test_bad_records_are_quarantined_while_their_neighbours_land(dagbag, wired, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=17, extra=["--faults", "garbage=1.0"])  # one broken record per page
    dsn = wired(sandbox)
    assert dagbag.get_dag("store_watch_orders").test().state == "success"
    with psycopg.connect(dsn) as conn:
        bad = conn.execute("SELECT source_key, reason, raw->>'total' FROM sync.quarantine WHERE entity='orders'").fetchall()
        counts = conn.execute("SELECT quarantined, landed FROM sync.landing_run WHERE entity='orders'").fetchone()
    assert bad and all(r[2] == "N/A" and "total" in r[1] for r in bad)
    assert counts[0] == len(bad) and counts[1] > 0
    never_clean = {k for k, _, _ in bad} - set(latest(dsn, "orders"))
    truth = {str(o["id"]) for o in sandbox.export("orders")}
    assert truth - set(latest(dsn, "orders")) == never_clean, "every other order landed"


def test_a_landing_task_killed_mid_run_then_rerun_loses_and_doubles_nothing(dagbag, wired, sandbox_factory,
                                                                              monkeypatch):
    import signal
    import time

    sandbox = sandbox_factory(size="tiny", seed=18)
    dsn = wired(sandbox, requests_per_second=4)  # slow enough to kill it half way
    monkeypatch.setenv("AIRFLOW_VAR_STORE_SYNC_OVERRIDES", '{"orders": {"per_page": 5}}')
    from datetime import UTC, datetime

    from store_sync.crm.migrations import migrate
    from store_sync.inbound.landing import set_watermark

    migrate(dsn)
    earlier = datetime(1970, 1, 2, tzinfo=UTC)
    with psycopg.connect(dsn) as conn:  # a live cycle after an earlier one (an empty watermark is a first load)
        set_watermark(conn, "orders", earlier, "earlier")
    total = len(sandbox.export("orders"))
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "tasks", "test", "store_watch_orders", "land_changes"],
                            env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    landed, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with psycopg.connect(dsn) as conn:
                landed = conn.execute("SELECT count(*) FROM inbox.record WHERE entity='orders'").fetchone()[0]
        except psycopg.Error:
            landed = 0
        if landed >= 15:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # as the OOM killer or a lost worker would
    proc.wait()
    assert 15 <= landed < total, "the task must die half way"
    with psycopg.connect(dsn) as conn:
        cursor, progress = conn.execute("SELECT cursor_at, state->'progress' FROM sync.watermark WHERE entity='orders'").fetchone()
    assert cursor == earlier and progress["t0"], "killed before the window completed, with its place kept"
    assert dagbag.get_dag("store_watch_orders").test().state == "success"
    assert_inbox_matches_truth(dsn, sandbox, "orders")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM inbox.record WHERE entity='orders'").fetchone()[0] == total
