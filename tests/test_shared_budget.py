"""One request budget per store, shared by every process: counted at the sandbox, which logs each request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import psycopg
import pytest

from store_sync.store.budget import BudgetUnavailable, Lane, SharedBudget
from tests.helpers import REPO, free_port

# A worker process as a Celery or Local executor would run one: its own interpreter, its own client,
# the budget only in common through the CRM database.
WORKER = r"""
import sys, threading
from store_sync.store.budget import Lane, SharedBudget
from store_sync.store.client import StoreClient
dsn, url, lane, rate, in_flight, store_rate, store_in_flight, requests, threads = sys.argv[1:]
budget = SharedBudget(dsn, url, Lane(lane, float(rate), int(in_flight)), Lane("*", float(store_rate), int(store_in_flight)))
client = StoreClient(url, "ck_sandbox", "cs_sandbox", budget=budget, max_retries=0)
per_thread = int(requests) // int(threads)
errors = []
def work():
    try:
        for _ in range(per_thread):
            client.get("orders", {"per_page": 1, "_fields": "id"})
    except BaseException as exc:  # a thread's exception would not fail the process by itself
        errors.append(repr(exc))
workers = [threading.Thread(target=work) for _ in range(int(threads))]
[t.start() for t in workers]
[t.join() for t in workers]
if errors:
    sys.exit("worker failed: " + "; ".join(errors))
print(budget.requests)
"""


def run_workers(dsn: str, url: str, specs: list[tuple]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, dsn, url, *map(str, spec)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for spec in specs]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]


def logged(path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((r for r in rows if r["path"].endswith("/orders")), key=lambda r: r["t0"])


def busiest_second(rows: list[dict]) -> int:
    """The most requests that reached the store within any one second."""
    starts = [r["t0"] for r in rows]
    return max(sum(1 for t in starts[i:] if t < s + 1.0) for i, s in enumerate(starts))


def most_in_flight(rows: list[dict]) -> int:
    events = sorted([(r["t0"], 1) for r in rows] + [(r["t1"], -1) for r in rows])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


@pytest.fixture
def logged_sandbox(sandbox_factory, tmp_path):
    def start(*extra):
        log = tmp_path / f"requests-{free_port()}.jsonl"
        return sandbox_factory(size="tiny", seed=1, extra=["--request-log", str(log), *extra]), log
    return start


def test_two_processes_together_stay_within_one_rate(crm_dsn, logged_sandbox):
    sandbox, log = logged_sandbox()
    # each process alone could send 3 at a time as fast as the sandbox answers; together they get 6/s
    run_workers(crm_dsn, sandbox.url, [("live", 6, 3, 6, 3, 30, 3), ("live", 6, 3, 6, 3, 30, 3)])
    rows = logged(log)
    assert len(rows) == 60
    assert busiest_second(rows) <= 6 + 1, f"{busiest_second(rows)} requests reached the store in one second at 6/s"
    span = rows[-1]["t0"] - rows[0]["t0"]
    assert span >= 59 / 6 * 0.9, f"60 requests at 6/s took {span:.1f}s from first to last"
    with psycopg.connect(crm_dsn) as conn:
        status = dict(conn.execute("SELECT lane, requests FROM sync.store_budget_status WHERE store=%s",
                                   (sandbox.url,)).fetchall())
    assert status == {"*": 60, "live": 60}


def test_two_processes_together_stay_within_one_in_flight_cap(crm_dsn, logged_sandbox):
    sandbox, log = logged_sandbox("--faults", "slow=1.0", "--slow-seconds", "0.3")
    run_workers(crm_dsn, sandbox.url, [("live", 100, 2, 100, 2, 12, 3), ("live", 100, 2, 100, 2, 12, 3)])
    rows = logged(log)
    assert len(rows) == 24
    assert most_in_flight(rows) <= 2, f"{most_in_flight(rows)} requests in flight at once with a cap of 2"


def test_lanes_together_never_exceed_the_store(crm_dsn, logged_sandbox):
    sandbox, log = logged_sandbox()
    # a backfill and the live sync, each allowed 6/s on its own, share the store's 6/s
    run_workers(crm_dsn, sandbox.url, [("live", 6, 2, 6, 3, 24, 2), ("backfill", 6, 2, 6, 3, 24, 2)])
    rows = logged(log)
    assert len(rows) == 48
    assert busiest_second(rows) <= 6 + 1
    with psycopg.connect(crm_dsn) as conn:
        status = dict(conn.execute("SELECT lane, requests FROM sync.store_budget_status WHERE store=%s",
                                   (sandbox.url,)).fetchall())
    assert status == {"*": 48, "live": 24, "backfill": 24}


def test_a_lane_is_capped_by_its_own_limits(crm_dsn, logged_sandbox):
    sandbox, log = logged_sandbox()
    run_workers(crm_dsn, sandbox.url, [("fetch", 2, 1, 20, 4, 8, 2)])
    rows = logged(log)
    assert busiest_second(rows) <= 2 + 1
    assert most_in_flight(rows) <= 1


def test_trouble_seen_by_one_process_slows_every_process(crm_dsn):
    one = SharedBudget(crm_dsn, "https://shop.test", Lane("live", 8, 2), Lane("*", 8, 2))
    other = SharedBudget(crm_dsn, "https://shop.test", Lane("backfill", 2, 1), Lane("*", 8, 2))
    one.acquire()
    one.release()
    one.slow_down()  # a 429 in one process
    other.acquire()
    other.release()
    with psycopg.connect(crm_dsn) as conn:
        rates = dict(conn.execute("SELECT lane, rate FROM sync.store_budget WHERE store='https://shop.test'").fetchall())
    assert rates["*"] == 4 and rates["live"] == 4, "a 429 halves the lane and the store for everyone"
    for _ in range(5):
        one.acquire()
        one.recover()
        one.release()
    with psycopg.connect(crm_dsn) as conn:
        rates = dict(conn.execute("SELECT lane, rate FROM sync.store_budget WHERE store='https://shop.test'").fetchall())
    assert 4 < rates["live"] <= 8, "successes win the rate back"


def test_a_killed_process_gives_its_slot_back(crm_dsn):
    holder = subprocess.Popen([sys.executable, "-c", r"""
