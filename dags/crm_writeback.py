"""
### Write back: the CRM's status changes reach the store, exactly once in effect

CRM workflows ask for changes with SQL functions that queue them in the outbox (`sync.outbox`):
`crm.request_order_status(order_id, status, note)`, `crm.request_refund(order_id, amount, reason)`,
`crm.request_subscription_status(subscription_id, status, note)`,
`crm.request_subscription_next_payment(subscription_id, next_payment, note)`; each returns the
request's id. This DAG is `@continuous` with one task that **waits** deferred (a trigger listening
to the outbox's `NOTIFY`, no worker slot held) and **sends** what is due: order statuses through the
store's batch endpoint (100 per call), subscriptions one by one (`transition_status`: the store's
rules apply), refunds with `api_refund=false`.

Each request is marked in the store record's meta (`_crm_outbox_request`), so a task killed after
the store applied a change but before the CRM recorded it is recognised on the next attempt; a
change already true at the store is marked done without a write; a record the store changed after
the version the request was based on becomes a **conflict** holding both versions
(`sync.outbox_conflicts`; policy per field in `sync.outbox_policy`). Results per request:
`pending`, `sent`, `applied`, `rejected` (with the store's message), `conflict`, `failed` (after 8
tries, with backoff between them). The CRM's own tables show the change once the sync brings it
back (`confirmed_at`). Backlog and results: `SELECT * FROM sync.outbox_status`.
For one request, or a dry run that reports what would be sent, trigger `crm_writeback_manual`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag

from store_sync.dag_defaults import DEFAULT_ARGS, LIVE_POOL, Tag
from store_sync.operators import WriteBackOperator


@dag(dag_id="crm_writeback", schedule="@continuous", start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.OUTBOX, Tag.LIVE], doc_md=__doc__)
def crm_writeback():
    # Write-back shares the live pool: CRM users' changes go before backfills and fetches.
    WriteBackOperator(task_id="send", pool=LIVE_POOL, priority_weight=10)


crm_writeback()
