"""Scale-out on Airflow's CeleryExecutor: the package's stack with two Celery workers on loopback.

The api-server, scheduler, dag-processor, triggerer and two ``airflow celery worker`` processes start
(``AirflowStack(celery_workers=2)``), with a Redis broker the stack starts itself and Celery's results
in the metadata database. The orders' live watermark starts at "now", so their history comes only
through a backfill, which the DAG splits into chunks (mapped tasks) that both workers take; the live
watch DAGs run beside it (the other entities' first load, and orders the test edits meanwhile). Then:

* both workers ran backfill chunks (the task instances' hostname);
* the inbox holds exactly the store's ground truth (``python -m sandbox export``), the same checksum,
  no duplicates, the live watermark untouched by the backfill, and the CRM the same record counts;
* the store's request budget (the connection's ``requests_per_second``) held in total, over every
  process of both workers and the triggerer, counted at the store (the sandbox's ``--request-log``).

About 3 minutes on two cores (Airflow's six processes start in 1-2 of them), so it is marked ``slow``.
It brings its own Airflow and Redis but uses the suite's PostgreSQL; the layout does not depend on the
server, so the run on the embedded default covers it and the CRM_DATABASE_URL pass leaves it out.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import psycopg
import pytest
import requests

from store_sync.inbound.landing import fingerprint, set_watermark
from tests.helpers import SandboxProcess, assert_inbox_matches_truth, free_port, inbox_duplicates

BUDGET = 8  # requests/s the store connection allows: for every process together
BACKFILL_BUDGET = 3
CHECKED = ("orders", "refunds", "subscriptions", "products")


def api(stack, method: str, path: str, **kwargs):
    token = requests.post(f"{stack.url}/auth/token", timeout=10,
                          json={"username": "admin", "password": stack.admin_password()}).json()["access_token"]
    answer = requests.request(method, f"{stack.url}/api/v2/{path}", headers={"Authorization": f"Bearer {token}"},
                              timeout=30, **kwargs)
    answer.raise_for_status()
    return answer.json()


def wait(what: str, check, seconds: float, every: float = 2.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            if (found := check()) is not None and found is not False:
                return found
        except (psycopg.Error, requests.RequestException, AssertionError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f}s")
        time.sleep(every)


def checksum(pairs) -> str:
    return hashlib.md5("\n".join(f"{k}:{h}" for k, h in sorted(pairs)).encode()).hexdigest()


def busiest_second(times: list[float]) -> tuple[int, float]:
    """The most requests the store saw in any one-second window (sliding, not aligned to the clock),
    and when that window began."""
    times, most, at, lo = sorted(times), 0, 0.0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - 1.0:
            lo += 1
        if hi - lo + 1 > most:
            most, at = hi - lo + 1, times[lo]
    return most, at


@pytest.fixture
def databases(crm_admin_dsn):
    names = {"crm": f"crm_test_{uuid.uuid4().hex[:10]}", "meta": f"airflow_celery_{uuid.uuid4().hex[:10]}"}
    with psycopg.connect(crm_admin_dsn, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = crm_admin_dsn.rpartition("/")
    yield {k: f"{base}/{v}" for k, v in names.items()}
    with psycopg.connect(crm_admin_dsn, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
@pytest.mark.skipif(bool(__import__("os").environ.get("CRM_DATABASE_URL")),
                    reason="brings its own Airflow and Redis; the layout does not depend on the PostgreSQL server, "
                           "so the run on the embedded default covers it")
def test_backfill_split_across_two_celery_workers_beside_live_sync(tmp_path, databases):
    from store_sync.crm.migrations import migrate
    from store_sync.inbound.detect import now_utc
    from store_sync.local.stack import AirflowStack

    crm, meta = databases["crm"], databases["meta"]
    requests_log = tmp_path / "requests.jsonl"
    sandbox = SandboxProcess(tmp_path, size="tiny", seed=21, extra=["--request-log", str(requests_log)])
    stack = None
    try:
        truth_orders = sandbox.export("orders")
        migrate(crm)
        with psycopg.connect(crm) as conn, conn.transaction():
            # A shop whose live sync starts today: the orders' history is the backfill's to bring.
            set_watermark(conn, "orders", now_utc(), "test-live-starts-now")
        live_before = now_utc()
        store_conn = json.dumps({"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox",
                                 "password": "cs_sandbox", "extra": {
                                     "requests_per_second": BUDGET, "max_in_flight": 3,
                                     "backfill_requests_per_second": BACKFILL_BUDGET, "backfill_max_in_flight": 1,
                                     # all lanes together (the first cycles' first_load lane included:
                                     # left out, the store's total would be its 10/s)
                                     "store_requests_per_second": BUDGET, "store_max_in_flight": 3}})
        stack = AirflowStack(tmp_path / "airflow", meta.replace("postgresql://", "postgresql+psycopg://", 1),
                             port=free_port(), celery_workers=2,
                             extra_env={"CRM_DATABASE_URL": crm, "AIRFLOW_CONN_STORE_API": store_conn})
        t0 = time.time()
        stack.setup()
        stack.start()
        wait("the backfill DAG parsed", lambda: api(stack, "GET", "dags/store_backfill"), 180)
        started = time.time()
        print(f"\nAirflow (Celery, 2 workers) up in {started - t0:.0f}s")
        since = min(o["date_modified_gmt"] for o in truth_orders) + "Z"
        run_id = api(stack, "POST", "dags/store_backfill/dagRuns",
                     json={"logical_date": None, "conf": {"entity": "orders", "since": since, "chunk_hours": 96}}
                     )["dag_run_id"]

        # Live changes while the backfill runs: orders edited now are the live watcher's to land.
        client = sandbox.client()
        edited = [o["id"] for o in truth_orders[:6]]
        for n, order_id in enumerate(edited):
            time.sleep(3)
            client.put(f"orders/{order_id}", {"customer_note": f"edited while backfilling {n}"})

        def backfill_state():
            with psycopg.connect(meta) as conn:
                state = conn.execute("SELECT state FROM dag_run WHERE dag_id='store_backfill' AND run_id=%s",
                                     (run_id,)).fetchone()[0]
            assert state != "failed", f"the backfill failed; see {stack.home / 'logs'}"
            return state == "success"

        wait("the backfill finished", backfill_state, 420)
        with psycopg.connect(meta) as conn:
            chunks = conn.execute(
                "SELECT map_index, hostname, state FROM task_instance WHERE dag_id='store_backfill' AND run_id=%s "
                "AND task_id='backfill' ORDER BY map_index", (run_id,)).fetchall()
        by_worker: dict[str, int] = {}
        for _, hostname, _ in chunks:
            by_worker[hostname.split("@")[0]] = by_worker.get(hostname.split("@")[0], 0) + 1
        print(f"backfill: {len(chunks)} chunks in {time.time() - started:.0f}s, by worker {by_worker}")
        assert len(chunks) >= 6 and {s for _, _, s in chunks} == {"success"}
        assert set(by_worker) == {"worker-1", "worker-2"}, f"both workers take chunks: {chunks}"

        # The end state: every entity as the store has it, live edits included, and the CRM likewise.
        def converged():
            for name in CHECKED:
                assert_inbox_matches_truth(crm, sandbox, name)
            with psycopg.connect(crm) as conn:
                unapplied = conn.execute("SELECT count(*) FROM inbox.record WHERE applied_at IS NULL").fetchone()[0]
                crm_orders = conn.execute("SELECT count(*) FROM crm.sales_order").fetchone()[0]
            assert unapplied == 0 and crm_orders == len(truth_orders), (unapplied, crm_orders)
            return True

        wait("the CRM caught up with the store", converged, 240, every=3)
        ended = time.time()
        print(f"caught up {ended - started:.0f}s after the trigger")
        truth = sandbox.export("orders")
        assert all(o["customer_note"].startswith("edited while") for o in truth if o["id"] in edited)
        with psycopg.connect(crm) as conn:
            assert inbox_duplicates(conn) == 0
            hashes = dict(conn.execute("SELECT source_key, payload_hash FROM inbox.latest WHERE entity='orders'"))
            live_after = conn.execute("SELECT cursor_at FROM sync.watermark WHERE entity='orders'").fetchone()[0]
            backfill_runs = conn.execute("SELECT count(*), sum(records_read) FROM sync.landing_run "
                                         "WHERE entity='orders' AND mode='backfill'").fetchone()
        expected = {str(o["id"]): fingerprint(o)[1] for o in truth}
        print(f"orders: {len(hashes)} in the inbox, checksum {checksum(hashes.items())}; the store's "
              f"{checksum(expected.items())}")
        assert hashes == expected
        assert live_after >= live_before, "the live watermark is live sync's alone"
        # Every chunk read its window once; an order edited before its chunk came was the live watcher's.
        assert backfill_runs[0] == len(chunks) and backfill_runs[1] >= len(truth_orders) - len(edited)

        # The store's budget, counted where it matters: at the store, over every process that called
        # (the test's own edits left out).
        served = [r for r in map(json.loads, requests_log.read_text().splitlines())
                  if r["path"].startswith("/wp-json") and r["method"] != "PUT" and started <= r["t0"] <= ended]
        times = [r["t0"] for r in served]
        busiest, at = busiest_second(times)
        mean = len(served) / (ended - started)
        print(f"store requests: {len(served)} in {ended - started:.0f}s ({mean:.1f}/s); busiest second {busiest} "
              f"(budget {BUDGET}/s for all processes together)")
        burst = sorted(r["path"].removeprefix("/wp-json/wc/v3/") for r in served if at <= r["t0"] < at + 1)
        # A bucket at BUDGET/s lets BUDGET + 1 requests into a window that starts on one of them; one more
        # for a request that left its process late (two busy cores) and arrived beside the next.
        assert busiest <= BUDGET + 2, f"{busiest} requests in one second against a budget of {BUDGET}/s in total: {burst}"
        five = max(sum(1 for t in times if a <= t < a + 5) for a in times)
        assert five <= 5 * BUDGET + 2, f"{five} requests in five seconds against a budget of {BUDGET}/s in total"
        assert mean <= BUDGET
    finally:
        if stack:
            stack.stop()
        sandbox.stop()
