"""First load of a new shop: entities concurrently, the transform overlapping, on the first-load budget.

The store's side is watched by a counting proxy in front of the sandbox (every request's start and end
as the store sees them), so the budget is checked where it matters, not in our own client's bookkeeping.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psycopg
import pytest

from store_sync.crm.transform import run_checks
from store_sync.inbound.first_load import first_load
from store_sync.store.hooks import StoreApiHook
from store_sync.tasks import land_entity, ready_crm
from tests.helpers import REPO, CountingProxy, assert_inbox_matches_truth, latest

RATE, IN_FLIGHT = 12, 3


class Truth:
    """The sandbox's ground truth as the proxy's clients see it (links carry the proxy's address)."""

    def __init__(self, sandbox, url: str) -> None:
        self.sandbox, self.url = sandbox, url

    def export(self, entity: str) -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "sandbox", "export", "--db", str(self.sandbox.db), "--entity",
                              entity, "--base-url", self.url], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout
        return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def small_store(sandbox_factory):
    # related_ids in one order: a real store shuffles them per read, and the truth is compared whole.
    # Pages take 0.2-0.3 s, longer than the budget's spacing (1/12 s): requests overlap only when the
    # first load really runs them side by side, whatever the machine's speed.
    sandbox = sandbox_factory(size="small", seed=9, extra=["--fixed-related", "--page-latency", "0.2-0.3"])
    proxy = CountingProxy(sandbox.port)
    yield sandbox, proxy
    proxy.close()


def test_concurrent_first_load_matches_the_store_within_its_budget(small_store, wired):
    sandbox, proxy = small_store
    dsn = wired(proxy, first_load_requests_per_second=RATE, first_load_max_in_flight=IN_FLIGHT,
                requests_per_second=2, max_in_flight=1)
    proxy.requests.clear()
    hook = StoreApiHook()
    hook.overrides = hook.first_load_budget()  # what `make demo ARGS=--once` does
    result = first_load(ready_crm(), hook.get_client(), "first-load")

    truth = Truth(sandbox, proxy.url)
    for name in ("orders", "refunds", "subscriptions", "products"):
        assert_inbox_matches_truth(dsn, truth, name)  # every record, its current version, nothing doubled
    assert {str(v["id"]) for v in truth.export("variations")} <= set(latest(dsn, "products"))
    customers = {str(c["id"]) for c in truth.export("customers")}
    assert customers == set(latest(dsn, "customers"))
    run_checks(dsn)
    with psycopg.connect(dsn) as conn:
        crm = dict(conn.execute("SELECT 'orders', count(*) FROM crm.sales_order UNION ALL "
                                "SELECT 'customers', count(*) FROM crm.customer UNION ALL "
                                "SELECT 'subscriptions', count(*) FROM crm.subscription").fetchall())
        modes = {r[0] for r in conn.execute("SELECT DISTINCT mode FROM sync.landing_run")}
        fetches = conn.execute("SELECT count(*) FROM sync.fetch_request WHERE fetched_at IS NULL").fetchone()[0]
    assert crm == {"orders": len(truth.export("orders")), "customers": len(customers),
                   "subscriptions": len(truth.export("subscriptions"))}
    assert modes == {"first_load", "live"}  # live: the code lists, which have no history to slice
    assert fetches == 0, "the transform asked for records the first load was bringing anyway"

    # The store saw the first-load budget, never more, and the entities really went side by side.
    busiest, in_flight = proxy.busiest_second(), proxy.most_in_flight()
    print(f"\nfirst load: {len(proxy.store_api())} requests in {result['seconds']}s; busiest second {busiest} "
          f"(budget {RATE}/s), most in flight {in_flight} (budget {IN_FLIGHT})")
    # The budget spaces the starts 1/RATE apart; a thread woken late on two busy cores sends its request
    # late and the next one is on time, so one more may reach the store within a second (as in the Celery test).
    assert busiest <= RATE + 2, f"{busiest} requests in one second against a budget of {RATE}/s"
    assert in_flight <= IN_FLIGHT
    assert in_flight >= 2, "the first load never had two requests in flight: nothing ran concurrently"
    orders_transformed = [s for s in result["transform"] if s["step"] == "50_orders.sql"]
    assert orders_transformed, result["transform"]

    # Live sync carries on from where the first load left: nothing new, nothing read twice in bulk.
    proxy.requests.clear()
    again = land_entity("orders", "live-after")
    assert again["landed"] == 0 and again.get("mode") != "first_load"
    assert len(proxy.store_api()) <= 6


