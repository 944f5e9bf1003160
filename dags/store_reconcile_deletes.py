"""
### Find records deleted for good in the store

A permanent delete leaves no trace in the store's API (no tombstones; `order.deleted` webhooks fire
on trash only). As often as the registry's `reconcile_every_minutes` says (hourly), this DAG lists the ids the store still has (`_fields=id`, cheap) and lands
a delete event in the inbox for every landed record that is gone.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from store_sync.dag_defaults import BACKFILL_POOL, DEFAULT_ARGS, Tag
from store_sync.registry import entities

WINDOWED = [n for n, e in entities().items() if e.strategy == "modified_window"]
EVERY = timedelta(minutes=min(entities()[n].reconcile_every_minutes for n in WINDOWED))


@dag(dag_id="store_reconcile_deletes", schedule=EVERY, start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.RECONCILE], doc_md=__doc__)
def store_reconcile_deletes():
    @task(pool=BACKFILL_POOL)
    def reconcile(entity_name: str, dag_run=None) -> dict:
        from store_sync.tasks import reconcile_entity

        return reconcile_entity(entity_name, f"{dag_run.run_id}:{entity_name}")

    reconcile.expand(entity_name=WINDOWED)


store_reconcile_deletes()
