"""Command line: ``python -m sandbox serve|generate|export``.

    python -m sandbox serve --host 127.0.0.1 --port 8765 --size tiny --seed 1
    python -m sandbox export --db .data/sandbox/tiny-1.sqlite --entity orders > truth.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .generate import SIZES, generate, main_generate
from .storage import Store

DATA = Path(os.environ.get("SANDBOX_DATA_DIR", Path(__file__).resolve().parent.parent / ".data" / "sandbox"))


def default_db(size: str, seed: int) -> Path:
    return DATA / f"store-{size}-{seed}.sqlite"


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .api import create_app
    from .faults import Faults
    from .simulator import ChangeSimulator, mount_control

    db = Path(args.db) if args.db else default_db(args.size, args.seed)
    if args.fresh or not db.exists():
        main_generate(str(db), args.size, args.seed, args.timezone)
    store = Store(db)
    with store.write_lock:
        store.db.execute("INSERT OR REPLACE INTO api_keys VALUES (?,?,?)", (args.consumer_key, args.consumer_secret, "read_write"))
        if args.read_only_key:
            ck, cs = args.read_only_key.split(":", 1)
            store.db.execute("INSERT OR REPLACE INTO api_keys VALUES (?,?,?)", (ck, cs, "read"))
    faults = Faults(args.faults, seed=args.seed, slow_seconds=args.slow_seconds)
    app = create_app(store, faults, stable_sort=args.stable_sort, webhook_delay=args.webhook_delay)
    if args.change_log:
        app.state.domain.changes.listeners.append(change_logger(args.change_log))
    if args.request_log:
        app.middleware("http")(request_logger(args.request_log))
    simulator = ChangeSimulator(app.state.domain, args.changes_per_second, seed=args.seed)
    app.state.simulator = simulator
    mount_control(app, simulator, faults)
    simulator.start()
    ssl = {}
    if args.tls:
        from .tls import ensure_certificate

        cert, key = ensure_certificate(DATA / "tls")
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    scheme = "https" if args.tls else "http"
    print(f"sandbox store ({args.size}, seed {args.seed}, tz {store.tz}) at {scheme}://{args.host}:{args.port}"
          f"/wp-json/wc/v3  db={db}  changes/s={args.changes_per_second}  faults={args.faults or 'none'}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, **ssl)


def change_logger(path: str):
    """Benchmarks need to know when each change happened, to the millisecond (the API keeps seconds)."""
    import threading
    import time

    lock = threading.Lock()
    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the server

    def log(resource: str, event: str, record_id: int) -> None:
        with lock:
            out.write(json.dumps({"t": time.time(), "resource": resource, "event": event, "id": record_id}) + "\n")

    return log


def request_logger(path: str):
    """Benchmarks and tests count what the store was asked, and when: one JSON line per request (its
    arrival and answer times, method, path and status), appended as the answer leaves."""
    import threading
    import time

    lock = threading.Lock()
    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the server

    async def middleware(request, call_next):
        started = time.time()
        response = await call_next(request)
        line = json.dumps({"t0": started, "t1": time.time(), "method": request.method, "path": request.url.path,
                           "status": response.status_code, "pid": os.getpid()})
        with lock:
            out.write(line + "\n")
        return response

    return middleware


def export(args: argparse.Namespace) -> None:
    """Ground truth for tests: every record as the API would show it, trashed ones included."""
    from . import project

    store = Store(args.db)
    base = args.base_url.rstrip("/") + "/wp-json/wc/v3"
    post_types = {"orders": "shop_order", "subscriptions": "shop_subscription", "refunds": "shop_order_refund",
                  "products": "product", "variations": "product_variation"}
    if args.entity == "customers":
        ids = [r[0] for r in store.db.execute("SELECT id FROM users ORDER BY id")]  # every role, as role=all lists
        render = lambda chunk: project.customers(store, chunk, base)  # noqa: E731
    elif args.entity == "categories":
        ids = [r[0] - 1000 for r in store.db.execute("SELECT id FROM lookup WHERE list_id=? ORDER BY id",
                                                     (store.list_id("PRODUCT_CAT"),))]
        render = lambda chunk: project.categories(store, chunk, base)  # noqa: E731
    else:
        post_type = post_types[args.entity]
        ids = [r[0] for r in store.db.execute("SELECT id FROM posts WHERE post_type=? ORDER BY id", (post_type,))]
        if args.entity in ("orders", "subscriptions"):
            render = lambda chunk: project.orders(store, chunk, base, post_type)  # noqa: E731
        elif args.entity == "refunds":
            render = lambda chunk: project.refunds(store, chunk, base)  # noqa: E731
        else:
            render = lambda chunk: project.products(store, chunk, base)  # noqa: E731
    out = sys.stdout
    for i in range(0, len(ids), 500):
        for doc in render(ids[i:i + 500]):
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the store's REST API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--size", choices=list(SIZES), default="tiny")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--db", help="SQLite file (default: .data/sandbox/store-SIZE-SEED.sqlite)")
    s.add_argument("--fresh", action="store_true", help="regenerate the store even if the file exists")
    s.add_argument("--timezone", default="Europe/Madrid", help="the site timezone (WordPress timezone_string)")
    s.add_argument("--consumer-key", default=os.environ.get("SANDBOX_CONSUMER_KEY", "ck_sandbox"))
    s.add_argument("--consumer-secret", default=os.environ.get("SANDBOX_CONSUMER_SECRET", "cs_sandbox"))
    s.add_argument("--read-only-key", default="ck_sandbox_ro:cs_sandbox_ro", help="KEY:SECRET with read scope")
    s.add_argument("--tls", action="store_true", help="serve HTTPS with a generated self-signed certificate")
    s.add_argument("--changes-per-second", type=float, default=0.0)
    s.add_argument("--faults", default="", help='e.g. "429=0.05,500=0.02,shift=0.1"')
    s.add_argument("--slow-seconds", type=float, default=1.5)
    s.add_argument("--stable-sort", action="store_true",
                   help="kinder than a real store: an id tie-break in every sort (a real store has one for date only)")
    s.add_argument("--legacy-sort", action="store_true", help=argparse.SUPPRESS)  # the real sort is the default now
    s.add_argument("--webhook-delay", type=float, default=0.5)
    s.add_argument("--log-level", default="warning")
    s.add_argument("--change-log", help="append every change (with its exact time) to this JSON-lines file")
    s.add_argument("--request-log", help="append every request (arrival, answer, method, path, status) to this "
                                         "JSON-lines file")
    s.set_defaults(func=serve)
    g = sub.add_parser("generate", help="generate a store file and exit")
    g.add_argument("--size", choices=list(SIZES), default="tiny")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--db")
    g.add_argument("--timezone", default="Europe/Madrid")
    g.set_defaults(func=lambda a: main_generate(a.db or str(default_db(a.size, a.seed)), a.size, a.seed, a.timezone))
    e = sub.add_parser("export", help="print the ground truth as JSON lines")
    e.add_argument("--db", required=True)
    e.add_argument("--base-url", default="http://sandbox.local", help="the URL the store is served at (for links)")
    e.add_argument("--entity", required=True,
                   choices=["customers", "products", "variations", "categories", "orders", "refunds", "subscriptions"])
    e.set_defaults(func=export)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.func(args)


if __name__ == "__main__":
    main()

__all__ = ["generate", "main"]
