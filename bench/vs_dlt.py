"""The same first load by this package and by dlt, side by side in one run (A/B/A/B).

    make bench-dlt ARGS="--size medium --mode prerendered"
    .venv/bin/python bench/vs_dlt.py --size small --mode plain --rounds 2

What is loaded: orders (with their lines), customers, products, product categories and subscriptions,
trash included, from one sandbox store (a copy of ``.data/sandbox/store-SIZE-1.sqlite``, or ``--store``)
served over HTTPS, HTTP Basic auth for both, into empty PostgreSQL databases of one embedded server:

* **ours** (A): what ``make demo ARGS=--once`` runs: the package's first load (``inbound/first_load.py``)
  on the store connection's first-load budget, landing into the inboxes AND the 3NF transform into
  ``crm.*``, the complete path; the code lists come along (four small requests; the 3NF needs them),
  and each variable product's variations (ours only: the bench counts products without them);
* **dlt** (B): dlt's ``rest_api`` source (``bench/requirements-dlt.txt``, in its own ``.venv-dlt``,
  made on first use), write disposition merge on ``id``, its default normalisation into child tables
  (``orders__line_items``...), ``header_link`` paging, one resource per list and one per trash.

Each side runs as its own process. Printed per run and as medians: wall time (process start to exit:
what a user waits), records/s (the top-level records both load), CPU seconds of the pipeline's process
tree, of PostgreSQL (the postmaster's reaped backends plus its live processes) and of the sandbox, CPU
seconds per 1,000 records, peak memory (RSS of the process tree, sampled), the ratios, and the record
counts of both databases, which must be equal or the comparison is void (exit 1).

Sandbox modes (``--mode``): ``plain`` (the sandbox as it is), ``prerendered`` (``--workers N
--prerender``: list pages answered from pre-rendered bodies, the pipelines' own speed) and
``realistic`` (``--page-latency`` and ``--max-concurrent``: a hosted shop's 1-3 s per page and 429/503
past its concurrency limit; a counting proxy in front of the sandbox checks that ours never exceeds
its request budget). Modes other than ``plain`` need the sandbox's scale flags (branch sandbox-scale).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DLT_VENV = REPO / ".venv-dlt"
DLT_REQUIREMENTS = REPO / "bench" / "requirements-dlt.txt"
KEY, SECRET = "ck_sandbox", "cs_sandbox"
# What both load, by the sandbox's names; ours' registry names and dlt's table names for each.
COMPARED = {
    "orders": ("SELECT count(*) FROM crm.sales_order", "orders"),
    "order lines": ("SELECT count(*) FROM crm.sales_order_line", "orders__line_items"),
    "customers": ("SELECT count(*) FROM crm.customer", "customers"),
    "products": ("SELECT count(*) FROM crm.product WHERE parent_id IS NULL", "products"),
    "categories": ("SELECT count(*) FROM crm.product_category", "product_categories"),
    "subscriptions": ("SELECT count(*) FROM crm.subscription", "subscriptions"),
}
TOP_LEVEL = ("orders", "customers", "products", "categories", "subscriptions")
OURS = ["orders", "customers", "products", "product_categories", "subscriptions", "countries", "payment_gateways",
        "tax_classes", "subscription_statuses"]


# ------------------------------------------------------------------------------------------------
# The two sides, each run in a process of its own (``--side``)
# ------------------------------------------------------------------------------------------------
def side_ours(args: argparse.Namespace) -> dict:
    """The package's first load, as ``make demo ARGS=--once`` runs it (connections from the environment)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
    sys.path[:0] = [str(REPO / "plugins"), str(REPO)]
    from store_sync.inbound.first_load import first_load
    from store_sync.store.hooks import StoreApiHook
    from store_sync.tasks import ready_crm

    hook = StoreApiHook()
    hook.overrides = hook.first_load_budget()
    result = first_load(ready_crm(), hook.get_client(), f"vs-dlt-{int(time.time())}", OURS,
                        transform=not os.environ.get("VS_DLT_LAND_ONLY"))  # diagnosis: landing alone
    return {"requests": result["requests"], "load_seconds": result["seconds"],
            "retries": hook.get_client().stats.retries, "throttled": hook.get_client().stats.throttled}


