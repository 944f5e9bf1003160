"""
### Land store changes into the CRM inboxes

One DAG per entity of the registry (`include/schemas/entities.yaml`). Each run reads the entity's
changes since its watermark from the store (connection `store_api`) and lands them untouched in
`inbox.record` of the CRM (connection `crm_db`, or the embedded database), moving the watermark in
the same transaction. Runs are cheap when nothing changed; `sync.landing_run` shows what each did.

*Triage*: a failed run leaves the watermark where it was; rerunning it resumes and never doubles a record.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, dag, task

from store_sync.registry import entities

DEFAULT_ARGS = {"owner": "crm-integration", "retries": 3, "retry_delay": timedelta(seconds=10),
                "retry_exponential_backoff": 2.0, "max_retry_delay": timedelta(minutes=5)}
TAGS = ["store-sync", "inbox"]


def build(name: str):
    @dag(dag_id=f"store_land_{name}", schedule=timedelta(minutes=1), start_date=datetime(2026, 1, 1), catchup=False,
         max_active_runs=1, default_args=DEFAULT_ARGS, tags=TAGS, doc_md=__doc__)
    def land_dag():
        @task(pool="store_api", outlets=[Asset(f"crm_inbox_{name}")])
        def land(dag_run=None) -> dict:
            from store_sync.tasks import land_entity

            return land_entity(name, dag_run.run_id)

        land()

    return land_dag()


for _name in entities():
    globals()[f"store_land_{_name}"] = build(_name)
