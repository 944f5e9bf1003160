"""Transform speed: inbox rows/s into the CRM model, next to the raw COPY rate of the same rows.

    .venv/bin/python bench/transform.py [--orders 200000] [--store .data/sandbox/store-large-1.sqlite]
                                        [--before main] [--small 10]

Takes orders from a generated store (the `large` one when it is there, else a `medium` one it
generates), renders them exactly as the API would, and per variant, in its own database: COPYs them
into a bare table (the raw rate), COPYs them into the inbox, then runs the orders transform (header,
addresses, lines, line taxes and meta, tax/shipping/fee/coupon lines, promoted meta, contacts, the
unmapped fields) in batches, then times small live batches (`--small` new orders each, through
`transform(dsn, names=["orders"], only_inbox_ids=[...])`, as the landing task calls it) on the full CRM.

`--before REF` also runs the package as it is at git REF (its migrations, SQL and runner, from
`git archive`), so the figures print side by side; the variants alternate (before, after, before,
after with `--rounds 2`). Each transform runs in a child process so its peak memory can be read;
PostgreSQL's own is bounded by `work_mem` per batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402

from sandbox import project  # noqa: E402
from sandbox.storage import Store  # noqa: E402
from store_sync.crm.database import EmbeddedPostgres  # noqa: E402

COLUMNS = "entity, source_key, source_modified_at, is_delete, payload, payload_hash, run_id"
WRITTEN = ("sales_order", "sales_order_address", "sales_order_line", "sales_order_line_tax", "sales_order_line_meta",
           "sales_order_tax", "sales_order_shipping", "sales_order_fee", "sales_order_coupon", "sales_order_meta",
           "shipment", "contact", "subscription_order")
# Run in a child process with the variant's package on its path: migrate, or transform and say how it went.
CHILD = """
import json, sys, time
from store_sync.crm.migrations import migrate
from store_sync.crm.transform import transform
def peak_kb():  # this process's own high-water mark (ru_maxrss would count the parent's, kept across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
mode, dsn = sys.argv[1], sys.argv[2]
if mode == "migrate":
    migrate(dsn)
    print(json.dumps({}))
else:
    ids = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    started = time.perf_counter()
    steps = transform(dsn, names=["orders"], batch_rows=int(sys.argv[3]), only_inbox_ids=ids)
    print(json.dumps({"seconds": time.perf_counter() - started, "batches": steps[0]["batches"],
                      "peak_mb": peak_kb() / 1024}))