def side_dlt(args: argparse.Namespace) -> dict:
    """dlt's rest_api source as a data engineer would write it for this store."""
    import dlt
    from dlt.sources.rest_api import rest_api_source

    def listing(name: str, path: str, table: str | None = None, **params) -> dict:
        return {"name": name, "table_name": table or name,
                "endpoint": {"path": path, "params": {"per_page": 100, **params}}}

    config = {
        "client": {"base_url": f"{args.store_url}/wp-json/wc/v3/",
                   "auth": {"type": "http_basic", "username": KEY, "password": SECRET},
                   "paginator": {"type": "header_link"}},
        "resource_defaults": {"primary_key": "id", "write_disposition": "merge",
                              **({"parallelized": True} if args.dlt_parallel else {})},
        "resources": [
            listing("orders", "orders", status="any"), listing("orders_trash", "orders", "orders", status="trash"),
            listing("customers", "customers", role="all"),
            listing("products", "products", status="any"),
            listing("products_trash", "products", "products", status="trash"),
            listing("product_categories", "products/categories"),
            listing("subscriptions", "subscriptions", status="any"),
            listing("subscriptions_trash", "subscriptions", "subscriptions", status="trash"),
        ],
    }
    started = time.monotonic()
    pipeline = dlt.pipeline(pipeline_name="vs_dlt", pipelines_dir=args.work_dir, dataset_name="store",
                            destination=dlt.destinations.postgres(credentials=args.dsn))
    pipeline.run(rest_api_source(config))
    return {"load_seconds": round(time.monotonic() - started, 2)}


def run_side(args: argparse.Namespace) -> int:
    import resource

    out = side_ours(args) if args.side == "ours" else side_dlt(args)
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# The harness
# ------------------------------------------------------------------------------------------------
def ensure_dlt_venv() -> Path:
    python = DLT_VENV / "bin" / "python"
    stamp = DLT_VENV / ".installed"
    if not stamp.exists() or stamp.read_text() != DLT_REQUIREMENTS.read_text():
        print(f"Installing dlt into {DLT_VENV} from {DLT_REQUIREMENTS.name} (benchmark only)…", flush=True)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(DLT_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(DLT_REQUIREMENTS)], check=True)
        stamp.write_text(DLT_REQUIREMENTS.read_text())
    return python


def tree_cpu(proc) -> float:
    """CPU seconds of a process, its live children and the children it has reaped."""
    import psutil

    total = 0.0
    try:
        t = proc.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


class MemorySampler:
    """Peak RSS of a process tree, sampled every 50 ms."""

    def __init__(self, pid: int):
        import psutil

        self.peak, self._stop = 0, threading.Event()
        self.proc = psutil.Process(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run_once(side: str, python: Path, env: dict, cli: list[str], pg, sandbox_proc, log: Path) -> dict:
    import psutil

    postmaster = psutil.Process(int((pg.pgdata / "postmaster.pid").read_text().split()[0]))
    sandbox = psutil.Process(sandbox_proc.pid)
    pg0, sb0 = tree_cpu(postmaster), tree_cpu(sandbox)
    started = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n==== {side} {time.strftime('%H:%M:%S')}\n")
        out.flush()
        proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--side", side, *cli], env=env,
                                stdout=subprocess.PIPE, stderr=out, text=True, cwd=REPO)
        sampler = MemorySampler(proc.pid)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the CPU of the process and of every child it reaped
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak = sampler.stop()
        out.write(stdout)
    wall = time.monotonic() - started
    time.sleep(0.5)  # backends exit when their connections close: let the postmaster reap them
    result = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"{side} failed (exit {proc.returncode}); see {log}")
    return {"side": side, "wall": wall, "cpu_client": usage.ru_utime + usage.ru_stime,
            "cpu_pg": tree_cpu(postmaster) - pg0, "cpu_sandbox": tree_cpu(sandbox) - sb0,
            "peak_mb": max(peak, result.get("maxrss_mb", 0)), **result}


def counts(dsn: str, side: str) -> dict[str, int]:
    import psycopg

    out = {}
    with psycopg.connect(dsn) as conn:
        for name, (ours_sql, table) in COMPARED.items():
            sql = ours_sql if side == "ours" else f'SELECT count(*) FROM store."{table}"'
            try:
                out[name] = conn.execute(sql).fetchone()[0]
            except psycopg.Error:
                conn.rollback()
                out[name] = -1
    return out


