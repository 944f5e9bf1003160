"""The small async trigger behind the change sensors: asks the store "anything newer?" cheaply.

One question per poll: ``per_page=1&_fields=id`` with ``modified_after`` one second before the
watermark, answered by ``X-WP-Total``. Customers have no date filter: the trigger watches the
highest customer id, the CRM inbox for freshly landed orders, and the clock for the periodic scan.
Blocking calls run in threads so the triggerer's event loop never stalls; the store client's
request budget is the store's, shared with every task and worker.

Polling adapts to the store: every ``poll_seconds`` while it is busy, every ``quiet_poll_seconds``
once ``quiet_after_seconds`` passed without a change of this entity (the registry's values, or the
Variable ``store_sync_overrides``). "Last change seen" is kept in the watermark's state
(``last_change_at``, written after a landing that landed something) and handed to each new trigger,
so the pace survives deferrals. While slow, a ``NOTIFY store_activity`` from the CRM (a store webhook
arrived, or any entity landed changes) wakes every trigger at once and makes it fast again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)
GMT = "%Y-%m-%dT%H:%M:%S"


class StoreChangeTrigger(BaseTrigger):
    def __init__(self, entity: str, cursor: str | None, store_conn_id: str = "store_api", poll_seconds: float = 1.0,
                 max_quiet_seconds: float = 300.0, state: dict | None = None, quiet_after_seconds: float = 300.0,
                 quiet_poll_seconds: float | None = None):
        super().__init__()
        self.entity, self.cursor, self.store_conn_id = entity, cursor, store_conn_id
        self.poll_seconds, self.max_quiet_seconds = poll_seconds, max_quiet_seconds
        self.quiet_after_seconds = quiet_after_seconds
        self.quiet_poll_seconds = poll_seconds if quiet_poll_seconds is None else quiet_poll_seconds
        self.state = state or {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("store_sync.triggers.StoreChangeTrigger", {
            "entity": self.entity, "cursor": self.cursor, "store_conn_id": self.store_conn_id,
            "poll_seconds": self.poll_seconds, "max_quiet_seconds": self.max_quiet_seconds, "state": self.state,
            "quiet_after_seconds": self.quiet_after_seconds, "quiet_poll_seconds": self.quiet_poll_seconds})

    def interval(self, now: float | None = None) -> float:
        """Seconds to the next poll: fast within ``quiet_after_seconds`` of the last change seen (or of a
        wake-up), slow after."""
        now = time.time() if now is None else now
        seen = max(float(self.state.get("last_change_at") or 0), float(self.state.get("woken_at") or 0))
        if self.quiet_poll_seconds <= self.poll_seconds or now - seen < self.quiet_after_seconds:
            return self.poll_seconds
        return self.quiet_poll_seconds

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from asgiref.sync import sync_to_async

        from store_sync.registry import entity as registry_entity
        from store_sync.store.client import StoreAuthError, StoreNotFound
        from store_sync.store.hooks import StoreApiHook

        entity = registry_entity(self.entity)
        client = await sync_to_async(StoreApiHook(self.store_conn_id).get_client)()
        started, polls = time.monotonic(), 0
        activity = StoreActivity()
        try:
            while True:
                try:
                    reason = await asyncio.to_thread(self.check, client, entity, polls)
                except (StoreAuthError, StoreNotFound) as exc:
                    yield TriggerEvent({"status": "error", "message": str(exc)})
                    return
                except Exception as exc:  # the store is busy or down: keep waiting, the client already backed off
                    log.warning("%s: change check failed (%s); waiting", self.entity, exc)
                    reason = None
                if reason is None and time.monotonic() - started >= self.max_quiet_seconds:
                    reason = "quiet period over: a safety cycle"
                if reason:
                    yield TriggerEvent({"status": "changed", "entity": self.entity, "reason": reason})
                    return
                polls += 1
                interval = self.interval()
                if interval <= self.poll_seconds:
                    await asyncio.sleep(interval)  # busy: the fast pace already; a wake-up changes nothing
                elif await activity.wait(interval):
                    log.info("%s: store activity; polling every %ss again", self.entity, self.poll_seconds)
                    self.state["woken_at"] = time.time()
        finally:
            await activity.close()

    def check(self, client, entity, polls: int) -> str | None:
        if entity.strategy == "id_scan":
            return self._check_customers(client, entity)
        if not self.cursor:
            return "first load"
        if self.state.get("children_due"):  # a cycle left parents whose notes it had no room to read
            return f"the children of {self.state['children_due']} changed records to read"
        since = (datetime.fromisoformat(self.cursor.replace("Z", "")[:19]) - timedelta(seconds=1)).strftime(GMT)
        params = {"modified_after": since, "dates_are_gmt": "true"}
        statuses = [s for s in entity.statuses if s]
        # Trash hides from status=any; ask about it every fifth poll only, to stay light on the store.
        for status in statuses[:1] + (statuses[1:] if polls % 5 == 0 else []):
            if client.count(entity.endpoint, {**params, "status": status}) > 0:
                return f"{status} records modified since {since}"
        if not statuses and client.count(entity.endpoint, params) > 0:
            return f"records modified since {since}"
        return None

    def _check_customers(self, client, entity) -> str | None:
        newest = client.get(entity.endpoint, {"orderby": "id", "order": "desc", "per_page": 1, "_fields": "id",
                                              "role": "all"})
        if newest and int(newest[0]["id"]) > int(self.state.get("max_id") or 0):
            return f"new customer {newest[0]['id']}"
        import psycopg

        from store_sync.tasks import crm_dsn

        with psycopg.connect(crm_dsn(), connect_timeout=5) as conn:
            orders, hooks = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM inbox.record WHERE entity='orders' AND inbox_id > %s AND "
                "(payload->>'customer_id')::bigint > 0), "
                "EXISTS (SELECT 1 FROM sync.webhook_event WHERE entity='customers' AND event_id > %s)",
                (int(self.state.get("orders_inbox_id") or 0), int(self.state.get("webhook_event_id") or 0))).fetchone()
        if hooks:
            return "the store sent customer webhooks"
        if orders:
            return "orders of registered customers landed"
        from store_sync.inbound.detect import now_utc, scan_due

        if scan_due(self.state, replace(entity, scan_every_minutes=float(
                self.state.get("scan_every_minutes") or entity.scan_every_minutes)), now_utc()):
            return "customer scan slice due"
        return None


def note_change(entity: str, run_id: str) -> None:
    """After a landing that landed something: remember when (the next trigger's pace) and wake every
    trigger waiting slowly (``NOTIFY store_activity``, in the same transaction)."""
    import psycopg

    from store_sync.inbound.landing import set_watermark
    from store_sync.tasks import crm_dsn

    with psycopg.connect(crm_dsn()) as conn, conn.transaction():
        set_watermark(conn, entity, None, run_id, {"last_change_at": time.time()})
        conn.execute("SELECT pg_notify('store_activity', %s)", (entity,))


class StoreActivity:
    """``LISTEN store_activity`` on the CRM: a webhook arrived or an entity landed changes (migration 0061).

    Without the CRM (it restarts, or is not reachable from the triggerer) the wait is a plain sleep."""

    def __init__(self) -> None:
        self.conn = None
        self.failed_at = 0.0

    async def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when woken by store activity."""
        import psycopg

        try:
            if self.conn is None and time.monotonic() - self.failed_at > 60:
                from asgiref.sync import sync_to_async

                from store_sync.tasks import crm_dsn

                dsn = await sync_to_async(crm_dsn)()
                self.conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5)
                await self.conn.execute("LISTEN store_activity")
            if self.conn is not None:
                async for _ in self.conn.notifies(timeout=seconds, stop_after=1):
                    return True
                return False
        except Exception as exc:  # noqa: BLE001 - a lost CRM connection must not stop the trigger
            log.warning("store activity: %s; sleeping plainly for a while", exc)
            await self.close()
            self.failed_at = time.monotonic()
        await asyncio.sleep(seconds)
        return False

    async def close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            except Exception:  # noqa: BLE001
                pass
            self.conn = None


