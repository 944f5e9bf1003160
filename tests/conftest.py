"""Fixtures over real parts: PostgreSQL (embedded or by DSN) and the sandbox store over HTTP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
import urllib3

from tests.helpers import SandboxProcess

urllib3.disable_warnings()

# Airflow reads its configuration once, at first import: point it at a private home before any test
# (or anything a test imports) touches it.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="airflow-home-"))
os.environ.update({
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": str(Path(__file__).resolve().parents[1] / "dags"),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(Path(__file__).resolve().parents[1] / "plugins"),
    # Airflow processes the tests start (CLI, task runners) import the package as a deployment would.
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "plugins"),
                                   str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
})


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database, migrated once per session, with the package's pools."""
    from store_sync.dag_defaults import POOLS

    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ)
    for pool, (slots, description) in POOLS.items():
        subprocess.run([sys.executable, "-m", "airflow", "pools", "set", pool, str(slots), description], check=True,
                       capture_output=True, env=os.environ)
    return AIRFLOW_HOME


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def crm_admin_dsn():
    """An admin DSN: CRM_DATABASE_URL when given, else the project's embedded PostgreSQL.

    Never a deployment's crm_db connection: the tests create and drop databases on this server."""
    from store_sync.crm.database import EmbeddedPostgres, url_from_env, wait_for

    if dsn := url_from_env():
        wait_for(dsn)
        yield dsn
        return
    pg = EmbeddedPostgres()
    was_running = pg.is_running()
    pg.start()
    yield pg.admin_dsn()
    if not was_running:
        pg.stop()


@pytest.fixture
def crm_dsn(crm_admin_dsn):
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"crm_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(crm_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = crm_admin_dsn.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(crm_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sandbox_factory(tmp_path_factory):
    started: list[SandboxProcess] = []

    def start(**kwargs) -> SandboxProcess:
        sb = SandboxProcess(tmp_path_factory.mktemp("sandbox"), **kwargs)
        started.append(sb)
        return sb

    yield start
    for sb in started:
        sb.stop()


@pytest.fixture(scope="session")
def sandbox(sandbox_factory):
    """A tiny store over plain HTTP (OAuth 1.0a), shared by read-only tests."""
    return sandbox_factory(size="tiny", seed=1)


@pytest.fixture
def writable_sandbox(sandbox_factory):
    """A store of its own for tests that write."""
    return sandbox_factory(size="tiny", seed=2)


def pytest_report_header(config):
    from store_sync.crm.database import describe, url_from_env

    dsn = url_from_env()
    return f"CRM database: {describe(dsn) if dsn else 'embedded PostgreSQL (.data/crm-pg)'}; " \
           f"Python {os.sys.version.split()[0]}"


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags"))


@pytest.fixture
def wired(crm_dsn, monkeypatch):
    """Point the package's two connections at a sandbox and a fresh CRM database."""

    def wire(sandbox, **extra):
        import json

        monkeypatch.setenv("CRM_DATABASE_URL", crm_dsn)
        monkeypatch.setenv("AIRFLOW_CONN_STORE_API", json.dumps({
            "conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox", "extra": extra}))
        return crm_dsn

    return wire
