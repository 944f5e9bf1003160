"""What a quiet store costs: store requests, CPU and Airflow metadata rows per hour, on the live stack.

    .venv/bin/python bench/idle.py [--minutes 10] [--size small] [--rate 1]
    .venv/bin/python bench/idle.py --minutes 2            # a quick run (quiet after 30 s instead of 5 min)

Starts everything as `bench/freshness.py` does, on throw-away databases: the embedded PostgreSQL (a CRM
database and an Airflow metadata database of its own), the sandbox store (logging every request it
answers), Airflow's api-server, scheduler, dag-processor and triggerer, every DAG unpaused, the customer
webhooks registered. It runs twice, side by side:

* **before**: adaptive polling off (Variable `store_sync_overrides` = `{"*": {"quiet_poll_seconds": 0}}`),
  the triggers polling every `poll_seconds` around the clock, as the previous release did;
* **after**: the defaults (slow polling once `quiet_after_seconds` passed without a change).

Each run waits for the initial load, lets the store be quiet for `quiet_after_seconds` (300 s; 30 s with
`--minutes` under 5, said in the output), then measures **--minutes of quiet**, then **--minutes with
changes flowing** (the sandbox's simulator at --rate changes/s), and prints per phase: store requests per
hour (counted at the sandbox), the CPU share of each process group (psutil, % of one core) and metadata
rows added per hour (dag_run, task_instance, asset_event, xcom, log), and, with changes, the seconds from
a change to its inbox row (freshness must not suffer). Then the before/after table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psutil  # noqa: E402
import psycopg  # noqa: E402
import requests  # noqa: E402

from store_sync.crm.database import EmbeddedPostgres  # noqa: E402
from store_sync.local.stack import AirflowStack  # noqa: E402
from tests.helpers import SandboxProcess, free_port  # noqa: E402

META_TABLES = ("dag_run", "task_instance", "asset_event", "xcom", "log")
ENTITY = {"order": "orders", "subscription": "subscriptions", "product": "products", "customer": "customers"}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(proc: psutil.Process) -> float:
    """A process's CPU, its reaped children's and its live descendants' (task runners come and go)."""
    total = 0.0
    try:
        t = proc.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


class Groups:
    """CPU per process group: each Airflow component (with the task processes it starts), the sandbox,
    and the PostgreSQL server (CRM and metadata databases together)."""

    def __init__(self, stack: AirflowStack, sandbox: SandboxProcess, pg: EmbeddedPostgres):
        self.roots = {name: [psutil.Process(p.pid)] for name, p in stack.procs.items()}
        self.roots["sandbox"] = [psutil.Process(sandbox.proc.pid)]
        pid = int((pg.pgdata / "postmaster.pid").read_text().splitlines()[0])
        self.roots["postgresql"] = [psutil.Process(pid)]

    def snapshot(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in procs) for name, procs in self.roots.items()}


def meta_rows(meta_dsn: str) -> dict[str, int]:
    with psycopg.connect(meta_dsn) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in META_TABLES}


def store_requests(log: Path, since: float, until: float) -> dict[str, int]:
    by_path: dict[str, int] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        if since <= r["t0"] < until and r["path"].startswith("/wp-json/"):
            key = r["path"].removeprefix("/wp-json/wc/v3/").split("/")[0]
            by_path[key] = by_path.get(key, 0) + 1
    return by_path


def measure(label: str, seconds: float, log: Path, meta_dsn: str, groups: Groups) -> dict:
    rows0, cpu0, t0 = meta_rows(meta_dsn), groups.snapshot(), time.time()
    time.sleep(seconds)
    rows1, cpu1, t1 = meta_rows(meta_dsn), groups.snapshot(), time.time()
    hours = (t1 - t0) / 3600
    reqs = store_requests(log, t0, t1)
    out = {"label": label, "seconds": t1 - t0, "t0": t0, "t1": t1,
           "requests_per_hour": sum(reqs.values()) / hours,
           "requests_by_endpoint": {k: round(v / hours) for k, v in sorted(reqs.items(), key=lambda kv: -kv[1])},
           "cpu_share": {k: (cpu1[k] - cpu0[k]) / (t1 - t0) * 100 for k in cpu0},
           "rows_per_hour": {t: (rows1[t] - rows0[t]) / hours for t in META_TABLES}}
    print(f"  {label}: {out['requests_per_hour']:,.0f} store requests/h "
          f"({', '.join(f'{k} {v:,}' for k, v in list(out['requests_by_endpoint'].items())[:5])}); "
          f"CPU {sum(out['cpu_share'].values()):.0f}% of a core; "
          f"metadata rows/h {sum(out['rows_per_hour'].values()):,.0f}", flush=True)
    return out


