"""``serve --prerender``: list pages from per-record JSON rendered once and kept in the store.

For benchmarks: the sandbox's own Python rendering (~2,000 records/s a process) otherwise caps what
a client can read, so no figure says how fast the client is. Answers stay what a live rendering
gives (``tests/test_sandbox_scale.py`` compares them, as parsed JSON, before and after writes):

* ``prerendered`` holds one body per record (key: the post id, or minus the user id), encoded as
  FastAPI's JSONResponse encodes; links carry a placeholder site, replaced per page; a product's
  ``related_ids`` carry a marker, filled in per read (a real store shuffles them on every read).
* SQLite triggers on every table a projection reads (posts, postmeta, order items and their meta,
  term relationships, the lookup table, users and usermeta) delete the bodies a write makes stale,
  in the writer's own transaction, whichever process or code path writes, and queue them in
  ``prerender_dirty``. ``prerender_deps`` says which other posts a body read (an order's products,
  their images, its refunds; a subscription's parent and renewal orders; a product's images).
* A page takes the bodies it finds in one statement and renders the others live, so it is never
  stale; one renderer thread (worker 0) re-renders the queue under ``BEGIN IMMEDIATE``, so no write
  can slip between its reads and its insert.
* Filters, sort (the real store's unstable tie order), paging headers and faults run as without it:
  only the projection of the page's ids is replaced. ``_fields`` and the faults that edit records
  (``garbage``, ``junk``) parse the page first.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

from . import project
from .storage import Store

log = logging.getLogger("sandbox.prerender")

SITE = "http://prerender.invalid"  # stands in for scheme://host:port in every link of a stored body
BASE = SITE + "/wp-json/wc/v3"
RELATED = json.dumps([project.RELATED_MARK])  # '["\u0000related_ids"]'
RENDERED_TYPES = ("shop_order", "shop_subscription", "shop_order_refund", "product", "product_variation")
BATCH = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS prerendered (key INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prerender_dirty (key INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS prerender_deps (dep INTEGER NOT NULL, key INTEGER NOT NULL, PRIMARY KEY (dep, key))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS prerender_deps_key ON prerender_deps(key);
"""


