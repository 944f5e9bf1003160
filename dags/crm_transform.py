"""
### Transform the inboxes into the CRM's relational model

Runs as soon as any `crm_inbox_<entity>` Asset is updated (a landing finished), and hourly as a safety
net. Each step applies the inbox rows not yet applied with the set-based SQL in
`include/sql/transform/` (code lists → categories → customers → products → orders → refunds →
subscriptions), in batches, one transaction per batch, newest version per record first and never
an older version over a newer one; then the CRM checks in `include/sql/checks/` run, and a failure
names the offending rows.

*Triage*: a failed step rolls back its batch and leaves the rows unapplied; rerunning is safe.
References the CRM lacks (an order's customer or product) are kept as source ids and queued in
`sync.fetch_request`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetAny, AssetOrTimeSchedule, CronTriggerTimetable, chain, dag, task

from store_sync.dag_defaults import DEFAULT_ARGS, TRANSFORM_POOL, Tag, inbox_asset_name
from store_sync.registry import entities
from store_sync.transform import steps

INBOXES = [Asset(inbox_asset_name(name)) for name in entities()]


@dag(dag_id="crm_transform", start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 * * * *", timezone="UTC"), assets=AssetAny(*INBOXES)),
     default_args={**DEFAULT_ARGS, "pool": TRANSFORM_POOL}, tags=[Tag.SYNC, Tag.CRM], doc_md=__doc__,
     dagrun_timeout=timedelta(hours=2))
def crm_transform():
    @task
    def migrate_crm() -> list[str]:
        from store_sync.migrations import migrate
        from store_sync.tasks import crm_dsn

        return migrate(crm_dsn())

    def step_task(sql_file: str, names: list[str]):
        @task(task_id=f"apply_{sql_file.removesuffix('.sql').split('_', 1)[1]}")
        def apply() -> dict:
            import psycopg

            from store_sync.tasks import crm_dsn
            from store_sync.transform import run_step

            with psycopg.connect(crm_dsn()) as conn:
                return run_step(conn, sql_file, names)

        return apply()

    @task
    def check_crm() -> dict:
        from store_sync.tasks import crm_dsn
        from store_sync.transform import run_checks

        return run_checks(crm_dsn())

    chain(migrate_crm(), *[step_task(f, names) for f, names in steps()], check_crm())


crm_transform()
