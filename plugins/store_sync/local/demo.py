"""``make demo``: the whole integration on this machine, started by one command.

* the CRM database: ``CRM_DATABASE_URL`` (or ``AIRFLOW_CONN_CRM_DB``) if set, else the embedded
  PostgreSQL (which also holds Airflow's metadata database), switched on with ``CRM_DATABASE_EMBEDDED=1``;
* the store: ``AIRFLOW_CONN_STORE_API`` if set (a real shop), else the sandbox store with the change
  simulator on, and its customer webhooks pointed at the api-server (secret generated once into
  ``.data/store-webhook-secret``);
* Airflow 3.3 (api-server, scheduler, dag-processor, triggerer) with the DAGs unpaused, and the store
  webhooks registered through the package's own registration (``store_sync.store.webhooks``).

It prints the UI address and login, then runs until Ctrl-C and stops everything it started.
``--once`` runs one full cycle headless with the package's own code: on an empty CRM the first load
(every entity at once on the first-load budget, the transform applied while rows arrive), else one live
cycle of each entity; then the checks; it prints the row count of every CRM table and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from store_sync.crm.database import EMBEDDED_SWITCH, EmbeddedPostgres, airflow_dsn, describe, url_from_env, wait_for

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / ".data"


def start_sandbox(port: int, size: str, rate: float, extra: list[str] | None = None) -> subprocess.Popen:
    log = open(DATA / "sandbox.log", "a")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([sys.executable, "-m", "sandbox", "serve", "--port", str(port), "--size", size,
                             "--changes-per-second", str(rate), *(extra or [])], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_store(client, started: list[subprocess.Popen], seconds: float = 300) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.check()
        except Exception:
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise
            time.sleep(0.5)


def demo_secret(name: str) -> str:
    """A secret the demo generates once and keeps out of git and logs (0600 under .data/)."""
    import secrets

    path = DATA / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def register_webhooks() -> None:
    """The package's own registration, as the store_register_webhooks DAG runs it."""
    from store_sync.store.webhooks import register_webhooks as register

    try:
        done = register()
    except Exception as exc:  # the demo goes on: the customer scan still finds every change, only later
        print(f"Store webhooks: NOT registered ({exc}); customers reach the CRM through the periodic scan")
        return
    if done["status"] == "off":
        print("Store webhooks: off (no webhook_url in the store connection); customers reach the CRM through the "
              "periodic scan")
    else:
        print(f"Store webhooks: customer.created/updated/deleted → {done['delivery_url']} (created {len(done['created'])}, "
              f"re-enabled {len(done['enabled'])}, kept {len(done['kept'])})")


def wait_for_signal() -> None:
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    print("Stopping what the demo started…")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="one landing cycle of every entity, print counts, exit")
    parser.add_argument("--size", default=os.environ.get("DEMO_STORE_SIZE", "small"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_STORE_PORT", 8765)))
    parser.add_argument("--airflow-port", type=int, default=int(os.environ.get("DEMO_AIRFLOW_PORT", 8080)))
    parser.add_argument("--changes-per-second", type=float, default=2.0)
    args = parser.parse_args(argv)
    DATA.mkdir(exist_ok=True)

    started: list[subprocess.Popen] = []
    embedded = EmbeddedPostgres()
    own_embedded = not embedded.is_running()
    stack = None
    try:
        embedded_dsn = embedded.start()  # Airflow's metadata lives here even when the CRM is elsewhere
        # Only what the environment says: this process has no Airflow deployment of its own to ask.
        crm = url_from_env() or (airflow_dsn() if os.environ.get("AIRFLOW_CONN_CRM_DB") else None)
        if crm:
            wait_for(crm)
            print(f"CRM database: {describe(crm)} (from your configuration)")
        else:
            crm = embedded_dsn
            os.environ[EMBEDDED_SWITCH] = "1"
            print(f"CRM database: embedded PostgreSQL at {describe(crm)} (data in {embedded.data_dir})")
        os.environ["CRM_DATABASE_URL"] = crm  # every Airflow process the demo starts uses this one

        from store_sync.store.hooks import StoreApiHook

        if not os.environ.get("AIRFLOW_CONN_STORE_API"):
            started.append(start_sandbox(args.port, args.size, 0.0 if args.once else args.changes_per_second))
            os.environ["AIRFLOW_CONN_STORE_API"] = json.dumps({
                "conn_type": "http", "host": f"http://127.0.0.1:{args.port}", "login": "ck_sandbox",
                "password": "cs_sandbox", "extra": {
                    "requests_per_second": 20, "max_in_flight": 3,
                    "first_load_requests_per_second": 50, "first_load_max_in_flight": 4,
                    # The sandbox delivers customer webhooks to the api-server's receiver.
                    "webhook_url": f"http://127.0.0.1:{args.airflow_port}",
                    "webhook_secret": demo_secret("store-webhook-secret")}})
            print(f"Store: sandbox ({args.size}) at http://127.0.0.1:{args.port}/wp-json/wc/v3, change simulator "
                  f"{'off' if args.once else f'{args.changes_per_second}/s'}")
        client = StoreApiHook().get_client()
        env = wait_for_store(client, started)
        print(f"Store answers at {client.api_url}: WooCommerce {env.get('version')}")

        if args.once:
            from store_sync.crm.transform import run_checks, table_counts
            from store_sync.inbound.first_load import first_load
            from store_sync.tasks import ready_crm

            # A new shop's history: every entity at once, on the first-load budget, the transform
            # applied while the rows arrive (an entity already loaded runs one live cycle instead).
            hook = StoreApiHook()
            hook.overrides = hook.first_load_budget()
            result = first_load(ready_crm(), hook.get_client(), f"demo-once-{int(time.time())}")
            for name, counts in result["entities"].items():
                print(f"  landed {name:<22} read {counts['read']:>6}  new {counts['landed']:>6}  "
                      f"quarantined {counts['quarantined']}")
            applied: dict[str, list] = {}
            for step in result["transform"]:
                applied.setdefault(step["step"], []).append(step)
            for name, parts in sorted(applied.items()):
                print(f"  applied {name:<26} {sum(p['inbox_rows'] for p in parts):>6} inbox rows in "
                      f"{sum(p['seconds'] for p in parts):.2f}s")
            print(f"First load: {result['seconds']:.1f}s, {result['requests']} store requests")
            run_checks(crm)
            print("CRM tables (rows):")
            for table, rows in table_counts(crm):
                print(f"  crm.{table:<24} {rows:>8}")
            return 0

        from store_sync.local.stack import AirflowStack, metadata_url_for

        stack = AirflowStack(DATA / "airflow", metadata_url_for(embedded), port=args.airflow_port)
        print("Airflow: migrating its metadata database…")
        stack.setup()
        stack.start()
        register_webhooks()  # now that the receiver answers: deliveries before it would count as failures
        print(f"Airflow UI: {stack.url}  login admin / {stack.admin_password()}  "
              f"(password kept in {stack.home / 'passwords.json'})")
        print("The store_watch_* DAGs are unpaused and landing; `make demo ARGS=--once` prints counts. "
              "Ctrl-C stops everything the demo started.")
        wait_for_signal()
        return 0
    finally:
        if stack is not None:
            stack.stop()
        for proc in started:
            proc.terminate()
            proc.wait(10)
        if own_embedded:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