def encode(doc) -> str:
    """What ``JSONResponse.render`` writes (starlette/responses.py), as text."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def _stale(expr: str) -> str:
    """Trigger statements: the body of record ``expr`` and of every body that read it are stale."""
    return (f"INSERT OR IGNORE INTO prerender_dirty(key) VALUES ({expr}); "
            f"INSERT OR IGNORE INTO prerender_dirty(key) SELECT key FROM prerender_deps WHERE dep = {expr}; "
            f"DELETE FROM prerendered WHERE key = {expr} "
            f"OR key IN (SELECT key FROM prerender_deps WHERE dep = {expr}); ")


def _all_products() -> str:
    products = "SELECT id FROM posts WHERE post_type IN ('product', 'product_variation')"
    return (f"INSERT OR IGNORE INTO prerender_dirty(key) {products}; "
            f"DELETE FROM prerendered WHERE key IN ({products}); ")


def triggers() -> list[str]:
    out = []

    def on(table: str, event: str, body: str, when: str = "") -> None:
        name = f"prerender_{table}_{event.lower()}{'_' + str(len(out)) if when else ''}"
        out.append(f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event} ON {table} "
                   f"{'WHEN ' + when if when else ''} BEGIN {body} END")

    # A post's own body, and its parent's (a refund is listed in its order, a variation in its product).
    on("posts", "INSERT", _stale("NEW.id") + _stale("NEW.post_parent"))
    on("posts", "UPDATE", _stale("NEW.id") + _stale("NEW.post_parent") + _stale("OLD.post_parent"))
    on("posts", "DELETE", _stale("OLD.id") + _stale("OLD.post_parent"))
    for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
        on("postmeta", event, _stale(f"{row}.post_id"))
        # A renewal order names its subscription in meta: the subscription's needs_payment reads it.
        on("postmeta", event, _stale(f"CAST(json_extract({row}.meta_value, '$') AS INTEGER)"),
           when=f"{row}.meta_key = '_subscription_renewal'")
        on("order_items", event, _stale(f"{row}.order_id"))
        on("order_itemmeta", event,
           _stale(f"(SELECT order_id FROM order_items WHERE order_item_id = {row}.order_item_id)"))
        on("term_relationships", event, _stale(f"{row}.object_id"))
        on("lookup", event, _all_products())  # category names
        on("users", event, _stale(f"-{row}.id"))
        on("usermeta", event, _stale(f"-{row}.user_id"))
    return out


def install(store: Store) -> None:
    db = store.db
    db.executescript(SCHEMA)
    # Once the projection is no cost, the list query is: give a store generated before them the indexes.
    store.create_list_indexes()
    with store.write_lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql in triggers():
                db.execute(sql)
            # Whatever has no body yet (the first run, or records written while served without the flag).
            db.execute("INSERT OR IGNORE INTO prerender_dirty(key) SELECT id FROM posts WHERE post_type IN "
                       f"({','.join('?' * len(RENDERED_TYPES))}) AND id NOT IN (SELECT key FROM prerendered)",
                       RENDERED_TYPES)
            db.execute("INSERT OR IGNORE INTO prerender_dirty(key) SELECT -id FROM users "
                       "WHERE -id NOT IN (SELECT key FROM prerendered)")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


# -- rendering ------------------------------------------------------------------------------------
def render(store: Store, keys: list[int]) -> list[tuple[int, str, set[int]]]:
    """(key, body, posts it read) for every key still in the store (others are gone: no body)."""
    posts = [k for k in keys if k > 0]
    users = [-k for k in keys if k < 0]
    by_type: dict[str, list[int]] = {}
    for chunk in _chunks(posts, 500):
        for r in store.db.execute(f"SELECT id, post_type FROM posts WHERE id IN ({','.join('?' * len(chunk))})", chunk):
            by_type.setdefault(r[1], []).append(r[0])
    out: list[tuple[int, str, set[int]]] = []
    for post_type in ("shop_order", "shop_subscription"):
        ids = by_type.get(post_type, [])
        for doc in project.orders(store, ids, BASE, post_type) if ids else []:
            deps = {d for line in doc["line_items"] for d in (line["product_id"], line["variation_id"],
                                                               line["image"]["id"]) if d}
            deps.update(r["id"] for r in doc.get("refunds", []))
            if post_type == "shop_subscription":
                if doc["parent_id"]:
                    deps.add(doc["parent_id"])
                deps.update(r[0] for r in store.db.execute(
                    "SELECT post_id FROM postmeta WHERE meta_key='_subscription_renewal' AND meta_value=?",
                    (json.dumps(str(doc["id"])),)))
            out.append((doc["id"], encode(doc), deps))
    ids = by_type.get("shop_order_refund", [])
    out += [(doc["id"], encode(doc), set()) for doc in (project.refunds(store, ids, BASE) if ids else [])]
    ids = by_type.get("product", []) + by_type.get("product_variation", [])
    for doc in project.products(store, ids, BASE, related=lambda _pid: [project.RELATED_MARK]) if ids else []:
        deps = {img["id"] for img in doc.get("images", []) if img.get("id")}
        if doc.get("image") and doc["image"].get("id"):
            deps.add(doc["image"]["id"])
        out.append((doc["id"], encode(doc), deps))
    out += [(-doc["id"], encode(doc), set()) for doc in (project.customers(store, users, BASE) if users else [])]
    return out


def save(store: Store, keys: list[int], rendered: list[tuple[int, str, set[int]]]) -> None:
    """Inside the caller's write transaction: the new bodies and what they read; the keys leave the queue."""
    db = store.db
    for chunk in _chunks(keys, 500):
        marks = ",".join("?" * len(chunk))
        db.execute(f"DELETE FROM prerender_deps WHERE key IN ({marks})", chunk)
        db.execute(f"DELETE FROM prerender_dirty WHERE key IN ({marks})", chunk)
    db.executemany("INSERT OR REPLACE INTO prerendered(key, body) VALUES (?, ?)", [(k, b) for k, b, _ in rendered])
    db.executemany("INSERT OR IGNORE INTO prerender_deps(dep, key) VALUES (?, ?)",
                   [(d, k) for k, _, deps in rendered for d in deps])