def copy_store(source: Path, target: Path) -> None:
    """A consistent copy, pages still in the source's write-ahead log included."""
    import sqlite3

    src, dst = sqlite3.connect(f"file:{source}?mode=ro", uri=True), sqlite3.connect(target)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()


def truth_counts(db: Path) -> dict[str, int]:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    q = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
    return {"orders": q("SELECT count(*) FROM posts WHERE post_type='shop_order'"),
            "customers": q("SELECT count(*) FROM users"),
            "products": q("SELECT count(*) FROM posts WHERE post_type='product'"),
            "subscriptions": q("SELECT count(*) FROM posts WHERE post_type='shop_subscription'")}


def sandbox_mode_args(args: argparse.Namespace) -> list[str]:
    if args.mode == "plain":
        extra = []
    elif args.mode == "prerendered":
        extra = ["--workers", str(args.workers), "--prerender"]
    else:
        extra = ["--page-latency", args.page_latency, "--max-concurrent", str(args.max_concurrent)]
    extra += args.sandbox_arg or []
    help_text = subprocess.run([sys.executable, "-m", "sandbox", "serve", "--help"], cwd=REPO, capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    missing = [a for a in extra if a.startswith("--") and a not in help_text]
    if missing:
        raise SystemExit(f"this sandbox has no {', '.join(missing)} (mode {args.mode!r} needs the sandbox's scale "
                         "flags: merge the branch sandbox-scale), or use --mode plain")
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "dlt"], help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--store-url", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="small", help="sandbox store size (small, 10k, medium, large)")
    parser.add_argument("--store", help="store file to copy (default .data/sandbox/store-SIZE-1.sqlite, generated "
                                        "if missing, or /work/main's)")
    parser.add_argument("--mode", choices=["plain", "prerendered", "realistic"], default="plain")
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs (default 2: A/B/A/B)")
    parser.add_argument("--workers", type=int, default=2, help="sandbox worker processes (prerendered mode)")
    parser.add_argument("--page-latency", default="1-3", help="realistic mode: seconds per page of 100")
    parser.add_argument("--max-concurrent", type=int, default=4, help="realistic mode: the shop's concurrency limit")
    parser.add_argument("--sandbox-arg", action="append", help="one more argument for `sandbox serve` (repeatable)")
    parser.add_argument("--rps", type=float, help="ours: first_load_requests_per_second (default: 1000 in "
                                                  "prerendered/plain mode, the extra's default 10 in realistic)")
    parser.add_argument("--in-flight", type=int, help="ours: first_load_max_in_flight (default 4)")
    parser.add_argument("--dlt-parallel", action="store_true", help="dlt: parallelized resources (default: off, "
                                                                    "dlt's default sequential paging)")
    parser.add_argument("--sides", default="ours,dlt", help=argparse.SUPPRESS)  # development: one side alone
    parser.add_argument("--fresh-copy", action="store_true", help="copy the store again (default: reuse the copy "
                                                                  "in .data/vs-dlt/, pre-rendered pages included)")
    parser.add_argument("--keep", action="store_true", help="keep the databases (default: dropped after counting)")
    args = parser.parse_args(argv)
    if args.side:
        return run_side(args)

    sys.path[:0] = [str(REPO / "plugins"), str(REPO)]
    import psycopg

    from store_sync.crm.database import EmbeddedPostgres
    from tests.helpers import CountingProxy, free_port

    dlt_python = ensure_dlt_venv()
    work = Path(tempfile.mkdtemp(prefix="vs-dlt-", dir=REPO / ".data" if (REPO / ".data").exists() else None))
    source = Path(args.store) if args.store else REPO / ".data" / "sandbox" / f"store-{args.size}-1.sqlite"
    if not source.exists() and not args.store and Path(f"/work/main/.data/sandbox/store-{args.size}-1.sqlite").exists():
        source = Path(f"/work/main/.data/sandbox/store-{args.size}-1.sqlite")
    if not source.exists():
        print(f"Generating the {args.size} store into {source}…", flush=True)
        subprocess.run([sys.executable, "-m", "sandbox", "generate", "--size", args.size, "--db", str(source)],
                       check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    # The serving sandbox writes (its keys, the pre-rendered pages): never into the original. The copy is
    # kept for the next run (pre-rendering a medium store takes minutes); --fresh-copy makes a new one.
    store_db = REPO / ".data" / "vs-dlt" / f"{source.stem}-copy.sqlite"
    store_db.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh_copy or not store_db.exists():
        store_db.unlink(missing_ok=True)
        copy_store(source, store_db)
    truth = truth_counts(store_db)
    log = work / "runs.log"
    mode_args = sandbox_mode_args(args)

    # A server of its own per mode: its CPU is this run's alone (not the tests', not another bench's).
    pg = EmbeddedPostgres(REPO / ".data" / "vs-dlt" / f"pg-{args.mode}-{args.size}")
    own_pg = not pg.is_running()
    pg.start()
    port = free_port()
    sandbox_env = {**os.environ, "PYTHONPATH": str(REPO), "SANDBOX_DATA_DIR": str(work)}
    sandbox = subprocess.Popen([sys.executable, "-m", "sandbox", "serve", "--port", str(port), "--db", str(store_db),
                                "--tls", *mode_args], cwd=REPO, env=sandbox_env, stdout=open(work / "sandbox.log", "w"),
                               stderr=subprocess.STDOUT)
    cert = work / "tls" / "sandbox-cert.pem"
    proxy = None
    made: list[str] = []
    try:
        import requests

        deadline = time.monotonic() + 600
        while True:
            try:
                requests.get(f"https://127.0.0.1:{port}/wp-json/wc/v3", timeout=2, verify=False)
                break
            except requests.RequestException:
                if sandbox.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the sandbox did not start: {(work / 'sandbox.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        store_url = f"https://127.0.0.1:{port}"
        if args.mode == "realistic":  # count what the store sees: the request budget is checked there
            proxy = CountingProxy(port, tls=(cert, work / "tls" / "sandbox-key.pem"))
            store_url = proxy.url
        rps = args.rps or (10.0 if args.mode == "realistic" else 1000.0)
        in_flight = args.in_flight or 4
        print(f"Store: {source.name} ({truth['orders']:,} orders, {truth['customers']:,} customers, "
              f"{truth['products']:,} products, {truth['subscriptions']:,} subscriptions), sandbox mode {args.mode} "
              f"{' '.join(mode_args)}; HTTPS + Basic auth for both; ours' first-load budget {rps:g} requests/s, "
              f"{in_flight} in flight; dlt {'parallelized' if args.dlt_parallel else 'sequential (its default)'}",
              flush=True)
        runs = []
        for n in range(args.rounds):
            for side in args.sides.split(","):
                name = f"vs_{side}_{n}_{int(time.time()) % 100000}"
                with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {name} OWNER crm_sync")
                made.append(name)
                dsn = pg.dsn(name)
                env = {**os.environ, "CRM_DATABASE_URL": dsn, "PYTHONPATH": f"{REPO / 'plugins'}:{REPO}",
                       "RUNTIME__DLTHUB_TELEMETRY": "false", "REQUESTS_CA_BUNDLE": str(cert),
                       "AIRFLOW_CONN_STORE_API": json.dumps({
                           "conn_type": "http", "host": store_url, "login": KEY, "password": SECRET,
                           "extra": {"verify": str(cert), "first_load_requests_per_second": rps,
                                     "first_load_max_in_flight": in_flight}})}
                if proxy:
                    proxy.requests.clear()
                cli = ["--dsn", dsn, "--store-url", store_url, "--work-dir", str(work / f"dlt-{name}"),
                       *(["--dlt-parallel"] if args.dlt_parallel else [])]
                run = run_once(side, dlt_python if side == "dlt" else Path(sys.executable), env, cli, pg, sandbox, log)
                run["counts"] = counts(dsn, side)
                run["records"] = sum(run["counts"][k] for k in TOP_LEVEL)
                if proxy:
                    run["busiest_second"], run["most_in_flight"] = proxy.busiest_second(), proxy.most_in_flight()
                    run["store_requests"] = len(proxy.store_api())
                runs.append(run)
                print(line(run, n), flush=True)
                if not args.keep:
                    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
                        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        return report(runs, rps, in_flight, args)
    finally:
        if proxy:
            proxy.close()
        sandbox.terminate()
        try:
            sandbox.wait(10)
        except subprocess.TimeoutExpired:
            sandbox.kill()
        if own_pg:
            pg.stop()
        print(f"(logs in {work})")


def cpu(run: dict) -> float:
    return run["cpu_client"] + run["cpu_pg"] + run["cpu_sandbox"]


def line(run: dict, n: int) -> str:
    extra = (f"  store: {run['store_requests']} requests, busiest second {run['busiest_second']}, "
             f"{run['most_in_flight']} in flight" if "busiest_second" in run else "")
    return (f"  round {n + 1} {run['side']:<4} wall {run['wall']:7.1f}s  {run['records'] / run['wall']:8.0f} records/s  "
            f"CPU {cpu(run):6.1f}s (pipeline {run['cpu_client']:.1f}, PostgreSQL {run['cpu_pg']:.1f}, sandbox "
            f"{run['cpu_sandbox']:.1f}) = {1000 * cpu(run) / max(run['records'], 1):.2f} CPU-s/1k records  "
            f"peak {run['peak_mb']:.0f} MB{extra}")


def report(runs: list[dict], rps: float, in_flight: int, args: argparse.Namespace) -> int:
    if len({r["side"] for r in runs}) < 2:
        return 0
    med = {}
    for side in ("ours", "dlt"):
        mine = [r for r in runs if r["side"] == side]
        med[side] = {k: statistics.median(f(r) for r in mine) for k, f in {
            "wall": lambda r: r["wall"], "rate": lambda r: r["records"] / r["wall"], "cpu": cpu,
            "cpu_client": lambda r: r["cpu_client"], "cpu_pg": lambda r: r["cpu_pg"],
            "cpu_sandbox": lambda r: r["cpu_sandbox"], "per_k": lambda r: 1000 * cpu(r) / max(r["records"], 1),
            "peak": lambda r: r["peak_mb"]}.items()}
    print(f"\nMedians of {args.rounds} runs each ({args.size} store, sandbox mode {args.mode}):")
    print(f"  {'':<28}{'ours':>12}{'dlt':>12}{'ours/dlt':>10}")
    for label, key, fmt_ in (("wall time (s)", "wall", "{:.1f}"), ("records/s", "rate", "{:.0f}"),
                             ("CPU s, total", "cpu", "{:.1f}"), ("  CPU s, pipeline", "cpu_client", "{:.1f}"),
                             ("  CPU s, PostgreSQL", "cpu_pg", "{:.1f}"), ("  CPU s, sandbox", "cpu_sandbox", "{:.1f}"),
                             ("CPU s per 1,000 records", "per_k", "{:.2f}"), ("peak memory (MB)", "peak", "{:.0f}")):
        o, d = med["ours"][key], med["dlt"][key]
        print(f"  {label:<28}{fmt_.format(o):>12}{fmt_.format(d):>12}{(o / d if d else float('nan')):>9.2f}x")
    speed = med["ours"]["rate"] / med["dlt"]["rate"]
    cpu_ratio = med["ours"]["per_k"] / med["dlt"]["per_k"]
    print(f"  ours: {speed:.2f}x dlt's records/s, {cpu_ratio:.2f}x its CPU per record")
    ok = True
    print("\nRecord counts (every run must agree):")
    for name in COMPARED:
        values = [r["counts"][name] for r in runs]
        same = len(set(values)) == 1
        ok &= same
        shown = " ".join(f"{r['side']}={r['counts'][name]:,}" for r in runs)
        print(f"  {name:<14} {shown}  {'equal' if same else 'DIFFERENT'}")
    if any(r.get("busiest_second") is not None for r in runs):
        for r in runs:
            if r["side"] == "ours":
                within = r["busiest_second"] <= rps + 1 and r["most_in_flight"] <= in_flight
                print(f"  ours' budget at the store: busiest second {r['busiest_second']} (budget {rps:g}/s), "
                      f"{r['most_in_flight']} in flight (budget {in_flight}): {'within' if within else 'EXCEEDED'}")
                ok &= within
    if not ok:
        print("\nCOMPARISON VOID: the two databases do not hold the same records (or the budget was exceeded)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