def test_watch_dag_first_cycle_is_a_first_load(small_store, wired):
    """The watch DAGs' task body: an empty watermark means a first load, on the first-load budget."""
    sandbox, proxy = small_store
    dsn = wired(proxy, first_load_requests_per_second=RATE, first_load_max_in_flight=IN_FLIGHT)
    proxy.requests.clear()
    counts = land_entity("orders", "watch-first")
    assert counts["mode"] == "first_load" and counts["status"] == "success"
    assert_inbox_matches_truth(dsn, Truth(sandbox, proxy.url), "orders")
    assert proxy.most_in_flight() >= 2 and proxy.busiest_second() <= RATE + 2
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute("SELECT cursor_at FROM sync.watermark WHERE entity = 'orders'").fetchone()
    assert cursor and cursor[0] is not None
    assert land_entity("orders", "watch-next").get("mode") != "first_load"


def test_a_first_load_killed_half_way_then_rerun_loses_and_doubles_nothing(small_store, wired, airflow_db, dagbag):
    """The watch DAG's first cycle SIGKILLed mid-load (as the OOM killer would), then run again through Airflow."""
    import os
    import signal

    sandbox, proxy = small_store
    dsn = wired(proxy, first_load_requests_per_second=20, first_load_max_in_flight=2)
    total = len(Truth(sandbox, proxy.url).export("orders"))
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "tasks", "test", "store_watch_orders", "land_changes"],
                            env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    landed, deadline = 0, time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with psycopg.connect(dsn) as conn:
                landed = conn.execute("SELECT count(*) FROM inbox.record WHERE entity='orders'").fetchone()[0]
        except psycopg.Error:
            landed = 0
        if landed >= 1000:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1000 <= landed < total, "the first load must die half way"
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute("SELECT cursor_at FROM sync.watermark WHERE entity='orders'").fetchone()
    assert cursor is None or cursor[0] is None, "a first load killed half way must not look complete"
    assert dagbag.get_dag("store_watch_orders").test().state == "success"
    assert_inbox_matches_truth(dsn, Truth(sandbox, proxy.url), "orders")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM inbox.record WHERE entity='orders'").fetchone()[0] == total


def test_a_watch_task_applies_its_first_load_after_the_entities_being_loaded_before_it(crm_dsn):
    """Orders wait for customers while the customers' first load is under way (a landing run still
    running), at most first_load_wait_seconds; an entity whose first load never started is not waited for."""
    from store_sync.crm.migrations import migrate
    from store_sync.tasks import apply_first_load

    migrate(crm_dsn)
    wait = {"first_load_wait_seconds": 3}  # the Variable store_sync_overrides, as the task reads it
    started = time.monotonic()
    result = apply_first_load("orders", crm_dsn, wait)
    assert time.monotonic() - started < 2 and result["first_load_did_not_wait_for"] == []
    with psycopg.connect(crm_dsn) as conn:
        conn.execute("INSERT INTO sync.landing_run (run_id, entity, mode) VALUES ('first:2026', 'customers', 'first_load')")
    started = time.monotonic()
    result = apply_first_load("orders", crm_dsn, wait)
    assert time.monotonic() - started >= 3 and result["first_load_did_not_wait_for"] == ["customers"]
    with psycopg.connect(crm_dsn) as conn:
        conn.execute("UPDATE sync.landing_run SET status = 'success', finished_at = now() WHERE entity = 'customers'")
    started = time.monotonic()
    assert apply_first_load("orders", crm_dsn, wait)["first_load_did_not_wait_for"] == []
    assert time.monotonic() - started < 2
