"""The sandbox store's storage: WordPress/WooCommerce's own generic model, in SQLite.

Like a real store it keeps almost nothing in typed columns:

* ``lookup`` is the *table of tables*: every code list (order and subscription statuses, payment
  gateways, countries and their states, tax classes, product categories, attributes and their
  terms) lives in this one table. Rows whose ``list_id`` is NULL are the lists themselves;
  ``parent_id`` gives the recursion (state -> country, category -> parent category, term ->
  attribute).
* ``posts`` holds products, variations, orders, refunds and subscriptions, sharing one id sequence
  as WordPress does; everything type-specific is key/value in ``postmeta``.
* ``users`` + ``usermeta``, ``order_items`` + ``order_itemmeta``, ``comments`` (order notes) follow
  the same pattern.

Meta values are stored as JSON text so that mixed types (strings, numbers, objects) survive, as
WooCommerce's ``meta_data[].value`` is typed ``mixed``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS options (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lookup (
    id        INTEGER PRIMARY KEY,
    list_id   INTEGER REFERENCES lookup(id),
    code      TEXT NOT NULL,
    name      TEXT NOT NULL,
    parent_id INTEGER REFERENCES lookup(id),
    sort      INTEGER NOT NULL DEFAULT 0,
    active    INTEGER NOT NULL DEFAULT 1,
    v_text1 TEXT, v_text2 TEXT, v_text3 TEXT,
    v_num1 REAL, v_num2 REAL, v_num3 REAL
);
CREATE INDEX IF NOT EXISTS lookup_list ON lookup(list_id, code);
CREATE TABLE IF NOT EXISTS lookup_meta (lookup_id INTEGER NOT NULL, meta_key TEXT NOT NULL, meta_value TEXT);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY, user_login TEXT NOT NULL, user_email TEXT NOT NULL,
    user_registered TEXT NOT NULL, display_name TEXT NOT NULL, role TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usermeta (
    umeta_id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, meta_key TEXT NOT NULL, meta_value TEXT
);
CREATE TABLE IF NOT EXISTS posts (
    id INTEGER PRIMARY KEY, post_type TEXT NOT NULL, post_status TEXT NOT NULL,
    post_parent INTEGER NOT NULL DEFAULT 0, customer_id INTEGER NOT NULL DEFAULT 0,
    post_title TEXT NOT NULL DEFAULT '', post_name TEXT NOT NULL DEFAULT '',
    post_date TEXT NOT NULL, post_date_gmt TEXT NOT NULL,
    post_modified TEXT NOT NULL, post_modified_gmt TEXT NOT NULL,
    menu_order INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS postmeta (
    meta_id INTEGER PRIMARY KEY, post_id INTEGER NOT NULL, meta_key TEXT NOT NULL, meta_value TEXT
);
CREATE TABLE IF NOT EXISTS term_relationships (object_id INTEGER NOT NULL, term_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS order_items (
    order_item_id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL,
    order_item_type TEXT NOT NULL, order_item_name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS order_itemmeta (
    meta_id INTEGER PRIMARY KEY, order_item_id INTEGER NOT NULL, meta_key TEXT NOT NULL, meta_value TEXT
);
CREATE TABLE IF NOT EXISTS comments (
    comment_id INTEGER PRIMARY KEY, post_id INTEGER NOT NULL, comment_date TEXT NOT NULL,
    comment_date_gmt TEXT NOT NULL, content TEXT NOT NULL, author TEXT NOT NULL,
    customer_note INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS api_keys (
    consumer_key TEXT PRIMARY KEY, consumer_secret TEXT NOT NULL, permissions TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_nonces (consumer_key TEXT, nonce TEXT, ts INTEGER, PRIMARY KEY (consumer_key, nonce));
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, topic TEXT NOT NULL,
    delivery_url TEXT NOT NULL, secret TEXT NOT NULL, failure_count INTEGER NOT NULL DEFAULT 0,
    date_created_gmt TEXT NOT NULL, date_modified_gmt TEXT NOT NULL
);
"""

