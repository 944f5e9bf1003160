"""``FetchOnDemandOperator``: wait for due fetch requests without a worker slot, then drain the queue.

1. on a worker: the run's form input (entity + ids), if any, becomes requests (``crm.request_fetch``);
2. if a request is due, drain at once; otherwise defer to ``FetchQueueTrigger``, which waits in the
   triggerer (one indexed query every ``poll_seconds`` on the CRM, nothing on the store);
3. resume on a worker and drain: due requests read from the store, landed in the inboxes, each marked
   done (fetched, or deleted at the source) or failed with its backoff. A quiet period with nothing due
   ends as *skipped*, so the inbox Assets (and the transforms) are only announced after real work.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from store_sync.fetch_trigger import FetchQueueTrigger


class FetchOnDemandOperator(BaseOperator):
    ui_color = "#e8daef"

    def __init__(self, *, store_conn_id: str = "store_api", deferrable: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.store_conn_id, self.deferrable = store_conn_id, deferrable

    def execute(self, context) -> Any:
        from store_sync.outbound.fetch_queue import due_now, fetch_settings, request_fetch
        from store_sync.tasks import ready_crm

        dsn = ready_crm()
        params = context["params"]
        if ids := list(params.get("ids") or []):
            run_id = context["dag_run"].run_id
            requested = request_fetch(dsn, params["entity"], ids, reason=f"asked from the Airflow form (run {run_id})")
            self.log.info("requested %s %s: request ids %s", params["entity"], ids, requested)
        if not self.deferrable or due_now(dsn):
            return self._drain(context, "requests are due")
        cfg = fetch_settings()
        self.defer(trigger=FetchQueueTrigger(poll_seconds=float(cfg["poll_seconds"]),
                                             max_quiet_seconds=float(cfg["max_quiet_seconds"]), dag_id=self.dag_id),
                   method_name="execute_complete")

    def execute_complete(self, context, event: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from store_sync.outbound.fetch_queue import due_now
        from store_sync.tasks import crm_dsn

        if not event or event.get("status") == "error":
            raise RuntimeError(f"fetch queue: {event.get('reason') if event else 'no event from the trigger'}")
        if event.get("status") != "due" and not due_now(crm_dsn()):
            raise AirflowSkipException(f"{event.get('reason')}: nothing due")
        return self._drain(context, event.get("reason", ""))

    def _drain(self, context, reason: str) -> dict:
        from store_sync.outbound.fetch_queue import drain, fetch_settings
        from store_sync.store.hooks import StoreApiHook
        from store_sync.tasks import crm_dsn

        hook = StoreApiHook(self.store_conn_id)
        # A share of the store's budget of its own, smaller than live sync's: the shoppers come first.
        hook.overrides = {
            **hook.lane_budget("fetch"),  # the store's shared budget, lane fetch (fetch_requests_per_second...)
            "max_retries": hook.extra_number("fetch_max_retries", 3, kind=int, minimum=0)}
        self.log.info("fetch on demand: %s; draining", reason)
        counts = drain(crm_dsn(), hook.get_client(), context["dag_run"].run_id, fetch_settings())
        self.log.info("fetch on demand: %(requested)d requested, %(fetched)d fetched, %(deleted_at_source)d deleted at "
                      "the source, %(failed)d failed (%(gave_up)d given up), backlog left %(backlog)d "
                      "(%(due_left)d due); %(store_requests)d store requests, %(store_retries)d retries", counts)
        if counts["backlog_by_entity"]:
            self.log.info("backlog by entity: %s", counts["backlog_by_entity"])
        return counts
