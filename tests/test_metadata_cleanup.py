"""The maintenance DAG keeps Airflow's metadata database flat: runs made, cleaned, rows counted."""

from __future__ import annotations

import sqlite3

from tests.conftest import AIRFLOW_HOME

TABLES = ("dag_run", "task_instance", "xcom", "log")


def rows(dag_id: str) -> dict[str, int]:
    with sqlite3.connect(AIRFLOW_HOME / "airflow.db") as db:
        return {t: db.execute(f"SELECT count(*) FROM {t} WHERE dag_id = ?", (dag_id,)).fetchone()[0] for t in TABLES}


def test_cleanup_deletes_old_runs_of_the_package_and_keeps_recent_ones(dagbag):
    cleanup = dagbag.get_dag("airflow_metadata_cleanup")
    for _ in range(2):
        assert cleanup.test(run_conf={"keep_hours": 24, "dry_run": False}).state == "success"
    grown = rows("airflow_metadata_cleanup")
    assert grown["dag_run"] == 2 and grown["task_instance"] == 2 and grown["xcom"] >= 2
    per_run = grown["xcom"] // 2
    # a dry run deletes nothing
    assert cleanup.test(run_conf={"keep_hours": 0, "dry_run": True}).state == "success"
    assert rows("airflow_metadata_cleanup")["dag_run"] == 3
    rows_before_clean = rows("airflow_metadata_cleanup")
    # keep nothing older than this run: every earlier run goes, with its task instances and XComs
    assert cleanup.test(run_conf={"keep_hours": 0, "dry_run": False}).state == "success"
    left = rows("airflow_metadata_cleanup")
    assert left["dag_run"] == 1 and left["task_instance"] == 1, left
    assert left["xcom"] == per_run, "the XComs of the deleted runs went with them"
    assert left["log"] < rows_before_clean["log"]