INDEXES = """
CREATE INDEX IF NOT EXISTS posts_type_mod ON posts(post_type, post_modified_gmt, id);
CREATE INDEX IF NOT EXISTS posts_type_date ON posts(post_type, post_date_gmt, id);
CREATE INDEX IF NOT EXISTS posts_parent ON posts(post_parent, post_type);
CREATE INDEX IF NOT EXISTS posts_customer ON posts(customer_id, post_type);
CREATE INDEX IF NOT EXISTS postmeta_post ON postmeta(post_id);
CREATE INDEX IF NOT EXISTS postmeta_key ON postmeta(meta_key, meta_value);
CREATE INDEX IF NOT EXISTS usermeta_user ON usermeta(user_id);
CREATE INDEX IF NOT EXISTS users_email ON users(user_email);
CREATE INDEX IF NOT EXISTS items_order ON order_items(order_id);
CREATE INDEX IF NOT EXISTS itemmeta_item ON order_itemmeta(order_item_id);
CREATE INDEX IF NOT EXISTS terms_object ON term_relationships(object_id);
CREATE INDEX IF NOT EXISTS terms_term ON term_relationships(term_id);
CREATE INDEX IF NOT EXISTS comments_post ON comments(post_id);
"""

# What list pages filter and sort on, covered so that a count or a sort reads the index only (a page of
# a 100k-order window otherwise costs seconds in table lookups): WordPress's own wp_posts index
# type_status_date (post_type, post_status, post_date, ID) (wp-admin/includes/schema.php), and the
# same for the local-date sort and the GMT modified windows every sync reads.
LIST_INDEXES = (
    "CREATE INDEX IF NOT EXISTS posts_type_status_date ON posts(post_type, post_status, post_date, id)",
    "CREATE INDEX IF NOT EXISTS posts_type_date_status ON posts(post_type, post_date, post_status, id)",
    "CREATE INDEX IF NOT EXISTS posts_type_modgmt_cover ON posts(post_type, post_modified_gmt, post_status, "
    "post_modified, id)",
    # orderby=modified sorts on the local time: over a large window (a first load) an ordered scan
    # of this one reads OFFSET + LIMIT entries instead of sorting the window (see api.list_posts).
    "CREATE INDEX IF NOT EXISTS posts_type_mod_local_cover ON posts(post_type, post_modified, post_status, "
    "post_modified_gmt, id)",
)

# The lists held in the table of tables (their header rows are the "table of tables" proper).
LISTS = (
    "ORDER_STATUS", "SUBSCRIPTION_STATUS", "PAYMENT_METHOD", "COUNTRY", "STATE",
    "TAX_CLASS", "PRODUCT_CAT", "PRODUCT_TAG", "ATTRIBUTE", "ATTRIBUTE_TERM", "CURRENCY",
)

WP_FORMAT = "%Y-%m-%d %H:%M:%S"


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads(text):
    return None if text is None else json.loads(text)


class WriteLock:
    """One writer at a time, across threads and processes (``serve --workers N``): a thread lock, then
    an ``flock`` on a file beside the store. Re-entrant, as the ``RLock`` it replaces.

    SQLite's own lock keeps single statements safe across processes (WAL + busy_timeout), but not the
    read-then-write sequences of a WooCommerce save (``MAX(id) + 1``, update-or-insert meta)."""

    def __init__(self, path: str):
        self.path = path + ".writelock"
        self._thread = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._pid = 0

    def __enter__(self) -> WriteLock:
        self._thread.acquire()
        try:
            if self._depth == 0:
                if self._pid != os.getpid():  # a forked worker opens its own (flock is per open file)
                    self._fd, self._pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), os.getpid()
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread.release()
            raise
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread.release()


