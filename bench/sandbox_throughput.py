"""How fast can the client read the sandbox store on loopback? The source's ceiling for later work.

    .venv/bin/python bench/sandbox_throughput.py [--size small] [--pages 40] [--connections 1,2,4]

Starts its own sandbox (OAuth over HTTP, as a real store without TLS), reads the same pages of
orders with one connection and then several, and prints pages/s and records/s side by side, with
each run's ratio to the single-connection baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from store_sync.store.client import RequestBudget  # noqa: E402
from tests.helpers import SandboxProcess  # noqa: E402


def run(sandbox: SandboxProcess, entity: str, pages: int, connections: int) -> tuple[float, int, int]:
    client = sandbox.client(requests_per_second=10_000, max_in_flight=connections)
    client.budget = RequestBudget(10_000, connections)
    params = {"orderby": "id", "order": "asc"}
    first = client.get_page(entity, params, 1)
    pages = min(pages, first.total_pages)
    started = time.perf_counter()
    records = 0
    if connections == 1:
        for page in client.iter_pages(entity, params):
            records += len(page.records)
            if page.number >= pages:
                break
    else:
        for page in client.fetch_pages(entity, params, range(1, pages + 1), concurrency=connections):
            records += len(page.records)
    return time.perf_counter() - started, pages, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--entity", default="orders")
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--connections", default="1,2,4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sandbox = SandboxProcess(Path(tmp), size=args.size, seed=1)
        print(f"sandbox {args.size} generated and up in {time.perf_counter() - t0:.1f}s; reading {args.entity}, "
              f"per_page=100, up to {args.pages} pages")
        try:
            run(sandbox, args.entity, 2, 1)  # warm-up: connection, SQLite cache
            baseline = None
            print(f"{'connections':>11} {'pages':>6} {'records':>8} {'seconds':>8} {'pages/s':>8} {'records/s':>10} {'vs 1 conn':>9}")
            for n in (int(x) for x in args.connections.split(",")):
                seconds, pages, records = run(sandbox, args.entity, args.pages, n)
                rate = records / seconds
                baseline = baseline or rate
                print(f"{n:>11} {pages:>6} {records:>8} {seconds:>8.2f} {pages / seconds:>8.1f} {rate:>10.0f} "
                      f"{rate / baseline:>8.2f}x")
        finally:
            sandbox.stop()


if __name__ == "__main__":
    main()
