"""
### Fetch on demand: the records the CRM asks for

Drains `sync.fetch_request`, the queue the transforms fill with references the CRM lacks (an order's
customer or products, a refund's order) and people fill with `SELECT crm.request_fetch('customers', 42)`
or with this DAG's form: pick the **entity** and the **ids**, trigger, and they are queued and fetched.
Entities: `orders`, `refunds`, `subscriptions`, `products`, `customers` (by id, `include=` reads of up to
100 ids), and, by the parent's id, `order_notes`, `order_refunds`, `subscription_orders`
(see `sync.fetch_target`).

One task per run, `fetch_requested`: it **waits** in the triggerer (no worker slot) until a request is
due, then reads them from the store, lands the answers in the inboxes and announces the inbox Assets,
so `crm_transform` applies them (which links an order to its late customer or product). A direct `404`
lands as deleted at the source and closes the request; a failure is retried in a later run with a
backoff that doubles (`attempts`, `next_attempt_at`, `last_error`), and after `max_attempts` the request
is `failed` until asked again. `@continuous`, one active run; a form run starts as soon as the waiting
run sees it queued (at the latest after `max_quiet_seconds`).

*Politeness*: pool `store_api_fetch` (1 slot), lowest priority, and a budget of its own, smaller than
live sync's: connection extras `fetch_requests_per_second` (1), `fetch_max_in_flight` (1),
`fetch_max_retries` (3). Settings: Variable `store_sync_overrides`, key `fetch_on_demand`
(`poll_seconds`, `max_quiet_seconds`, `retry_base_seconds`, `retry_max_seconds`, `max_attempts`,
`max_requests_per_run`, `max_run_seconds`).

*Triage*: `SELECT * FROM sync.fetch_queue_status` (backlog by entity, oldest pending age, done, deleted
at the source, failed, last error); each request is a row of `sync.fetch_request`; the counts of each
run are in the task log and `sync.landing_run` (`mode = 'on_demand'`).
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Asset, Param, dag

from store_sync.dag_defaults import DEFAULT_ARGS, FETCH_POOL, FETCH_PRIORITY, Tag, inbox_asset_name
from store_sync.fetch_operator import FetchOnDemandOperator
from store_sync.outbound.fetch_queue import fetchable, lands_in


@dag(dag_id="store_fetch_on_demand", schedule="@continuous", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.INBOX, Tag.ON_DEMAND], doc_md=__doc__,
     params={
         "entity": Param("customers", type="string", enum=fetchable(), title="Entity",
                         description="What to fetch; order_notes, order_refunds and subscription_orders take the "
                                     "parent's id"),
         "ids": Param([], type="array", items={"type": "integer", "minimum": 1}, title="Ids",
                      description="Store ids to fetch (empty: just drain the queue)"),
     })
def store_fetch_on_demand():
    FetchOnDemandOperator(task_id="fetch_requested", pool=FETCH_POOL, priority_weight=FETCH_PRIORITY,
                          weight_rule="absolute", outlets=[Asset(inbox_asset_name(n)) for n in lands_in()])


store_fetch_on_demand()
