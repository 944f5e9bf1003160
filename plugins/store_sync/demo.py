"""``make demo``: start what the integration needs on this machine and say where it is.

* the CRM database: ``CRM_DATABASE_URL`` if set, else the embedded PostgreSQL;
* the store: ``AIRFLOW_CONN_STORE_API`` if set (a real shop), else the sandbox store with the change
  simulator on.

``--once`` checks both answer, prints what it found and exits 0; without it the demo runs until
Ctrl-C and stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from store_sync.crm_database import EmbeddedPostgres, configured_dsn, describe, wait_for

REPO = Path(__file__).resolve().parents[2]


def start_sandbox(port: int, size: str, rate: float) -> subprocess.Popen:
    log = open(REPO / ".data" / "sandbox.log", "a")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([sys.executable, "-m", "sandbox", "serve", "--port", str(port), "--size", size,
                             "--changes-per-second", str(rate)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="check everything answers, print, exit")
    parser.add_argument("--size", default=os.environ.get("DEMO_STORE_SIZE", "small"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_STORE_PORT", 8765)))
    parser.add_argument("--changes-per-second", type=float, default=2.0)
    args = parser.parse_args(argv)
    (REPO / ".data").mkdir(exist_ok=True)

    started: list[subprocess.Popen] = []
    embedded = None
    dsn = configured_dsn()
    if dsn:
        wait_for(dsn)
        print(f"CRM database: {describe(dsn)} (from your configuration)")
    else:
        embedded = EmbeddedPostgres()
        was_running = embedded.is_running()
        dsn = embedded.start()
        print(f"CRM database: embedded PostgreSQL at {describe(dsn)} (data in {embedded.data_dir})")
        if was_running:
            embedded = None  # not ours to stop

    from store_sync.client import StoreClient
    from store_sync.hooks import StoreApiHook

    if os.environ.get("AIRFLOW_CONN_STORE_API"):
        client = StoreApiHook().get_client()
        print(f"Store: {client.api_url} (from AIRFLOW_CONN_STORE_API)")
    else:
        proc = start_sandbox(args.port, args.size, 0.0 if args.once else args.changes_per_second)
        started.append(proc)
        client = StoreClient(f"http://127.0.0.1:{args.port}", "ck_sandbox", "cs_sandbox", max_retries=0)
        print(f"Store: sandbox ({args.size}) at {client.api_url}, change simulator "
              f"{'off' if args.once else f'{args.changes_per_second}/s'}, keys ck_sandbox/cs_sandbox")
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                env = client.check()
                break
            except Exception:
                if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                    raise
                time.sleep(0.5)
        print(f"Store answers: WooCommerce {env.get('version')}; "
              f"{client.count('orders')} orders, {client.count('customers')} customers, "
              f"{client.count('products')} products")
        if args.once:
            return 0
        print("Running. Ctrl-C stops everything the demo started.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(10)
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
