"""Freshness: seconds from a change in the store to its row in the CRM inbox, on the real stack.

    .venv/bin/python bench/freshness.py [--size small] [--rate 2] [--changes 200]

Starts everything the way `make demo` does, but on throw-away databases: the embedded PostgreSQL
(a CRM database and an Airflow metadata database of its own), the sandbox store with the change
simulator at a steady rate, Airflow's api-server, scheduler, dag-processor and triggerer with the
DAGs unpaused, and the customer webhooks registered by the package (`store_sync.store.webhooks`) at the
api-server. After the initial load it
records at least --changes changes (the simulator logs each with its exact time) and matches each
to the first inbox row written after it that carries it. It prints p50 / p95 / max per entity and
where the time goes: from the change to the start of the landing task (trigger poll, sensor resume,
scheduling), from there to the inbox row, and on to the CRM row (when the transform applied it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402

from store_sync.crm.database import EmbeddedPostgres  # noqa: E402
from store_sync.local.stack import AirflowStack  # noqa: E402
from tests.helpers import SandboxProcess, free_port  # noqa: E402

ENTITY = {"order": "orders", "subscription": "subscriptions", "product": "products", "customer": "customers"}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--rate", type=float, default=2.0, help="store changes per second")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--tail", type=float, default=20, help="seconds to wait for the last changes to land")
    parser.add_argument("--writebacks", type=int, default=30,
                        help="CRM status requests to time through the outbox to the store and back (0: none)")
    args = parser.parse_args()

    pg = EmbeddedPostgres()
    own_pg = not pg.is_running()
    pg.start()
    stamp = str(int(time.time()))
    crm_db, meta_db = f"crm_bench_{stamp}", f"airflow_bench_{stamp}"
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {crm_db} OWNER crm_sync")
        conn.execute(f"CREATE DATABASE {meta_db} OWNER crm_sync")
    crm = pg.dsn(crm_db)
    tmp = Path(tempfile.mkdtemp(prefix="freshness-"))
    changes_file = tmp / "changes.jsonl"
    airflow_port = free_port()
    secret = "bench-webhook-secret"
    sandbox = SandboxProcess(tmp, size=args.size, seed=1, extra=[
        "--changes-per-second", str(args.rate), "--change-log", str(changes_file), "--webhook-delay", "0.2"])
    stack = None
    try:
        # The package's own webhook settings: the api-server's URL and the secret, in the store connection.
        store_conn = json.dumps({"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox",
                                 "password": "cs_sandbox", "extra": {
                                     "requests_per_second": 20, "max_in_flight": 3,
                                     "webhook_url": f"http://127.0.0.1:{airflow_port}", "webhook_secret": secret}})
        os.environ["AIRFLOW_CONN_STORE_API"] = store_conn  # this process registers the webhooks below
        stack = AirflowStack(tmp / "airflow", pg.dsn(meta_db).replace("postgresql://", "postgresql+psycopg://", 1),
                             port=airflow_port, extra_env={"CRM_DATABASE_URL": crm, "AIRFLOW_CONN_STORE_API": store_conn})
        t0 = time.time()
        stack.setup()
        stack.start()
        from store_sync.store.webhooks import register_webhooks

        print(f"webhooks: {register_webhooks()}", flush=True)  # once the receiver answers, as `make demo` does
        print(f"Airflow up in {time.time() - t0:.0f}s; waiting for the initial load…", flush=True)
        tracked = sorted(set(ENTITY.values()))
        deadline = time.time() + 600
        while True:
            try:
                with psycopg.connect(crm) as conn:
                    ready = conn.execute("SELECT count(*) FROM sync.watermark WHERE entity = ANY(%s) AND "
                                         "cursor_at IS NOT NULL", (tracked,)).fetchone()[0]
            except psycopg.Error:
                ready = 0
            if ready == len(tracked):
                break
            if time.time() > deadline:
                raise RuntimeError("the initial load did not finish in 10 minutes")
            time.sleep(2)
        start = time.time()
        print(f"initial load done in {start - t0:.0f}s; measuring {args.changes} changes at {args.rate}/s…", flush=True)
        changes: list[dict] = []
        while len(changes) < args.changes:
            time.sleep(2)
            changes = [c for c in map(json.loads, changes_file.read_text().splitlines())
                       if c["t"] > start and c["resource"] in ENTITY]
        end = time.time()
        time.sleep(args.tail)
        rows = []
        with psycopg.connect(crm) as conn:
            for c in changes:
                hit = conn.execute(
                    "SELECT extract(epoch FROM r.received_at), extract(epoch FROM l.started_at), "
                    "extract(epoch FROM r.applied_at) FROM inbox.record r "
                    "LEFT JOIN sync.landing_run l ON l.run_id = r.run_id AND l.entity = r.entity "
                    "WHERE r.entity=%s AND r.source_key=%s AND r.received_at >= to_timestamp(%s) "
                    "AND (r.source_modified_at IS NULL OR r.source_modified_at >= to_timestamp(floor(%s))) "
                    "ORDER BY r.received_at LIMIT 1", (ENTITY[c["resource"]], str(c["id"]), c["t"], c["t"])).fetchone()
                rows.append((ENTITY[c["resource"]], c, hit))
        print(f"\n{len(changes)} changes in {end - start:.0f}s ({len(changes) / (end - start):.1f}/s); seconds from the "
              f"change in the store to its row in inbox.record:")
        print(f"{'entity':<14} {'n':>4} {'landed':>6} {'p50':>6} {'p95':>6} {'max':>6} | {'to land start p50':>17} "
              f"{'landing p50':>11} | {'to CRM row p50':>14} {'p95':>6}")
        every, every_crm = [], []
        for entity in tracked:
            mine = [(c, h) for e, c, h in rows if e == entity]
            ok = [(c, h) for c, h in mine if h]
            total = [float(h[0]) - c["t"] for c, h in ok]
            detect = [float(h[1]) - c["t"] for c, h in ok if h[1] is not None]
            land = [float(h[0]) - float(h[1]) for c, h in ok if h[1] is not None]
            to_crm = [float(h[2]) - c["t"] for c, h in ok if h[2] is not None]
            every += total
            every_crm.extend(to_crm)
            if mine:
                print(f"{entity:<14} {len(mine):>4} {len(ok):>6} {pct(total, .5):>6.2f} {pct(total, .95):>6.2f} "
                      f"{max(total, default=float('nan')):>6.2f} | {pct(detect, .5):>17.2f} {pct(land, .5):>11.2f} | "
                      f"{pct(to_crm, .5):>14.2f} {pct(to_crm, .95):>6.2f}")
        print(f"{'all':<14} {len(rows):>4} {len(every):>6} {pct(every, .5):>6.2f} {pct(every, .95):>6.2f} "
              f"{max(every, default=float('nan')):>6.2f}   (target: p95 <= 5 s)")
        print(f"to the CRM row (crm_transform, on the inbox Assets): p50 {pct(every_crm, .5):.2f}s, "
              f"p95 {pct(every_crm, .95):.2f}s, max {max(every_crm, default=float('nan')):.2f}s "
              f"({len(every_crm)} of {len(rows)} applied within the tail)")
        missing = [(e, c) for e, c, h in rows if not h]
        if missing:
            print(f"not landed within the tail: {len(missing)}, e.g. {missing[:3]}")
        if every:
            print(f"mean {statistics.mean(every):.2f}s")
        if args.writebacks:
            measure_writeback(crm, args.writebacks, args.tail)
        return 0
    finally:
        if stack is not None:
            stack.stop()
        sandbox.stop()
        with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {crm_db} WITH (FORCE)")
            conn.execute(f"DROP DATABASE IF EXISTS {meta_db} WITH (FORCE)")
        if own_pg:
            pg.stop()
        if os.environ.get("KEEP_BENCH_FILES") is None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def measure_writeback(crm: str, count: int, tail: float) -> None:
    """CRM request -> applied at the store (the outbox's answer) -> back in the CRM (the transform applied
    the store's new version), for ``count`` order status changes made one per second."""
    with psycopg.connect(crm, autocommit=True) as conn:
        orders = conn.execute("SELECT id, status FROM crm.sales_order WHERE status IN ('processing', 'on-hold') "
                              "AND deleted_at IS NULL ORDER BY id DESC LIMIT %s", (count,)).fetchall()
        asked = []
        for oid, status in orders:
            target = "on-hold" if status == "processing" else "processing"
            rid = conn.execute("SELECT crm.request_order_status(%s, %s, NULL, 'freshness bench')", (oid, target)).fetchone()[0]
            asked.append((rid, oid, target))
            time.sleep(1)
    deadline = time.time() + tail + 30
    rows = []
    while time.time() < deadline:
        with psycopg.connect(crm) as conn:
            rows = [conn.execute(
                "SELECT o.state, extract(epoch FROM o.finished_at - o.requested_at), "
                "(SELECT extract(epoch FROM min(r.applied_at) - o.requested_at) FROM inbox.record r WHERE r.entity='orders' "
                " AND r.source_key = o.record_id::text AND r.received_at >= o.requested_at AND r.payload->>'status' = %s) "
                "FROM sync.outbox o WHERE o.request_id = %s", (target, rid)).fetchone() for rid, _, target in asked]
        if all(r and r[2] is not None for r in rows):
            break
        time.sleep(2)
    to_store = [float(r[1]) for r in rows if r and r[0] == "applied" and r[1] is not None]
    to_crm = [float(r[2]) for r in rows if r and r[2] is not None]
    print(f"\nwrite-back, {len(asked)} order status requests (one per second) through the outbox:")
    print(f"  CRM request -> applied at the store: p50 {pct(to_store, .5):.2f}s, p95 {pct(to_store, .95):.2f}s "
          f"({len(to_store)} applied)")
    print(f"  CRM request -> back in the CRM:     p50 {pct(to_crm, .5):.2f}s, p95 {pct(to_crm, .95):.2f}s "
          f"({len(to_crm)} back)")
    states = {}
    for r in rows:
        states[r[0] if r else "missing"] = states.get(r[0] if r else "missing", 0) + 1
    print(f"  request states: {states}")


if __name__ == "__main__":
    sys.exit(main())
