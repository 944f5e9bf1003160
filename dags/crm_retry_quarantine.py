"""
### Re-apply the inbox rows the CRM transforms quarantined

A record the CRM's model rejected (a value it cannot hold, a code it does not know) waits in
`sync.transform_quarantine` with PostgreSQL's reason, while everything else applies; the view
`sync.transform_quarantine_open` lists the open ones and the version the CRM shows instead. Once the
cause is fixed (a migration widened a column, or the record was fixed at the store and landed again),
trigger this DAG: it re-applies them with the same transforms, newest version first, and marks those
that apply resolved. Leave **quarantine ids** empty for all open rows, or name some; **entities**
narrows it further. Rows that still fail stay quarantined with their reason and one more attempt.
It also runs daily, so nothing fixed waits for a person. Same command from a shell:
`make retry-quarantine` (`ARGS="--id 12 --id 13"`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from store_sync.dag_defaults import DEFAULT_ARGS, TRANSFORM_POOL, Tag
from store_sync.registry import entities

TRANSFORMED = sorted(name for name, spec in entities().items() if spec.transform)


@dag(dag_id="crm_retry_quarantine", schedule=timedelta(days=1), start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args={**DEFAULT_ARGS, "pool": TRANSFORM_POOL}, tags=[Tag.SYNC, Tag.CRM],
     doc_md=__doc__,
     params={
         "quarantine_ids": Param([], type="array", items={"type": "integer", "minimum": 1}, title="Quarantine ids",
                                 description="sync.transform_quarantine.quarantine_id; empty means every open row"),
         "entities": Param([], type="array", items={"type": "string", "enum": TRANSFORMED}, title="Entities",
                           description="Only these entities; empty means all"),
     })
def crm_retry_quarantine():
    @task
    def retry(params=None) -> dict:
        """Re-apply; the counts (retried, resolved, still quarantined) go to XCom, the reasons to the log."""
        from store_sync.crm.migrations import migrate
        from store_sync.crm.transform import open_quarantine, retry_quarantine
        from store_sync.tasks import crm_dsn

        dsn = crm_dsn()
        migrate(dsn)
        result = retry_quarantine(dsn, params.get("quarantine_ids") or None, params.get("entities") or None)
        for row in open_quarantine(dsn):
            print("still quarantined:", row)
        return {k: v for k, v in result.items() if k != "steps"}

    retry()


crm_retry_quarantine()