def freshness(crm: str, changes_file: Path, t0: float, t1: float) -> list[float]:
    changes = [c for c in map(json.loads, changes_file.read_text().splitlines())
               if t0 < c["t"] < t1 and c["resource"] in ENTITY]
    out = []
    with psycopg.connect(crm) as conn:
        for c in changes:
            hit = conn.execute(
                "SELECT extract(epoch FROM received_at) FROM inbox.record WHERE entity=%s AND source_key=%s "
                "AND received_at >= to_timestamp(%s) AND (source_modified_at IS NULL OR "
                "source_modified_at >= to_timestamp(floor(%s))) ORDER BY received_at LIMIT 1",
                (ENTITY[c["resource"]], str(c["id"]), c["t"], c["t"])).fetchone()
            if hit:
                out.append(float(hit[0]) - c["t"])
    return out


def run(mode: str, args, pg: EmbeddedPostgres, quiet_after: float) -> dict:
    stamp = f"{mode}_{int(time.time())}"
    crm_db, meta_db = f"crm_idle_{stamp}", f"airflow_idle_{stamp}"
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {crm_db} OWNER crm_sync")
        conn.execute(f"CREATE DATABASE {meta_db} OWNER crm_sync")
    crm, meta = pg.dsn(crm_db), pg.dsn(meta_db)
    tmp = Path(tempfile.mkdtemp(prefix=f"idle-{mode}-"))
    log, changes_file = tmp / "requests.jsonl", tmp / "changes.jsonl"
    port = free_port()
    sandbox = SandboxProcess(tmp, size=args.size, seed=1, extra=[
        "--request-log", str(log), "--change-log", str(changes_file), "--webhook-delay", "0.2"])
    overrides = {"*": {"quiet_poll_seconds": 0}} if mode == "before" else {"*": {"quiet_after_seconds": quiet_after}}
    store_conn = json.dumps({"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox",
                             "extra": {"requests_per_second": 20, "max_in_flight": 3,
                                       "webhook_url": f"http://127.0.0.1:{port}", "webhook_secret": "idle-bench"}})
    os.environ["AIRFLOW_CONN_STORE_API"] = store_conn
    os.environ["CRM_DATABASE_URL"] = crm
    stack = AirflowStack(tmp / "airflow", meta.replace("postgresql://", "postgresql+psycopg://", 1), port=port,
                         extra_env={"CRM_DATABASE_URL": crm, "AIRFLOW_CONN_STORE_API": store_conn,
                                    "AIRFLOW_VAR_STORE_SYNC_OVERRIDES": json.dumps(overrides)})
    try:
        print(f"\n== {mode}: overrides {overrides}", flush=True)
        stack.setup()
        stack.start()
        from store_sync.store.webhooks import register_webhooks

        register_webhooks()
        tracked = sorted(set(ENTITY.values()))
        deadline = time.time() + 900
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
                raise RuntimeError("the initial load did not finish in 15 minutes")
            time.sleep(2)
        settle = quiet_after + 15
        print(f"  initial load done; the store stays quiet {settle:.0f}s before measuring", flush=True)
        time.sleep(settle)
        groups = Groups(stack, sandbox, pg)
        quiet = measure("quiet", args.minutes * 60, log, meta, groups)
        requests.post(f"{sandbox.url}/sandbox/control", json={"rate": args.rate}, timeout=10)
        busy = measure(f"changes at {args.rate}/s", args.minutes * 60, log, meta, groups)
        requests.post(f"{sandbox.url}/sandbox/control", json={"rate": 0}, timeout=10)
        time.sleep(20)
        lat = freshness(crm, changes_file, busy["t0"], busy["t1"] - 20)
        busy["freshness"] = {"n": len(lat), "p50": pct(lat, .5), "p95": pct(lat, .95)}
        print(f"  change -> inbox row while changes flow: p50 {pct(lat, .5):.2f}s p95 {pct(lat, .95):.2f}s "
              f"({len(lat)} changes)", flush=True)
        return {"quiet": quiet, "busy": busy}
    finally:
        stack.stop()
        sandbox.stop()
        with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {crm_db} WITH (FORCE)")
            conn.execute(f"DROP DATABASE IF EXISTS {meta_db} WITH (FORCE)")
        if os.environ.get("KEEP_BENCH_FILES") is None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def report(results: dict, args, quiet_after: float) -> None:
    before, after = results["before"], results["after"]
    print(f"\n{args.minutes:g}-minute phases, {args.size} store, quiet after {quiet_after:.0f}s, "
          f"{os.cpu_count()} cores, loopback (figures per hour)")
    print(f"{'':<34} {'before':>12} {'after':>12} {'after/before':>13}")
    for phase in ("quiet", "busy"):
        b, a = before[phase], after[phase]
        print(f"-- {b['label']}")
        print(f"{'store requests/h':<34} {b['requests_per_hour']:>12,.0f} {a['requests_per_hour']:>12,.0f} "
              f"{ratio(a['requests_per_hour'], b['requests_per_hour']):>13}")
        for group in b["cpu_share"]:
            print(f"{'CPU % of a core: ' + group:<34} {b['cpu_share'][group]:>12.1f} {a['cpu_share'][group]:>12.1f} "
                  f"{ratio(a['cpu_share'][group], b['cpu_share'][group]):>13}")
        total_b, total_a = sum(b["cpu_share"].values()), sum(a["cpu_share"].values())
        print(f"{'CPU % of a core: all':<34} {total_b:>12.1f} {total_a:>12.1f} {ratio(total_a, total_b):>13}")
        for table in META_TABLES:
            print(f"{'metadata rows/h: ' + table:<34} {b['rows_per_hour'][table]:>12,.0f} "
                  f"{a['rows_per_hour'][table]:>12,.0f} {ratio(a['rows_per_hour'][table], b['rows_per_hour'][table]):>13}")
        if "freshness" in b:
            print(f"{'change -> inbox p50 / p95 (s)':<34} {b['freshness']['p50']:>5.2f}/{b['freshness']['p95']:<6.2f} "
                  f"{a['freshness']['p50']:>5.2f}/{a['freshness']['p95']:<6.2f}")
    print("The metadata rows are what each hour adds; airflow_metadata_cleanup removes those older than "
          "keep_hours (24), so the tables hold about a day of them.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="length of each measured phase")
    parser.add_argument("--size", default="small")
    parser.add_argument("--rate", type=float, default=1.0, help="store changes per second in the busy phase")
    parser.add_argument("--quiet-after", type=float, default=None,
                        help="seconds without change before the triggers slow down (default 300; 30 when "
                             "--minutes is under 5)")
    parser.add_argument("--only", choices=("before", "after"), help="run one side only")
    args = parser.parse_args()
    quiet_after = args.quiet_after if args.quiet_after is not None else (300.0 if args.minutes >= 5 else 30.0)
    pg = EmbeddedPostgres()
    own_pg = not pg.is_running()
    pg.start()
    try:
        results = {}
        for mode in ("before", "after"):
            if args.only in (None, mode):
                results[mode] = run(mode, args, pg, quiet_after)
        if len(results) == 2:
            report(results, args, quiet_after)
        out = REPO / ".data" / "bench-idle.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "quiet_after": quiet_after, **results}, indent=1))
        print(f"\nraw figures: {out}")
        return 0
    finally:
        if own_pg:
            pg.stop()


if __name__ == "__main__":
    sys.exit(main())
