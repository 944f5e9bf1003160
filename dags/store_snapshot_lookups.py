"""
### Snapshot the store's code lists into the CRM inbox

Lookups (order and subscription statuses, payment gateways, countries and their states, tax classes)
and the product category tree carry no change dates: each run reads the whole list, lands what
changed and lands a delete event for what disappeared. One DAG per list, on the period the entity
registry gives it (`poll_seconds`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, dag, task

from store_sync.dag_defaults import DEFAULT_ARGS, LIVE_POOL, Tag, inbox_asset_name
from store_sync.registry import entities


def build(name: str, every: timedelta):
    @dag(dag_id=f"store_snapshot_{name}", schedule=every, start_date=datetime(2026, 1, 1), catchup=False,
         max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.INBOX, Tag.LOOKUPS], doc_md=__doc__)
    def snapshot():
        @task(pool=LIVE_POOL, outlets=[Asset(inbox_asset_name(name))])
        def land(dag_run=None) -> dict:
            from store_sync.tasks import land_entity

            return land_entity(name, dag_run.run_id)

        land()

    return snapshot()


for _name, _spec in entities().items():
    if _spec.strategy == "snapshot":
        globals()[f"store_snapshot_{_name}"] = build(_name, timedelta(seconds=_spec.poll_seconds))
