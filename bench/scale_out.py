"""Scale-out: the same backfill on one Celery worker, then on two, over the same store.

    .venv/bin/python bench/scale_out.py [--size small] [--workers 1 2] [--chunk-hours 168]

For each worker count it starts the package's Celery layout (``AirflowStack(celery_workers=N)``: api-server,
scheduler, dag-processor, triggerer, N ``airflow celery worker`` processes, a private Redis broker) on
fresh databases of the embedded PostgreSQL, over one sandbox store, with the orders' live watermark at
"now" so their history comes only through the backfill DAG (chunks as mapped tasks; the backfill pool
gets N x the worker concurrency slots, so more workers can take more chunks at once). It prints, per
run: wall time from the trigger to the run's success, orders/s, the chunks each worker ran, the store's
requests (mean and busiest second, counted at the store), and the inbox checksum, which must be the same
in every run and equal to the store's. Then the ratio of each run's orders/s to the first run's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402
import requests  # noqa: E402

from store_sync.crm.database import EmbeddedPostgres  # noqa: E402
from store_sync.inbound.landing import fingerprint  # noqa: E402
from store_sync.local.stack import WORKER_CONCURRENCY, AirflowStack  # noqa: E402
from tests.helpers import SandboxProcess, free_port  # noqa: E402


def api(stack: AirflowStack, method: str, path: str, **kwargs):
    token = requests.post(f"{stack.url}/auth/token", timeout=10,
                          json={"username": "admin", "password": stack.admin_password()}).json()["access_token"]
    answer = requests.request(method, f"{stack.url}/api/v2/{path}", headers={"Authorization": f"Bearer {token}"},
                              timeout=30, **kwargs)
    answer.raise_for_status()
    return answer.json()


def checksum(pairs) -> str:
    return hashlib.md5("\n".join(f"{k}:{h}" for k, h in sorted(pairs)).encode()).hexdigest()


def busiest_second(times: list[float]) -> int:
    times, most, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - 1.0:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


def one_run(pg: EmbeddedPostgres, sandbox: SandboxProcess, requests_log: Path, workers: int, args, since: str,
            work: Path) -> dict:
    from store_sync.crm.migrations import migrate
    from store_sync.inbound.detect import now_utc
    from store_sync.inbound.landing import set_watermark

    stamp = uuid.uuid4().hex[:8]
    crm_db, meta_db = f"crm_scale_{stamp}", f"airflow_scale_{stamp}"
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {crm_db} OWNER crm_sync")
        conn.execute(f"CREATE DATABASE {meta_db} OWNER crm_sync")
    crm, meta = pg.dsn(crm_db), pg.dsn(meta_db)
    migrate(crm)
    with psycopg.connect(crm) as conn, conn.transaction():
        set_watermark(conn, "orders", now_utc(), "bench-live-starts-now")
    store_conn = json.dumps({"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox",
                             "extra": {"requests_per_second": args.budget, "max_in_flight": 4,
                                       "backfill_requests_per_second": args.backfill_budget,
                                       "backfill_max_in_flight": 2}})
    stack = AirflowStack(work / f"airflow-{workers}", meta.replace("postgresql://", "postgresql+psycopg://", 1),
                         port=free_port(), celery_workers=workers,
                         extra_env={"CRM_DATABASE_URL": crm, "AIRFLOW_CONN_STORE_API": store_conn})
    try:
        stack.setup()
        slots = workers * WORKER_CONCURRENCY
        stack.airflow("pools", "set", "store_api_backfill", str(slots), "store API calls of backfills")
        stack.start()
        deadline = time.monotonic() + 180
        while True:
            try:
                api(stack, "GET", "dags/store_backfill")
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        started = time.time()
        run_id = api(stack, "POST", "dags/store_backfill/dagRuns", json={
            "logical_date": None, "conf": {"entity": "orders", "since": since, "chunk_hours": args.chunk_hours}}
        )["dag_run_id"]
        while True:
            with psycopg.connect(meta) as conn:
                state = conn.execute("SELECT state FROM dag_run WHERE dag_id='store_backfill' AND run_id=%s",
                                     (run_id,)).fetchone()[0]
            if state in ("success", "failed"):
                break
            time.sleep(1)
        ended = time.time()
        with psycopg.connect(meta) as conn:
            chunks = conn.execute("SELECT hostname FROM task_instance WHERE dag_id='store_backfill' AND run_id=%s "
                                  "AND task_id='backfill'", (run_id,)).fetchall()
        with psycopg.connect(crm) as conn:
            hashes = conn.execute("SELECT source_key, payload_hash FROM inbox.latest WHERE entity='orders'").fetchall()
    finally:
        stack.stop()
    by_worker: dict[str, int] = {}
    for (hostname,) in chunks:
        by_worker[(hostname or "?").split("@")[0]] = by_worker.get((hostname or "?").split("@")[0], 0) + 1
    served = [r["t0"] for r in map(json.loads, requests_log.read_text().splitlines())
              if r["path"].startswith("/wp-json") and started <= r["t0"] <= ended]
    return {"workers": workers, "state": state, "seconds": ended - started, "orders": len(hashes),
            "chunks": by_worker, "slots": slots, "requests": len(served), "busiest": busiest_second(served),
            "checksum": checksum(hashes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-hours", type=int, default=168)
    parser.add_argument("--budget", type=float, default=20, help="the store connection's requests_per_second")
    parser.add_argument("--backfill-budget", type=float, default=10, help="backfill_requests_per_second")
    args = parser.parse_args()

    pg = EmbeddedPostgres()
    own_pg = not pg.is_running()
    pg.start()
    work = Path(tempfile.mkdtemp(prefix="scale-out-", dir=os.environ.get("TMPDIR")))
    requests_log = work / "requests.jsonl"
    sandbox = SandboxProcess(work, size=args.size, seed=5, extra=["--request-log", str(requests_log)])
    try:
        truth = sandbox.export("orders")
        expected = checksum((str(o["id"]), fingerprint(o)[1]) for o in truth)
        since = min(o["date_modified_gmt"] for o in truth) + "Z"
        print(f"store {args.size}: {len(truth)} orders, checksum {expected}; chunks of {args.chunk_hours}h; "
              f"budget {args.budget}/s for the store, backfills {args.backfill_budget}/s of it (shared by every process); "
              f"{os.cpu_count()} CPUs",
              flush=True)
        runs = []
        for workers in args.workers:
            run = one_run(pg, sandbox, requests_log, workers, args, since, work)
            runs.append(run)
            print(f"{workers} worker(s): {run['state']} in {run['seconds']:.1f}s, "
                  f"{run['orders'] / run['seconds']:.0f} orders/s, chunks by worker {run['chunks']} "
                  f"({run['slots']} backfill slots), store requests {run['requests']} "
                  f"({run['requests'] / run['seconds']:.1f}/s, busiest second {run['busiest']}), checksum "
                  f"{run['checksum']}{'' if run['checksum'] == expected else '  DIFFERS FROM THE STORE'}", flush=True)
        base = runs[0]["orders"] / runs[0]["seconds"]
        print("\nworkers  seconds  orders/s  ratio  same end state as the store")
        for run in runs:
            rate = run["orders"] / run["seconds"]
            print(f"{run['workers']:>7}  {run['seconds']:>7.1f}  {rate:>8.0f}  {rate / base:>5.2f}  "
                  f"{'yes' if run['checksum'] == expected else 'NO'}")
        return 0 if all(r["checksum"] == expected and r["state"] == "success" for r in runs) else 1
    finally:
        sandbox.stop()
        if own_pg:
            pg.stop()


if __name__ == "__main__":
    sys.exit(main())
