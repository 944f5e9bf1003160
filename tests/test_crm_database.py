"""The CRM database: the connection crm_db wherever Airflow keeps it, CRM_DATABASE_URL, or (demo and
tests only, switched on) the embedded PostgreSQL; never a silent fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest

from store_sync.crm import database as crm_database
from store_sync.crm.database import describe, url_from_env
from tests.helpers import free_port


@pytest.fixture
def no_crm_settings(monkeypatch):
    for name in ("CRM_DATABASE_URL", "AIRFLOW_CONN_CRM_DB", crm_database.EMBEDDED_SWITCH):
        monkeypatch.delenv(name, raising=False)
    crm_database._cache.clear()
    yield
    crm_database._cache.clear()


def test_crm_database_accepts_sql_and_jsonb(crm_dsn):
    with psycopg.connect(crm_dsn) as conn:
        major = conn.execute("SHOW server_version_num").fetchone()[0]
        assert int(major) >= 150000
        conn.execute("CREATE TABLE t (doc jsonb)")
        with conn.cursor().copy("COPY t (doc) FROM STDIN") as copy:
            copy.write_row(['{"a": "\u00e1"}'])
        assert conn.execute("SELECT doc->>'a' FROM t").fetchone()[0] == "\u00e1"


def test_dsn_precedence_and_hidden_password(no_crm_settings, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", '{"conn_type": "postgres", "host": "db", "port": 5433, "login": "u", '
                                              '"password": "p@ss", "schema": "crm", "extra": {"sslmode": "require"}}')
    # Through PostgresHook: the libpq extras (sslmode) survive, the password is quoted.
    assert crm_database.crm_dsn() == "postgresql://u:p%40ss@db:5433/crm?sslmode=require"
    monkeypatch.setenv("CRM_DATABASE_URL", "postgresql://x:secret@h/crm")
    assert crm_database.crm_dsn() == "postgresql://x:secret@h/crm"
    assert "secret" not in describe(crm_database.crm_dsn())


def test_tasks_find_crm_db_in_airflows_metadata_database(dagbag, crm_dsn, sandbox, no_crm_settings, monkeypatch):
    """A connection made in the UI or CLI lives in the metadata database; tasks get it from there.

    (A bare process sees only environment variables and external secrets backends: that is Airflow's
    rule, ``ensure_secrets_backend_loaded``.)"""
    monkeypatch.setenv("AIRFLOW_CONN_STORE_API", json.dumps({
        "conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox"}))
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_CONN_CRM_DB"}
    add = subprocess.run([sys.executable, "-m", "airflow", "connections", "add", "crm_db", "--conn-uri",
                          crm_dsn.replace("postgresql://", "postgres://", 1)], capture_output=True, text=True, env=env)
    assert add.returncode == 0, add.stderr[-2000:]
    try:
        dag_id = next(d for d in sorted(dagbag.dag_ids) if d.startswith("store_snapshot_"))
        assert dagbag.get_dag(dag_id).test().state == "success"
    finally:
        subprocess.run([sys.executable, "-m", "airflow", "connections", "delete", "crm_db"], capture_output=True, env=env)
    with psycopg.connect(crm_dsn) as conn:  # the task landed in the database crm_db names, not elsewhere
        assert conn.execute("SELECT count(*) FROM sync.landing_run").fetchone()[0] >= 1


def test_no_crm_anywhere_fails_in_words_instead_of_using_an_embedded_database(no_crm_settings):
    from store_sync.tasks import crm_dsn

    with pytest.raises(RuntimeError) as err:
        crm_dsn()
    assert "crm_db" in str(err.value) and "CRM_DATABASE_URL" in str(err.value)


def test_the_embedded_database_needs_its_switch(crm_admin_dsn, no_crm_settings, monkeypatch):
    if url_from_env():
        pytest.skip("a server given by DSN: nothing embedded here")
    monkeypatch.setenv(crm_database.EMBEDDED_SWITCH, "maybe")
    with pytest.raises(ValueError, match=crm_database.EMBEDDED_SWITCH):
        crm_database.crm_dsn()
    monkeypatch.setenv(crm_database.EMBEDDED_SWITCH, "1")
    assert crm_database.crm_dsn() == crm_database.EmbeddedPostgres().dsn()


def test_an_unreachable_crm_fails_fast_and_in_words(no_crm_settings, monkeypatch):
    from store_sync.tasks import land_entity

    monkeypatch.setenv("CRM_DATABASE_URL", f"postgresql://crm_sync:hunter2secret@127.0.0.1:{free_port()}/crm")
    started = time.monotonic()
    with pytest.raises(Exception) as err:
        land_entity("orders", "test-unreachable-crm")
    assert time.monotonic() - started < 15
    message = str(err.value)
    assert "cannot connect to the CRM database at postgresql://crm_sync:***@127.0.0.1" in message
    assert "hunter2secret" not in message


def test_embedded_server_runs_the_integration_role(crm_admin_dsn):
    if url_from_env():
        return  # a server given by DSN is the user's; nothing embedded to check
    from store_sync.crm.database import EmbeddedPostgres

    with psycopg.connect(EmbeddedPostgres().dsn()) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("crm_sync", "crm")
