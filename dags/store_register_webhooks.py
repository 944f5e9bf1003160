"""
### Register the store webhooks the CRM sync needs, and prune the old events

Hourly, and on demand: makes the store hold one active webhook per topic (`customer.created`,
`customer.updated`, `customer.deleted`) delivering to the Airflow api-server's receiver
(`<webhook_url>/store-webhooks/receive`), signed with the connection's webhook secret. Missing ones
are created, ones the store disabled after failed deliveries are re-enabled, copies are removed;
rerunning changes nothing. Tick **push_secret** after rotating the secret (the store never shows it,
so it cannot be compared).

Without a `webhook_url` extra on the `store_api` connection, webhooks are off: the log says so and
the customer scan finds changes instead (minutes rather than seconds). The second task deletes
webhook events older than **keep_days** once the customer cycle has read them.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from store_sync.dag_defaults import BACKFILL_POOL, DEFAULT_ARGS, TRANSFORM_POOL, Tag


@dag(dag_id="store_register_webhooks", schedule=timedelta(hours=1), start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.WEBHOOKS], doc_md=__doc__,
     params={
         "push_secret": Param(False, type="boolean", title="Send the secret to every webhook (after rotating it)"),
         "keep_days": Param(7, type="number", minimum=0, title="Keep consumed webhook events (days)"),
     })
def store_register_webhooks():
    @task(pool=BACKFILL_POOL)  # a few light calls, behind the shoppers' traffic
    def register(params=None) -> dict:
        from store_sync.store.webhooks import register_webhooks

        return register_webhooks(push_secret=bool(params["push_secret"]))

    @task(pool=TRANSFORM_POOL)  # a CRM write
    def prune(params=None) -> int:
        from store_sync.store.webhooks import prune_events
        from store_sync.tasks import ready_crm

        return prune_events(ready_crm(), float(params["keep_days"]))

    register()
    prune()


store_register_webhooks()
