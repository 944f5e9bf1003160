"""Transform speed: inbox rows/s into the CRM model, next to the raw COPY rate of the same rows.

    .venv/bin/python bench/transform.py [--orders 200000] [--store .data/sandbox/store-large-1.sqlite]

Takes orders from a generated store (the `large` one when it is there, else a `medium` one it
generates), renders them exactly as the API would, and in one run: COPYs them into a bare table
(the raw rate), COPYs them into the inbox, then runs the orders transform (header, addresses, lines,
line taxes and meta, tax/shipping/fee/coupon lines, promoted meta, contacts) in batches. The
transform runs in a child process so its peak memory can be read; PostgreSQL's own is bounded by
`work_mem` per batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402

from sandbox import project  # noqa: E402
from sandbox.storage import Store  # noqa: E402
from store_sync.crm.database import EmbeddedPostgres  # noqa: E402
from store_sync.crm.migrations import migrate  # noqa: E402

COLUMNS = "entity, source_key, source_modified_at, is_delete, payload, payload_hash, run_id"


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


def child_transform(dsn: str, queue) -> None:
    from store_sync.crm.transform import transform

    started = time.perf_counter()
    steps = transform(dsn, names=["orders"], batch_rows=20_000)
    queue.put((time.perf_counter() - started, steps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=200_000)
    parser.add_argument("--store", default=str(REPO / ".data" / "sandbox" / "store-large-1.sqlite"))
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
    name = f"bench_transform_{int(time.time())}"
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER crm_sync")
    dsn = pg.dsn(name)
    try:
        migrate(dsn)
        with tempfile.TemporaryDirectory() as tmp:
            rows_file = Path(tmp) / "orders.tsv"
            t0 = time.perf_counter()
            n = render(store_path, args.orders, rows_file)
            size = rows_file.stat().st_size
            print(f"{n} orders rendered as the API shows them in {time.perf_counter() - t0:.0f}s "
                  f"({size / n:.0f} bytes each) from {store_path.name}")
            with psycopg.connect(dsn) as conn:
                conn.execute(f"CREATE UNLOGGED TABLE raw_copy AS SELECT {COLUMNS} FROM inbox.record WITH NO DATA")
            raw = copy_file(dsn, "raw_copy", rows_file)
            inbox = copy_file(dsn, "inbox.record", rows_file)
        with psycopg.connect(dsn) as conn:
            conn.execute("DROP TABLE raw_copy")
        conn = None
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=child_transform, args=(dsn, queue))
        child.start()
        seconds, steps = queue.get()
        child.join()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with psycopg.connect(dsn) as conn:
            written = sum(conn.execute(f"SELECT count(*) FROM crm.{t}").fetchone()[0] for t in (
                "sales_order", "sales_order_address", "sales_order_line", "sales_order_line_tax", "sales_order_line_meta",
                "sales_order_tax", "sales_order_shipping", "sales_order_fee", "sales_order_coupon", "sales_order_meta",
                "shipment", "contact", "subscription_order"))
            work_mem = conn.execute("SHOW work_mem").fetchone()[0]
        print(f"{'':<34} {'rows/s':>10} {'seconds':>8} {'vs raw COPY':>11}")
        print(f"{'raw COPY into a bare table':<34} {n / raw:>10.0f} {raw:>8.1f} {1:>10.2f}x")
        print(f"{'COPY into the inbox (indexed)':<34} {n / inbox:>10.0f} {inbox:>8.1f} {raw / inbox:>10.2f}x")
        print(f"{'orders transform (inbox rows)':<34} {n / seconds:>10.0f} {seconds:>8.1f} {raw / seconds:>10.2f}x"
              f"   ({written} CRM rows written, {steps[0]['batches']} batches)")
        print(f"peak memory of the transform task: {peak:.0f} MB (PostgreSQL work_mem {work_mem})")
        return 0
    finally:
        with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if own:
            pg.stop()


if __name__ == "__main__":
    sys.exit(main())
