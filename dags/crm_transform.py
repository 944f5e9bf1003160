"""
### Transform the inboxes into the CRM's relational model

Runs as soon as any `crm_inbox_<entity>` Asset is updated (a landing finished), and hourly as a safety
net. Each step applies the inbox rows not yet applied with the set-based SQL in
`include/sql/transform/` (code lists → categories → customers → products → orders → refunds →
subscriptions), in batches, one transaction per batch, newest version per record first and never
an older version over a newer one; then the CRM checks in `include/sql/checks/` run, and a failure
names the offending rows.

*Triage*: one bad record never stops the CRM. A batch the model rejects for its content is split
in halves down to the bad rows, which go to `sync.transform_quarantine` (see the view
`sync.transform_quarantine_open`: the reason, and which version the CRM shows instead) while the rest
applies; re-apply them with the `crm_retry_quarantine` DAG once fixed (a run that applies a new
migration re-applies them by itself). A step failing for another reason does not stop the later steps;
the task fails at the end, naming it, and rerunning is safe. References the CRM lacks (an order's
customer or product) are kept as source ids and queued in `sync.fetch_request`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetAny, AssetOrTimeSchedule, CronTriggerTimetable, chain, dag, task

from store_sync.dag_defaults import DEFAULT_ARGS, TRANSFORM_POOL, Tag, inbox_asset_name
from store_sync.registry import entities

INBOXES = [Asset(inbox_asset_name(name)) for name in entities()]


@dag(dag_id="crm_transform", start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 * * * *", timezone="UTC"), assets=AssetAny(*INBOXES)),
     default_args={**DEFAULT_ARGS, "pool": TRANSFORM_POOL}, tags=[Tag.SYNC, Tag.CRM], doc_md=__doc__,
     dagrun_timeout=timedelta(hours=2))
def crm_transform():
    @task
    def apply_inbox() -> list[dict]:
        """Every transform step in dependency order, each on its own; each batch is one transaction."""
        from store_sync.crm.migrations import migrate
        from store_sync.crm.transform import retry_quarantine, transform
        from store_sync.tasks import crm_dsn

        dsn = crm_dsn()
        if migrate(dsn):  # a new migration may accept what the model rejected before
            retry_quarantine(dsn)
        return transform(dsn)

    @task
    def check_crm() -> dict:
        from store_sync.crm.transform import run_checks
        from store_sync.tasks import crm_dsn

        return run_checks(crm_dsn())

    # Two tasks, not one per step: each task hop costs Airflow about a second, and the CRM row's
    # freshness is the point (bench/freshness.py). The steps and their counts are in the task's log.
    chain(apply_inbox(), check_crm())


crm_transform()