class OutboxTrigger(BaseTrigger):
    """Waits until the outbox has a request due: ``LISTEN sync_outbox`` (the request functions notify on
    commit), with a cheap query every ``poll_seconds`` for retries whose backoff ran out."""

    def __init__(self, poll_seconds: float = 15.0, max_wait_seconds: float = 3600.0):
        super().__init__()
        self.poll_seconds, self.max_wait_seconds = poll_seconds, max_wait_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("store_sync.triggers.OutboxTrigger",
                {"poll_seconds": self.poll_seconds, "max_wait_seconds": self.max_wait_seconds})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import psycopg
        from asgiref.sync import sync_to_async

        from store_sync.outbound.writeback import pending
        from store_sync.tasks import crm_dsn

        dsn = await sync_to_async(crm_dsn)()
        started = time.monotonic()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    await conn.execute("LISTEN sync_outbox")
                    while True:
                        due = await asyncio.to_thread(pending, dsn)
                        if due:
                            yield TriggerEvent({"status": "due", "reason": f"{due} outbox request(s) due"})
                            return
                        if time.monotonic() - started >= self.max_wait_seconds:
                            yield TriggerEvent({"status": "due", "reason": "quiet period over: a safety pass"})
                            return
                        async for _ in conn.notifies(timeout=self.poll_seconds, stop_after=1):
                            break
            except psycopg.OperationalError as exc:  # the CRM database restarts: wait and listen again
                log.warning("outbox trigger: %s; listening again shortly", exc)
                await asyncio.sleep(min(self.poll_seconds, 5))
