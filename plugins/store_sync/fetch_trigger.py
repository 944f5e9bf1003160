"""The small async trigger behind ``store_fetch_on_demand``: asks the CRM "is a fetch request due?".

One indexed query per poll (``min(next_attempt_at)`` over the pending requests, on a partial index),
on one asynchronous connection kept open while waiting: no worker slot, no thread, no store request.
It fires when a request is due (a new one, or a failed one whose backoff has passed), when a run of the
DAG triggered from the form is queued behind the waiting run, or after ``max_quiet_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)
APPLICATION_NAME = "store_fetch_on_demand trigger"  # how the waiting shows in pg_stat_activity


class FetchQueueTrigger(BaseTrigger):
    def __init__(self, poll_seconds: float = 2.0, max_quiet_seconds: float = 60.0, dag_id: str | None = None):
        super().__init__()
        self.poll_seconds, self.max_quiet_seconds, self.dag_id = poll_seconds, max_quiet_seconds, dag_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("store_sync.fetch_trigger.FetchQueueTrigger", {
            "poll_seconds": self.poll_seconds, "max_quiet_seconds": self.max_quiet_seconds, "dag_id": self.dag_id})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import psycopg
        from asgiref.sync import sync_to_async

        from store_sync.outbound.fetch_queue import DUE_SQL
        from store_sync.tasks import crm_dsn

        dsn = await sync_to_async(crm_dsn)()
        started, conn, event = time.monotonic(), None, None
        try:
            while event is None:
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10,
                                                                    application_name=APPLICATION_NAME)
                    first, now = await (await conn.execute(DUE_SQL)).fetchone()
                except psycopg.Error as exc:  # the CRM is restarting: keep waiting
                    log.warning("fetch queue: cannot ask the CRM (%s); waiting", exc)
                    first, now, conn = None, None, None
                if first is not None and first <= now:
                    event = {"status": "due", "reason": "fetch requests are due"}
                elif self.dag_id and await self._form_run_waiting():
                    event = {"status": "queued_run", "reason": "a run from the form is queued"}
                elif time.monotonic() - started >= self.max_quiet_seconds:
                    event = {"status": "quiet", "reason": "quiet period over"}
                else:
                    await asyncio.sleep(self.poll_seconds)
        finally:
            if conn is not None and not conn.closed:
                await conn.close()
        yield TriggerEvent(event)

    async def _form_run_waiting(self) -> bool:
        """A manual run (the Params form) waits behind this one (max_active_runs=1): end this run now."""
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        try:
            return await sync_to_async(RuntimeTaskInstance.get_dr_count)(dag_id=self.dag_id, states=["queued"]) > 0
        except Exception as exc:  # no Airflow API to ask here: the quiet period bounds the wait instead
            log.info("fetch queue: cannot count queued runs (%s); relying on max_quiet_seconds", exc)
            self.dag_id = None
            return False
