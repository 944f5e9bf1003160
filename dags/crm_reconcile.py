"""
### Reconcile the CRM with the store

Daily, and on demand: compares the CRM with the store entity by entity (counts, ids, modified
times, and a checksum of the mapped fields in the entity registry's `reconcile` blocks) and fails,
listing the differences, when the CRM is not right. The same check runs from a shell with
`make reconcile`. Entities whose first load has not finished are left for the next run, and the
store's requests come from the budget's reconcile lane (`reconcile_requests_per_second`), never live
sync's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from store_sync.dag_defaults import BACKFILL_POOL, DEFAULT_ARGS, Tag


@dag(dag_id="crm_reconcile", schedule=timedelta(days=1), start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.CRM, Tag.RECONCILE], doc_md=__doc__)
def crm_reconcile():
    @task(pool=BACKFILL_POOL)
    def compare() -> dict:
        from store_sync.crm.reconcile import render
        from store_sync.tasks import compare_crm

        reports, waiting = compare_crm()  # (entities still in their first load: left for the next run)
        text = render(reports) + (f"\nnot compared yet (first load not finished): {', '.join(waiting)}" if waiting else "")
        if not all(r.ok for r in reports):
            raise ValueError(f"the CRM differs from the store:\n{text}")
        print(text)
        return {r.entity: r.crm_count for r in reports}

    compare()


crm_reconcile()
