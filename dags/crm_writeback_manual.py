"""
### Write back by hand: one request, all due requests, or a dry run

The form takes the **request ids** to send now (empty: every due request) and **dry run** (report,
in the task log, what would be sent to the store and what each request would become — applied,
already true, conflict, rejected — without writing anything or changing a request's state).
Requests in `conflict` or `failed` are sent again after a person resets them:
`UPDATE sync.outbox SET state='pending', attempts=0, next_attempt_at=now() WHERE request_id = …`.
The live path is the `crm_writeback` DAG; this one shares its code and the same safeguards.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag

from store_sync.dag_defaults import DEFAULT_ARGS, LIVE_POOL, Tag
from store_sync.operators import WriteBackOperator


@dag(dag_id="crm_writeback_manual", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.OUTBOX], doc_md=__doc__,
     render_template_as_native_obj=True,  # the Params reach the operator as a list and a boolean
     params={
         "request_ids": Param([], type="array", items={"type": "integer", "minimum": 1}, title="Request ids",
                              description="Outbox requests to send now; empty sends every due request"),
         "dry_run": Param(False, type="boolean", title="Dry run",
                          description="Only report what would be sent"),
     })
def crm_writeback_manual():
    WriteBackOperator(task_id="send", pool=LIVE_POOL, deferrable=False, request_ids="{{ params.request_ids }}",
                      dry_run="{{ params.dry_run }}")


crm_writeback_manual()