"""


def render(store_path: Path, limit: int, out: Path) -> int:
    store = Store(store_path)
    ids = [r[0] for r in store.db.execute(
        "SELECT id FROM posts WHERE post_type='shop_order' ORDER BY id LIMIT ?", (limit,))]
    n = 0
    with out.open("w") as f:
        for i in range(0, len(ids), 1000):
            for doc in project.orders(store, ids[i:i + 1000], "http://shop.example/wp-json/wc/v3"):
                text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                modified = doc["date_modified_gmt"] + "+00"
                row = ["orders", str(doc["id"]), modified, "t" if doc["status"] == "trash" else "f", text,
                       hashlib.md5(text.encode()).hexdigest(), "bench"]
                f.write("\t".join(v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n") for v in row) + "\n")
                n += 1
    return n


def copy_file(dsn: str, table: str, path: Path) -> float:
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor().copy(f"COPY {table} ({COLUMNS}) FROM STDIN") as copy:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                copy.write(chunk)
    return time.perf_counter() - started


def package_at(ref: str, into: Path) -> Path:
    """The package's code, SQL and registry as they are at git ``ref``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "plugins", "include"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def child(root: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{root / 'plugins'}{os.pathsep}{root}"}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_variant(pg: EmbeddedPostgres, label: str, root: Path, main_rows: Path, small_rows: list[Path], n: int,
                batch_rows: int) -> dict:
    name = f"bench_transform_{label}_{int(time.time())}"
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER crm_sync")
    dsn = pg.dsn(name)
    try:
        child(root, "migrate", dsn)
        with psycopg.connect(dsn) as conn:
            conn.execute(f"CREATE UNLOGGED TABLE raw_copy AS SELECT {COLUMNS} FROM inbox.record WITH NO DATA")
        raw = copy_file(dsn, "raw_copy", main_rows)
        with psycopg.connect(dsn) as conn:
            conn.execute("DROP TABLE raw_copy")
        inbox = copy_file(dsn, "inbox.record", main_rows)
        with psycopg.connect(dsn) as conn:  # the documents' room on disk (heap, TOAST and indexes)
            inbox_mb = conn.execute("SELECT pg_total_relation_size('inbox.record') / 1e6").fetchone()[0]
        big = child(root, "transform", dsn, str(batch_rows))
        small = []
        for rows in small_rows:  # live batches on the full CRM, as the landing task applies them
            with psycopg.connect(dsn) as conn:
                before = conn.execute("SELECT coalesce(max(inbox_id), 0) FROM inbox.record").fetchone()[0]
            copy_file(dsn, "inbox.record", rows)
            with psycopg.connect(dsn) as conn:
                ids = [r[0] for r in conn.execute("SELECT inbox_id FROM inbox.record WHERE inbox_id > %s", (before,))]
            small.append(child(root, "transform", dsn, str(batch_rows), json.dumps(ids))["seconds"])
        with psycopg.connect(dsn) as conn:
            written = sum(conn.execute(f"SELECT count(*) FROM crm.{t}").fetchone()[0] for t in WRITTEN)
            extras = conn.execute("SELECT count(*) FROM crm.sales_order_extra").fetchone()[0]
            work_mem = conn.execute("SHOW work_mem").fetchone()[0]
        return {"label": label, "raw": raw, "inbox": inbox, "inbox_mb": inbox_mb, "n": n, "written": written, "extras": extras,
                "work_mem": work_mem, "small": small, **big}
    finally:
        with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def report(runs: list[dict]) -> None:
    print(f"\n{'':<40} {'rows/s':>10} {'seconds':>8} {'vs raw COPY':>11}")
    for r in runs:
        n = r["n"]
        print(f"[{r['label']}]")
        print(f"  {'raw COPY into a bare table':<38} {n / r['raw']:>10.0f} {r['raw']:>8.1f} {1:>10.2f}x")
        print(f"  {'COPY into the inbox (indexed)':<38} {n / r['inbox']:>10.0f} {r['inbox']:>8.1f} "
              f"{r['raw'] / r['inbox']:>10.2f}x   (inbox.record {r['inbox_mb']:.0f} MB)")
        print(f"  {'orders transform (inbox rows)':<38} {n / r['seconds']:>10.0f} {r['seconds']:>8.1f} "
              f"{r['raw'] / r['seconds']:>10.2f}x   ({r['written']} CRM rows written, {r['written'] / r['seconds']:.0f}/s; "
              f"{r['extras']} unmapped fields kept; {r['batches']} batches)")
        if r["small"]:
            print(f"  {'small live batch (median of ' + str(len(r['small'])) + ')':<38} {'':>10} "
                  f"{statistics.median(r['small']):>8.3f}   (each: {', '.join(f'{s:.3f}' for s in r['small'])} s)")
        print(f"  peak memory of the transform task: {r['peak_mb']:.0f} MB (PostgreSQL work_mem {r['work_mem']})")
    labels = sorted({r["label"] for r in runs})
    if len(labels) == 2:
        ratio = {lb: statistics.median([r["raw"] / r["seconds"] for r in runs if r["label"] == lb]) for lb in labels}
        rate = {lb: statistics.median([r["n"] / r["seconds"] for r in runs if r["label"] == lb]) for lb in labels}
        small = {lb: statistics.median([s for r in runs if r["label"] == lb for s in r["small"]] or [0]) for lb in labels}
        before, after = "before", "after"
        print(f"\nmedian over rounds: transform {rate[before]:.0f} → {rate[after]:.0f} orders/s "
              f"({rate[after] / rate[before]:.1f}x); vs raw COPY {ratio[before]:.2f}x → {ratio[after]:.2f}x; "
              f"small batch {small[before]:.3f} → {small[after]:.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=200_000)
    parser.add_argument("--store", default=str(REPO / ".data" / "sandbox" / "store-large-1.sqlite"))
    parser.add_argument("--before", metavar="REF", help="also run the package as it is at this git ref")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per variant")
    parser.add_argument("--small", type=int, default=10, help="orders per small live batch (0: none)")
    parser.add_argument("--small-batches", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=20_000)
    args = parser.parse_args()
    store_path = Path(args.store)
    if not store_path.exists():
        from sandbox.generate import generate

        store_path = REPO / ".data" / "sandbox" / "store-medium-1.sqlite"
        if not store_path.exists():
            print(f"generating a medium store at {store_path}…", flush=True)
            generate(store_path, "medium", 1)
    pg = EmbeddedPostgres()
    own = not pg.is_running()
    pg.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            all_rows = tmp / "orders.tsv"
            t0 = time.perf_counter()
            held = args.small * args.small_batches
            total = render(store_path, args.orders + held, all_rows)
            lines = all_rows.read_text().splitlines(keepends=True)
            n = total - held
            main_rows = tmp / "main.tsv"
            main_rows.write_text("".join(lines[:n]))
            small_rows = []
            for i in range(args.small_batches if args.small else 0):
                path = tmp / f"small{i}.tsv"
                path.write_text("".join(lines[n + i * args.small:n + (i + 1) * args.small]))
                small_rows.append(path)
            print(f"{n} orders (+{held} for small batches) rendered as the API shows them in "
                  f"{time.perf_counter() - t0:.0f}s ({main_rows.stat().st_size / n:.0f} bytes each) from {store_path.name}")
            variants = [("after", REPO)]
            if args.before:
                variants.insert(0, ("before", package_at(args.before, tmp / "before")))
            runs = []
            for round_no in range(args.rounds):
                for label, root in variants:
                    print(f"round {round_no + 1}: {label}…", flush=True)
                    runs.append(run_variant(pg, label, root, main_rows, small_rows, n, args.batch_rows))
            report(runs)
        return 0
    finally:
        if own:
            pg.stop()


if __name__ == "__main__":
    sys.exit(main())