def prepare(store: Store, jobs: int = 2) -> None:
    """Before serving: install the tables and triggers, render every record without a body, in
    ``jobs`` forked processes (no writer runs yet, so each renders outside the write transaction)."""
    install(store)
    pending = store.db.execute("SELECT COUNT(*) FROM prerender_dirty").fetchone()[0]
    if not pending:
        return
    started = time.monotonic()
    print(f"pre-rendering {pending:,} records in {jobs} processes (once: the bodies stay in the store)...", flush=True)
    store.close()
    children = []
    for job in range(jobs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _drain_slice(Store(store.path), job, jobs)
            except BaseException:  # noqa: BLE001
                log.exception("pre-rendering failed")
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        children.append(pid)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    if failed:
        sys.exit("pre-rendering failed (see the log above)")
    print(f"pre-rendered {pending:,} records in {time.monotonic() - started:.1f}s", flush=True)


def _drain_slice(store: Store, job: int, jobs: int) -> None:
    db = store.db
    while True:
        keys = [r[0] for r in db.execute("SELECT key FROM prerender_dirty WHERE abs(key) % ? = ? ORDER BY key LIMIT ?",
                                         (jobs, job, BATCH * 2))]
        if not keys:
            return
        rendered = render(store, keys)
        with store.write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                save(store, keys, rendered)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise


class Renderer:
    """Worker 0's thread: re-renders what writes made stale, a batch per write transaction."""

    def __init__(self, store: Store, interval: float = 0.05):
        self.store, self.interval = store, interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prerender", daemon=True)
        self.rendered = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                done = self.step()
            except Exception:  # a rendering bug must not kill the thread: the pages render live meanwhile
                log.exception("re-rendering failed")
                done = 0
            if not done:
                self.stop_event.wait(self.interval)

    def pending(self) -> int:
        return self.store.db.execute("SELECT COUNT(*) FROM prerender_dirty").fetchone()[0]

    def step(self) -> int:
        db = self.store.db
        if db.execute("SELECT 1 FROM prerender_dirty LIMIT 1").fetchone() is None:
            return 0
        db.execute("BEGIN IMMEDIATE")  # no write can come between the reads below and the insert
        try:
            keys = [r[0] for r in db.execute("SELECT key FROM prerender_dirty LIMIT ?", (BATCH,))]
            save(self.store, keys, render(self.store, keys))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.rendered += len(keys)
        return len(keys)


# -- reading --------------------------------------------------------------------------------------
class Pages:
    """Assembles a list page from the stored bodies (live rendering for the ones not there)."""

    def __init__(self, store: Store, related_rng=None):
        self.store, self.related_rng = store, related_rng

    def page(self, rest: str, ids: list[int], base: str, live) -> str:
        """The JSON text of the page; ``live(ids)`` renders the records that have no body now."""
        if not ids:
            return "[]"
        keys = [-i for i in ids] if rest == "customers" else ids
        found = dict(self.store.db.execute(
            f"SELECT key, body FROM prerendered WHERE key IN ({','.join('?' * len(keys))})", keys).fetchall())
        missing = [i for i, k in zip(ids, keys, strict=True) if k not in found]
        rendered = {d["id"]: encode(d) for d in live(missing)} if missing else {}
        site = base.split("/wp-json")[0]
        parts = []
        for i, k in zip(ids, keys, strict=True):
            body = found.get(k)
            if body is None:
                body = rendered.get(i)
                if body is not None:
                    parts.append(body)
                continue
            if RELATED in body:
                body = body.replace(RELATED, encode(project._related(self.store, i, self.related_rng)), 1)
            parts.append(body)
        return ("[" + ",".join(parts) + "]").replace(SITE, site)  # live bodies already carry the real site


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
