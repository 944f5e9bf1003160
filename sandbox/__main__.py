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

    from .shop import parse_range

    if args.workers < 1:
        sys.exit(f"--workers must be at least 1, not {args.workers}")
    if args.max_concurrent < 0:
        sys.exit(f"--max-concurrent must be 0 (no limit) or more, not {args.max_concurrent}")
    from .faults import Faults

    try:
        args.page_latency_range = parse_range(args.page_latency)
        Faults.parse(args.faults)
    except ValueError as exc:
        sys.exit(str(exc))
    db = Path(args.db) if args.db else default_db(args.size, args.seed)
    if args.fresh or not db.exists():
        main_generate(str(db), args.size, args.seed, args.timezone)
    store = Store(db)
    with store.write_lock:
        store.db.execute("INSERT OR REPLACE INTO api_keys VALUES (?,?,?)", (args.consumer_key, args.consumer_secret, "read_write"))
        if args.read_only_key:
            ck, cs = args.read_only_key.split(":", 1)
            store.db.execute("INSERT OR REPLACE INTO api_keys VALUES (?,?,?)", (ck, cs, "read"))
    if args.prerender:
        from .prerender import prepare

        prepare(store, jobs=max(args.workers, 2))
    ssl = {}
    if args.tls:
        from .tls import ensure_certificate

        cert, key = ensure_certificate(DATA / "tls")
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    scheme = "https" if args.tls else "http"
    shop = (f"  page latency={args.page_latency}s/100 records" if args.page_latency else "") + \
           (f"  max concurrent={args.max_concurrent} (then {args.over_limit})" if args.max_concurrent else "")
    print(f"sandbox store ({args.size}, seed {args.seed}, tz {store.tz}) at {scheme}://{args.host}:{args.port}"
          f"/wp-json/wc/v3  db={db}  changes/s={args.changes_per_second}  faults={args.faults or 'none'}"
          f"  workers={args.workers}{'  prerendered' if args.prerender else ''}{shop}", flush=True)
    store.close()
    if args.workers == 1:
        app = build_app(args, db)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, **ssl)
        return
    from .workers import Shared, supervise

    shared = Shared(args.faults, args.max_concurrent)

    def run_worker(index: int, sockets, control_path: str) -> None:
        app = build_app(args, db, index=index, shared=shared, control_path=control_path,
                        public_url=f"{scheme}://{args.host}:{args.port}")
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, **ssl)
        uvicorn.Server(config).run(sockets=sockets)

    supervise(args.workers, args.host, args.port, run_worker)


def build_app(args: argparse.Namespace, db: Path, index: int = 0, shared=None, control_path: str | None = None,
              public_url: str | None = None):
    """One worker's app. Worker 0 (the only one without ``--workers``) runs the change simulator."""
    from .api import create_app
    from .faults import Faults
    from .shop import Shop
    from .simulator import ChangeSimulator, mount_control

    store = Store(db, shared_clock=shared.clock if shared else None)
    # Each worker draws its own faults and latencies (worker 0 as a single process would).
    faults = Faults(args.faults, seed=args.seed + index, slow_seconds=args.slow_seconds,
                    shared=shared.faults if shared else None)
    shop = Shop(args.page_latency_range, args.max_concurrent, args.over_limit, seed=args.seed + index,
                slots=shared.slots if shared else None)
    app = create_app(store, faults, stable_sort=args.stable_sort, webhook_delay=args.webhook_delay, shop=shop,
                     public_url=public_url, prerender=args.prerender, shuffle_related=not args.fixed_related)
    if args.change_log:
        app.state.domain.changes.listeners.append(change_logger(args.change_log))
    if shared is not None:
        app.state.domain.changes.listeners.append(shared.count_event)
    if index == 0:
        simulator = ChangeSimulator(app.state.domain, args.changes_per_second, seed=args.seed)
        if shared is not None:
            simulator.events_source = shared.store_events  # every worker's writes, not worker 0's only
        app.state.simulator = simulator
        mount_control(app, simulator, faults)
        simulator.start()
    else:
        from .workers import mount_forward

        mount_forward(app, control_path, tls=args.tls)
    if args.prerender and index == 0:
        from .prerender import Renderer

        renderer = Renderer(store)
        app.state.renderer = renderer
        app.router.on_startup.append(renderer.start)
        app.router.on_shutdown.append(renderer.stop)
    return app


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
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes serving the store (one simulator, shared faults and limits)")
    s.add_argument("--prerender", action="store_true",
                   help="for benchmarks: answer list pages from per-record JSON rendered once and kept in the store "
                        "(re-rendered on every write); answers stay the same")
    s.add_argument("--page-latency", metavar="LOW-HIGH",
                   help="a hosted shop's speed: seconds per list page of 100 records (scaled with per_page), e.g. 1-3")
    s.add_argument("--max-concurrent", type=int, default=0,
                   help="requests in flight (over every worker) past which the host refuses (0: no limit)")
    s.add_argument("--over-limit", type=int, choices=[429, 503], default=503,
                   help="what the host answers past --max-concurrent: 503 (nginx limit_conn) or 429 with Retry-After")
    s.add_argument("--fixed-related", action="store_true",
                   help="kinder than a real store: related_ids in one fixed order (a real store shuffles them per read)")
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
