"""How fast can the sandbox store answer list pages on loopback? One worker against several, live
rendering against pre-rendered pages: the ceiling the sandbox puts on every other benchmark.

    .venv/bin/python bench/sandbox_throughput.py [--size small | --db STORE.sqlite] [--entity orders]
        [--workers 1,3] [--pages 60] [--connections 4] [--repeats 2]

Generates the store once (or copies ``--db``: pre-rendering writes into the file), then, for each
repeat, alternates the configurations (workers x live/pre-rendered) on the same store and reads the
same pages of ``per_page=100`` (OAuth over HTTP, as against a real store without TLS) with
``--connections`` concurrent clients, each a thread that only counts what it receives (no JSON
parsing: the sandbox is measured, not the client). Prints records/s per run and records per CPU
second of the sandbox's processes (steadier than wall time on a shared machine), the best of each
configuration, and the ratios to one live worker and live against pre-rendered.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from store_sync.store.client import oauth_params  # noqa: E402
from tests.helpers import SandboxProcess  # noqa: E402


def read(sandbox: SandboxProcess, entity: str, pages: list[int], connections: int,
         orderby: str = "id") -> tuple[float, int, int, int]:
    """(seconds, pages read, records, bytes) for ``pages`` of ``entity``, ``connections`` at a time."""
    url = f"{sandbox.api}/{entity}"
    todo = list(pages)
    lock = threading.Lock()
    got = {"pages": 0, "records": 0, "bytes": 0, "errors": 0}

    def worker() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if not todo:
                        return
                    page = todo.pop(0)
                params = {"per_page": "100", "orderby": orderby, "order": "asc", "page": str(page)}
                r = session.get(url, params={**params, **oauth_params("GET", url, params, "ck_sandbox", "cs_sandbox")},
                                timeout=120)
                with lock:
                    if r.status_code == 200:
                        got["pages"] += 1
                        got["bytes"] += len(r.content)
                        # what the page holds, from the store's own count (no parsing on the client)
                        got["records"] += max(0, min(100, int(r.headers["X-WP-Total"]) - (page - 1) * 100))
                    else:
                        got["errors"] += 1

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if got["errors"]:
        raise RuntimeError(f"{got['errors']} pages failed")
    return time.perf_counter() - started, got["pages"], got["records"], got["bytes"]


def sandbox_cpu(sandbox: SandboxProcess) -> float:
    """CPU seconds used so far by the sandbox's processes (the parent and its workers)."""
    root = psutil.Process(sandbox.proc.pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--db", help="an existing store to copy (e.g. /work/main/.data/sandbox/store-medium-1.sqlite)")
    parser.add_argument("--entity", default="orders")
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--orderby", default="id", help="id, or modified (as the sync reads windows)")
    parser.add_argument("--workers", default="1,3", help="worker counts to compare (the first is the baseline)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        db = tmp_path / "store.sqlite"
        t0 = time.perf_counter()
        if args.db:
            shutil.copyfile(args.db, db)
        else:
            SandboxProcess(tmp_path, size=args.size, seed=1, db=db).stop()  # generate once
        print(f"store ready in {time.perf_counter() - t0:.1f}s ({args.db or args.size}); reading {args.entity}, "
              f"per_page=100, orderby={args.orderby}, {args.pages} pages, {args.connections} connections")
        t0 = time.perf_counter()
        SandboxProcess(tmp_path, db=db, fresh=False, extra_args=["--prerender", "--workers", str(max(counts))],
                       start_timeout=3600).stop()
        print(f"pre-rendered once in {time.perf_counter() - t0:.1f}s (kept in the store for the runs below)")
        configs = [(n, mode) for mode in ("live", "prerender") for n in counts]
        results: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
        per_cpu: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
        print(f"{'run':>3} {'workers':>7} {'mode':>9} {'pages':>6} {'records':>8} {'MB':>6} {'seconds':>8} "
              f"{'records/s':>10} {'sandbox CPU s':>13} {'records/CPU s':>13}")
        for repeat in range(args.repeats):
            for n, mode in configs if repeat % 2 == 0 else list(reversed(configs)):
                extra = ["--workers", str(n), *(["--prerender"] if mode == "prerender" else [])]
                sb = SandboxProcess(tmp_path, db=db, fresh=False, extra_args=extra, start_timeout=600)
                try:
                    read(sb, args.entity, [1, 2], min(2, args.connections))  # warm-up: connections, SQLite cache
                    cpu = sandbox_cpu(sb)
                    seconds, pages, records, size = read(sb, args.entity, list(range(1, args.pages + 1)), args.connections,
                                                         args.orderby)
                    cpu = sandbox_cpu(sb) - cpu
                finally:
                    sb.stop()
                rate = records / seconds
                results[(n, mode)].append(rate)
                per_cpu[(n, mode)].append(records / cpu if cpu else 0.0)
                print(f"{repeat + 1:>3} {n:>7} {mode:>9} {pages:>6} {records:>8} {size / 1e6:>6.1f} {seconds:>8.2f} "
                      f"{rate:>10.0f} {cpu:>13.2f} {per_cpu[(n, mode)][-1]:>13.0f}")
        best = {c: max(v) for c, v in results.items()}
        baseline = best[(counts[0], "live")]
        print(f"\nbest of {args.repeats}, against {counts[0]} live worker ({baseline:.0f} records/s):")
        cpu_best = {c: max(v) for c, v in per_cpu.items()}
        print(f"{'workers':>7} {'mode':>9} {'records/s':>10} {'vs baseline':>11} {'prerender vs live':>17} "
              f"{'records/CPU s':>13} {'vs baseline':>11}")
        for n, mode in configs:
            vs_live = f"{best[(n, mode)] / best[(n, 'live')]:.2f}x" if mode == "prerender" else ""
            cpu_ratio = cpu_best[(n, mode)] / cpu_best[(counts[0], "live")] if cpu_best[(counts[0], "live")] else 0
            print(f"{n:>7} {mode:>9} {best[(n, mode)]:>10.0f} {best[(n, mode)] / baseline:>10.2f}x {vs_live:>17} "
                  f"{cpu_best[(n, mode)]:>13.0f} {cpu_ratio:>10.2f}x")


if __name__ == "__main__":
    main()
