"""
### Keep Airflow's metadata database flat under the continuous DAGs

Hourly: deletes the DAG runs (with their task instances and XComs), asset events, log and job rows
of this package's DAGs older than **keep_hours** (24), with `airflow db clean` (batches of 5,000,
no archive tables, the last scheduled run of each DAG kept). Every `@continuous` cycle leaves such
rows; without this the metadata database grows by every cycle of every entity.

Tick **all_dags** to clean every DAG of this Airflow (an admin's choice), **dry_run** to see what
would go. The task runs `airflow db clean` with the worker's own Airflow settings; where workers do not
have the metadata database's settings, schedule the command shown in `store_sync/maintenance.py` on
the scheduler's host instead and pause this DAG.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from store_sync.dag_defaults import DEFAULT_ARGS, MAINTENANCE_POOL, Tag


@dag(dag_id="airflow_metadata_cleanup", schedule=timedelta(hours=1), start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.MAINTENANCE], doc_md=__doc__,
     params={
         "keep_hours": Param(24, type="number", minimum=0, title="Keep the last hours of history"),
         "all_dags": Param(False, type="boolean", title="Clean every DAG, not only this package's"),
         "dry_run": Param(False, type="boolean", title="Only report what would be deleted"),
     })
def airflow_metadata_cleanup():
    @task(pool=MAINTENANCE_POOL)
    def clean(params=None, dag_run=None) -> dict:
        from store_sync.maintenance import clean_metadata

        return clean_metadata(float(params["keep_hours"]), run_started=dag_run.start_date,
                              all_dags=bool(params["all_dags"]), dry_run=bool(params["dry_run"]))

    clean()


airflow_metadata_cleanup()
