"""One request budget per store, shared by every process and worker, kept in the CRM database.

Why there, not per process, nor in Airflow pools: the shop does not care how many workers we run, and
two workers with a budget each would double the load on it. A pool counts task instances, not
requests (a trigger waiting in the triggerer holds no slot, a task may send several requests at once)
and knows no rate; the CRM database is already reached by every task, trigger and worker, and a short
statement per request costs well under a millisecond against the 200 ms a request may take at the
default 5 requests/s. See ``include/sql/migrations/0060_store_budget.sql`` for the bucket itself.

Lanes. A lane is a name and its limits (requests per second, requests in flight); the connection
extras give them (``hooks.LANES``): the live sync ``requests_per_second``/``max_in_flight``, backfills
``backfill_*``, fetch on demand ``fetch_*``, first loads ``first_load_*``. Each lane is capped by its
own limits, and every request of every lane also spends from the store's own bucket (the lane ``*``:
extras ``store_requests_per_second``/``store_max_in_flight``, by default the largest lane's limits),
so the lanes together never exceed what the connection allows.

AIMD acts on the shared rows: a 429, a 5xx, an unreachable store or a latency jump halves the lane's
and the store's rate (once a second at most, however many processes saw it); each success wins back
5 %.

When the CRM database cannot be reached the budget fails in words (:class:`BudgetUnavailable`) and
no request is sent: falling back to a budget per process would multiply the load on the shop exactly
when something is already wrong, and a task that cannot reach the CRM cannot land anyway.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass

from store_sync.store.client import LatencyWatch

log = logging.getLogger(__name__)


class BudgetUnavailable(RuntimeError):
    """The shared request budget (in the CRM database) cannot be reached: nothing is sent to the store."""


@dataclass(frozen=True)
class Lane:
    name: str
    requests_per_second: float
    max_in_flight: int


class _Connection:
    """One autocommit connection per process and CRM database, shared by every budget and thread of it."""

    _by_dsn: dict[str, _Connection] = {}
    _lock = threading.Lock()

    def __init__(self, dsn: str):
        self.dsn, self.conn, self.pid, self.lock = dsn, None, None, threading.Lock()

    @classmethod
    def get(cls, dsn: str) -> _Connection:
        with cls._lock:
            if dsn not in cls._by_dsn:
                cls._by_dsn[dsn] = cls(dsn)
            return cls._by_dsn[dsn]

    def execute(self, sql: str, args: tuple):
        import psycopg

        with self.lock:
            for attempt in (1, 2):
                try:
                    if self.conn is None or self.conn.closed or self.pid != os.getpid():
                        # a forked task process must not share its parent's socket: open its own
                        self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                                    application_name="store_sync budget")
                        self.pid = os.getpid()
                        self._ensure_schema()
                    return self.conn.execute(sql, args).fetchone()
                except psycopg.OperationalError as exc:  # a restarted CRM: one new connection, then words
                    self.conn = None
                    if attempt == 2:
                        from store_sync.crm.database import describe

                        raise BudgetUnavailable(
                            f"the store's shared request budget lives in the CRM database ({describe(self.dsn)}), "
                            f"which cannot be reached: {' '.join(str(exc).split())}; no request is sent to the "
                            f"store until it answers") from None

    def _ensure_schema(self) -> None:
        if self.conn.execute("SELECT to_regproc('sync.take_store_request')").fetchone()[0] is None:
            from store_sync.crm.migrations import migrate

            migrate(self.dsn)


class SharedBudget(LatencyWatch):
    """The ``RequestBudget`` interface (acquire, release, slow_down, recover, observe) over the CRM's rows."""

    def __init__(self, dsn: str, store: str, lane: Lane, whole: Lane, lease_seconds: float = 70.0):
        self.store, self.lane, self.whole = store, lane, whole
        self.max_rate = float(lane.requests_per_second)
        self.rate = self.max_rate  # as last seen in the shared row
        self.max_in_flight = max(1, int(lane.max_in_flight))
        self.lease_seconds = lease_seconds
        self.waited = 0.0
        self.requests = 0
        self._db = _Connection.get(dsn)
        self._local = threading.local()
        self._holder = f"{socket.gethostname()}:{os.getpid()}"
        self._stat_lock = self._latency_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"SharedBudget({self.store!r}, lane={self.lane.name!r} {self.lane.requests_per_second}/s "
                f"{self.lane.max_in_flight} in flight, store {self.whole.requests_per_second}/s "
                f"{self.whole.max_in_flight} in flight)")

    def acquire(self) -> None:
        pause, retakes = 0.02, 0
        while True:
            lease, wait = self._db.execute(
                "SELECT * FROM sync.take_store_request(%s, %s, %s, %s, %s, %s, %s, %s)",
                (self.store, self.lane.name, float(self.lane.requests_per_second), int(self.lane.max_in_flight),
                 float(self.whole.requests_per_second), int(self.whole.max_in_flight), self._holder,
                 float(self.lease_seconds)))
            if lease is None:
                # every slot in flight is taken (here or in another process): ask again shortly
                time.sleep(pause * random.uniform(0.5, 1.5))
                with self._stat_lock:
                    self.waited += pause
                pause = min(0.25, pause * 2)
                continue
            given = time.monotonic()
            if wait > 0:
                with self._stat_lock:
                    self.waited += wait
                time.sleep(wait)
            # A thread woken late (busy cores) would send beside the next slot's request: the store would
            # see a burst above the rate. Its slot is past: give it up and take a later one.
            # (Three times at most: on a machine that late, a request still goes.)
            late = time.monotonic() - (given + max(wait, 0.0))
            spacing = 1.0 / max(self.lane.requests_per_second, self.whole.requests_per_second)
            if late <= max(0.5 * spacing, 0.02) or retakes >= 3:
                break
            retakes += 1
            self._db.execute("SELECT sync.release_store_request(%s, %s, %s, NULL)", (lease, self.store, self.lane.name))
        self._local.lease, self._local.outcome = lease, None
        with self._stat_lock:
            self.requests += 1

    def recover(self) -> None:
        self._local.outcome = "ok"  # sent with the release: one statement

    def release(self) -> None:
        lease, outcome = getattr(self._local, "lease", None), getattr(self._local, "outcome", None)
        self._local.lease = self._local.outcome = None
        rate = self._db.execute("SELECT sync.release_store_request(%s, %s, %s, %s)",
                                (lease, self.store, self.lane.name, outcome))[0]
        if rate is not None:
            self.rate = float(rate)

    def slow_down(self) -> None:
        rate = self._db.execute("SELECT sync.release_store_request(NULL, %s, %s, 'slow')",
                                (self.store, self.lane.name))[0]
        if rate is not None:
            self.rate = float(rate)


_BUDGETS: dict[tuple, SharedBudget] = {}
_LOCK = threading.Lock()


def store_budget(dsn: str, store: str, lane: Lane, whole: Lane, timeout: float = 30.0) -> SharedBudget:
    """The process's handle on the shared budget of ``store``'s ``lane`` (one per lane and limits)."""
    key = (dsn, store, lane, whole)
    with _LOCK:
        if key not in _BUDGETS:
            # A lease outlives the longest a request can take (connect + read timeouts, a slow body),
            # and no more: a killed process's slot comes back after that.
            _BUDGETS[key] = SharedBudget(dsn, store, lane, whole, lease_seconds=2 * float(timeout) + 10)
        return _BUDGETS[key]
