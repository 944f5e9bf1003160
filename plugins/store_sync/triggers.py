"""The small async trigger behind the change sensors: asks the store "anything newer?" cheaply.

One question per poll: ``per_page=1&_fields=id`` with ``modified_after`` one second before the
watermark, answered by ``X-WP-Total``. Customers have no date filter: the trigger watches the
highest customer id, the CRM inbox for freshly landed orders, and the clock for the periodic scan.
Blocking calls run in threads so the triggerer's event loop never stalls; the store client's
request budget is shared by every trigger in the triggerer process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)
GMT = "%Y-%m-%dT%H:%M:%S"


class StoreChangeTrigger(BaseTrigger):
    def __init__(self, entity: str, cursor: str | None, store_conn_id: str = "store_api", poll_seconds: float = 1.0,
                 max_quiet_seconds: float = 300.0, state: dict | None = None):
        super().__init__()
        self.entity, self.cursor, self.store_conn_id = entity, cursor, store_conn_id
        self.poll_seconds, self.max_quiet_seconds = poll_seconds, max_quiet_seconds
        self.state = state or {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("store_sync.triggers.StoreChangeTrigger", {
            "entity": self.entity, "cursor": self.cursor, "store_conn_id": self.store_conn_id,
            "poll_seconds": self.poll_seconds, "max_quiet_seconds": self.max_quiet_seconds, "state": self.state})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from asgiref.sync import sync_to_async

        from store_sync.registry import entity as registry_entity
        from store_sync.store.client import StoreAuthError, StoreNotFound
        from store_sync.store.hooks import StoreApiHook

        entity = registry_entity(self.entity)
        client = await sync_to_async(StoreApiHook(self.store_conn_id).get_client)()
        started, polls = time.monotonic(), 0
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
            await asyncio.sleep(self.poll_seconds)

    def check(self, client, entity, polls: int) -> str | None:
        if entity.strategy == "id_scan":
            return self._check_customers(client, entity)
        if not self.cursor:
            return "first load"
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
        last_scan = self.state.get("last_scan")
        if not last_scan or datetime.utcnow() - datetime.fromisoformat(last_scan[:19]) >= timedelta(
                minutes=float(self.state.get("scan_every_minutes") or entity.scan_every_minutes)):
            return "periodic customer scan due"
        return None


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
