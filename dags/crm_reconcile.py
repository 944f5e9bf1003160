"""
### Reconcile the CRM with the store

Daily, and on demand: compares the CRM with the store entity by entity (counts, ids, modified
times, and a checksum of the mapped fields in the entity registry's `reconcile` blocks) and fails,
listing the differences, when the CRM is not right. The same check runs from a shell with
`make reconcile`.
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
        from store_sync.crm.reconcile import reconcile, render
        from store_sync.store.hooks import StoreApiHook
        from store_sync.tasks import crm_dsn

        reports = reconcile(crm_dsn(), StoreApiHook().get_client())
        text = render(reports)
        if not all(r.ok for r in reports):
            raise ValueError(f"the CRM differs from the store:\n{text}")
        print(text)
        return {r.entity: r.crm_count for r in reports}

    compare()


crm_reconcile()