import sys, time
from store_sync.store.budget import Lane, SharedBudget
b = SharedBudget(sys.argv[1], "https://shop.test", Lane("live", 50, 1), Lane("*", 50, 1), lease_seconds=2)
b.acquire()
print("holding", flush=True)
time.sleep(600)
""", crm_dsn], env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])},
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    with psycopg.connect(crm_dsn) as conn:
        assert conn.execute("SELECT in_flight FROM sync.store_budget_status WHERE lane='live'").fetchone()[0] == 1
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    mine = SharedBudget(crm_dsn, "https://shop.test", Lane("live", 50, 1), Lane("*", 50, 1))
    got = threading.Event()
    threading.Thread(target=lambda: (mine.acquire(), got.set()), daemon=True).start()
    assert got.wait(60), "the killed process's lease never expired: its slot leaked"


def test_an_unreachable_crm_fails_in_words():
    budget = SharedBudget(f"postgresql://crm_sync@127.0.0.1:{free_port()}/crm", "https://shop.test",
                          Lane("live", 5, 3), Lane("*", 5, 3))
    with pytest.raises(BudgetUnavailable, match="shared request budget lives in the CRM database .* cannot be reached"):
        budget.acquire()


def test_the_hook_gives_the_shared_budget_and_its_lanes(crm_dsn, monkeypatch, sandbox):
    from store_sync.store.hooks import StoreApiHook

    monkeypatch.setenv("CRM_DATABASE_URL", crm_dsn)
    monkeypatch.setenv("AIRFLOW_CONN_STORE_API", json.dumps({
        "conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox",
        "extra": {"requests_per_second": "7", "backfill_requests_per_second": "3", "store_max_in_flight": "4"}}))
    live = StoreApiHook().get_client()
    assert isinstance(live.budget, SharedBudget)
    # the store's rate defaults to the largest lane's: the first-load lane's 10 (its default) here
    assert (live.budget.lane, live.budget.whole) == (Lane("live", 7, 3), Lane("*", 10, 4))
    hook = StoreApiHook()
    hook.overrides = hook.backfill_budget()
    backfill = hook.get_client()
    assert backfill.budget.lane == Lane("backfill", 3, 1)
    live.get("orders", {"per_page": 1})
    backfill.get("orders", {"per_page": 1})
    with psycopg.connect(crm_dsn) as conn:
        assert dict(conn.execute("SELECT lane, requests FROM sync.store_budget").fetchall()) == {
            "*": 2, "live": 1, "backfill": 1}
    with pytest.raises(ValueError, match="unknown request budget lane 'bulk'; the lanes are live, backfill, fetch, first_load"):
        StoreApiHook().lane_budget("bulk")
