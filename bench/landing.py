"""Landing speed, side by side in one run.

    .venv/bin/python bench/landing.py [--backfill-size small] [--changes 100]

1. Backfill of orders: records/s the backfill code (the `store_backfill` DAG's own) lands into a
   fresh CRM database, next to the sandbox's read ceiling measured the same way on the same store
   (the client reading every page, landing nothing), with the ratio.
2. One incremental cycle after --changes changes, on a store of 10k orders and on one of 1M orders
   (the `large` store, generated once into .data/sandbox and reused; about 6.5 min and 6 GB), each
   with an inbox already holding as many orders, and the ratio of the two cycle times (it should
   stay near 1: the cycle reads a window, not the store).
Peak memory of this process is printed at the end.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402

from store_sync.crm.database import EmbeddedPostgres  # noqa: E402
from store_sync.crm.migrations import migrate  # noqa: E402
from store_sync.inbound.backfill import run_backfill  # noqa: E402
from store_sync.inbound.detect import sync_entity  # noqa: E402
from store_sync.inbound.landing import set_watermark  # noqa: E402
from store_sync.registry import entity  # noqa: E402
from tests.helpers import SandboxProcess  # noqa: E402


class Databases:
    def __init__(self, pg: EmbeddedPostgres):
        self.pg, self.made = pg, []

    def fresh(self, label: str) -> str:
        name = f"bench_{label}_{int(time.time() * 1000) % 10**8}"
        with psycopg.connect(self.pg.admin_dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER crm_sync")
        self.made.append(name)
        dsn = self.pg.dsn(name)
        migrate(dsn)
        return dsn

    def drop(self) -> None:
        with psycopg.connect(self.pg.admin_dsn(), autocommit=True) as conn:
            for name in self.made:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def read_ceiling(sandbox: SandboxProcess) -> tuple[int, float]:
    client = sandbox.client()
    started, n = time.perf_counter(), 0
    for page in client.iter_pages("orders", {"orderby": "modified", "order": "asc", "dates_are_gmt": "true"}):
        n += len(page.records)
    return n, time.perf_counter() - started


def backfill(sandbox: SandboxProcess, dsn: str) -> tuple[int, float]:
    client = sandbox.client()
    started = time.perf_counter()
    totals = run_backfill(dsn, client, entity("orders"), "bench-backfill",
                          since=datetime(2000, 1, 1, tzinfo=UTC), chunk_hours=24 * 365 * 30)
    return totals["landed"], time.perf_counter() - started


def prefill_inbox(dsn: str, n: int) -> None:
    """An inbox already holding n orders: the cycle must not slow down as it grows."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO inbox.record (entity, source_key, source_modified_at, payload, payload_hash, run_id) "
            "SELECT 'orders', g::text, now() - interval '400 days', jsonb_build_object('id', g), md5(g::text), 'prefill' "
            "FROM generate_series(1, %s) g", (n,))
        set_watermark(conn, "orders", datetime.now(UTC).replace(microsecond=0), "prefill")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE inbox.record")


def make_changes(client, ids: list[int], changes: int, rng: random.Random) -> None:
    time.sleep(1.1)  # the changes start after the watermark's second
    for i in range(changes):
        # what a shop does all day: notes typed by shoppers, orders moving through their statuses
        order_id = ids[rng.randrange(len(ids))]
        if i % 2:
            client.put(f"orders/{order_id}", {"status": rng.choice(["processing", "completed", "on-hold"])})
        else:
            client.put(f"orders/{order_id}", {"customer_note": f"bench change {i}"})
    time.sleep(1.1)  # past the last change's second: the window sees them all


def incremental(sandbox: SandboxProcess, dsn: str, changes: int, orders: int) -> list[tuple[float, dict]]:
    """Two rounds of changes + one cycle each: the first on a cold store cache, the second warm."""
    prefill_inbox(dsn, orders)
    client = sandbox.client()
    ids = [o["id"] for o in client.get("orders", {"per_page": 100, "_fields": "id", "orderby": "id"})]
    rng = random.Random(7)
    out = []
    for round_no in range(2):
        make_changes(client, ids, changes, rng)
        started = time.perf_counter()
        counts = sync_entity(dsn, client, entity("orders"), f"bench-cycle-{round_no}")
        out.append((time.perf_counter() - started, counts))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backfill-size", default="small")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--skip-large", action="store_true", help="only the 10k store (no 6 GB generation)")
    args = parser.parse_args()
    pg = EmbeddedPostgres()
    own = not pg.is_running()
    pg.start()
    dbs = Databases(pg)
    tmp = Path(tempfile.mkdtemp(prefix="landing-bench-"))
    try:
        sb = SandboxProcess(tmp, size=args.backfill_size, seed=1)
        try:
            n_read, t_read = read_ceiling(sb)
            n_land, t_land = backfill(sb, dbs.fresh("backfill"))
        finally:
            sb.stop()
        ceiling, rate = n_read / t_read, n_land / t_land
        print(f"1. backfill of orders ({args.backfill_size} store, {n_read} orders, loopback, OAuth over HTTP)")
        print(f"   sandbox read ceiling : {ceiling:8.0f} records/s  ({n_read} in {t_read:.1f}s, reading only)")
        print(f"   backfill (lands all) : {rate:8.0f} records/s  ({n_land} in {t_land:.1f}s)  = {rate / ceiling:.2f}x the ceiling")

        results = []
        stores = [("10k", 10_000)] + ([] if args.skip_large else [("large", 1_000_000)])
        for size, orders in stores:
            db = REPO / ".data" / "sandbox" / f"store-{size}-1.sqlite"
            started = time.perf_counter()
            sb = SandboxProcess(tmp, size=size, seed=1, fresh=False, db=db)
            up = time.perf_counter() - started
            try:
                rounds = incremental(sb, dbs.fresh(size), args.changes, orders)
            finally:
                sb.stop()
            results.append((orders, rounds, up))
        print(f"2. one incremental cycle after {args.changes} changes (inbox pre-filled with as many orders); "
              f"first cycle on a cold store cache, then a warm one")
        for orders, rounds, up in results:
            (cold, c1), (warm, c2) = rounds
            print(f"   {orders:>9,} orders: cold {cold:5.2f}s, warm {warm:5.2f}s; {c2['pages']} pages, {c2['read']} read, "
                  f"{c2['landed']} landed  (store up in {up:.0f}s)")
        if len(results) == 2:
            print(f"   ratio 1M / 10k (warm): {results[1][1][1][0] / results[0][1][1][0]:.2f}x")
        print(f"peak memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        return 0
    finally:
        dbs.drop()
        if own:
            pg.stop()


if __name__ == "__main__":
    sys.exit(main())