class Store:
    """One SQLite file; a connection per thread, one writer at a time (as a WordPress DB row lock would)."""

    def __init__(self, path: str | Path, shared_clock=None):
        self.path = str(path)
        self._local = threading.local()
        self.write_lock = WriteLock(self.path)
        self._tz: ZoneInfo | None = None
        self._lists: dict[str, int] | None = None
        self._indexes: set[str] | None = None
        self._clock_offset = timedelta(0)
        self.shared_clock = shared_clock  # a multiprocessing.Value('d') when several workers serve the store

    @property
    def clock_offset(self) -> timedelta:
        """Fault "clock skew" moves the store's clock (one clock for every worker: one database server)."""
        if self.shared_clock is not None:
            return timedelta(seconds=self.shared_clock.value)
        return self._clock_offset

    @clock_offset.setter
    def clock_offset(self, value: timedelta) -> None:
        if self.shared_clock is not None:
            self.shared_clock.value = value.total_seconds()
        else:
            self._clock_offset = value

    def close(self) -> None:
        """Close this thread's connection (before a fork: a child must not share it)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- connections -----------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def create_schema(self) -> None:
        self.db.executescript(SCHEMA)

    def create_indexes(self) -> None:
        self.db.executescript(INDEXES)
        self.create_list_indexes()

    def has_index(self, name: str) -> bool:
        if self._indexes is None:
            self._indexes = {r[1] for r in self.db.execute("PRAGMA index_list(posts)")}
        return name in self._indexes

    def create_list_indexes(self) -> None:
        """Idempotent; on a store generated before them, a few seconds per 100k orders, once."""
        for sql in LIST_INDEXES:
            self.db.execute(sql)
        self._indexes = None

    # -- options and site time -------------------------------------------------------------
    def option(self, name: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM options WHERE name=?", (name,)).fetchone()
        return row[0] if row else default

    def set_option(self, name: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO options(name, value) VALUES (?, ?)", (name, value))

    @property
    def tz(self) -> ZoneInfo:
        if self._tz is None:
            self._tz = ZoneInfo(self.option("timezone_string", "UTC"))
        return self._tz

    def now_gmt(self) -> datetime:
        """Whole-second UTC now: MySQL DATETIME columns keep no fractions."""
        return (datetime.now(UTC) + self.clock_offset).replace(microsecond=0, tzinfo=None)

    def local(self, gmt: datetime) -> datetime:
        return gmt.replace(tzinfo=UTC).astimezone(self.tz).replace(tzinfo=None)

    def stamp(self, gmt: datetime | None = None) -> tuple[str, str]:
        """(local, gmt) strings for a moment, as WordPress stores post_date / post_date_gmt."""
        gmt = gmt or self.now_gmt()
        return self.local(gmt).strftime(WP_FORMAT), gmt.strftime(WP_FORMAT)

    # -- the table of tables ---------------------------------------------------------------
    def list_id(self, code: str) -> int:
        if self._lists is None:
            rows = self.db.execute("SELECT code, id FROM lookup WHERE list_id IS NULL").fetchall()
            self._lists = {r["code"]: r["id"] for r in rows}
        return self._lists[code]

    def lookup_rows(self, list_code: str, parent_id: int | None = None):
        sql = "SELECT * FROM lookup WHERE list_id=?"
        args: list = [self.list_id(list_code)]
        if parent_id is not None:
            sql += " AND parent_id=?"
            args.append(parent_id)
        return self.db.execute(sql + " ORDER BY sort, id", args).fetchall()

    def lookup_by_code(self, list_code: str, code: str):
        return self.db.execute(
            "SELECT * FROM lookup WHERE list_id=? AND code=?", (self.list_id(list_code), code)
        ).fetchone()

    # -- meta helpers ----------------------------------------------------------------------
    def meta_for(self, table: str, key_col: str, ids: list[int]) -> dict[int, list[tuple[int, str, object]]]:
        """Batch-load key/value rows for many owners: {owner_id: [(meta_id, key, value), ...]}."""
        out: dict[int, list] = {i: [] for i in ids}
        id_col = {"postmeta": "meta_id", "usermeta": "umeta_id", "order_itemmeta": "meta_id"}[table]
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(
                f"SELECT {key_col}, {id_col}, meta_key, meta_value FROM {table} "
                f"WHERE {key_col} IN ({marks}) ORDER BY {id_col}", chunk
            ):
                out[r[0]].append((r[1], r[2], loads(r[3])))
        return out

    def set_meta(self, table: str, key_col: str, owner_id: int, key: str, value, meta_id: int | None = None) -> None:
        id_col = {"postmeta": "meta_id", "usermeta": "umeta_id", "order_itemmeta": "meta_id"}[table]
        if meta_id:
            cur = self.db.execute(
                f"UPDATE {table} SET meta_key=?, meta_value=? WHERE {id_col}=? AND {key_col}=?",
                (key, dumps(value), meta_id, owner_id),
            )
            if cur.rowcount:
                return
        cur = self.db.execute(
            f"UPDATE {table} SET meta_value=? WHERE {key_col}=? AND meta_key=?", (dumps(value), owner_id, key)
        )
        if not cur.rowcount:
            self.db.execute(
                f"INSERT INTO {table}({key_col}, meta_key, meta_value) VALUES (?, ?, ?)",
                (owner_id, key, dumps(value)),
            )

    def delete_meta(self, table: str, key_col: str, owner_id: int, key: str) -> None:
        self.db.execute(f"DELETE FROM {table} WHERE {key_col}=? AND meta_key=?", (owner_id, key))

    def post_meta(self, post_id: int) -> dict[str, object]:
        return {k: v for _, k, v in self.meta_for("postmeta", "post_id", [post_id])[post_id]}

    def touch_post(self, post_id: int, gmt: datetime | None = None) -> None:
        local, g = self.stamp(gmt)
        self.db.execute("UPDATE posts SET post_modified=?, post_modified_gmt=? WHERE id=?", (local, g, post_id))

    def next_post_id(self) -> int:
        return (self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM posts").fetchone()[0])


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
