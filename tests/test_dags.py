"""The DAG folder: imports cleanly, follows the house rules, and a DAG runs through Airflow itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    os.environ.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                       "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                       "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db"})
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ)
    return home


@pytest.fixture(scope="module")
def dagbag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    from store_sync.registry import entities

    assert {f"store_land_{n}" for n in entities()} <= set(dagbag.dag_ids)


def test_dags_follow_house_rules(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and "store-sync" in dag.tags, dag_id
        assert dag.doc_md, dag_id
        assert dag.max_active_runs == 1, dag_id
        for t in dag.tasks:
            assert t.retries >= 2, f"{dag_id}.{t.task_id}"
            assert t.pool == "store_api", f"{dag_id}.{t.task_id}: store calls go through the store_api pool"


def test_land_dag_runs_through_airflow(dagbag, crm_dsn, sandbox_factory, monkeypatch):
    import psycopg

    sandbox = sandbox_factory(size="tiny", seed=9)
    monkeypatch.setenv("CRM_DATABASE_URL", crm_dsn)
    monkeypatch.setenv("AIRFLOW_CONN_STORE_API", f'{{"conn_type": "http", "host": "{sandbox.url}", '
                                                 '"login": "ck_sandbox", "password": "cs_sandbox"}')
    subprocess.run([sys.executable, "-m", "airflow", "pools", "set", "store_api", "4", "store API"], check=True,
                   capture_output=True, env=os.environ)
    dag = dagbag.get_dag("store_land_orders")
    run = dag.test()
    assert run.state == "success"
    with psycopg.connect(crm_dsn) as conn:
        landed = conn.execute("SELECT count(DISTINCT source_key) FROM inbox.record WHERE entity='orders'").fetchone()[0]
        runs = conn.execute("SELECT status, landed FROM sync.landing_run WHERE entity='orders'").fetchall()
    assert landed == len(sandbox.export("orders"))
    assert runs == [("success", landed)]
