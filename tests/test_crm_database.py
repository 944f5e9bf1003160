"""The CRM database: embedded by default, or the server given by DSN."""

from __future__ import annotations

import psycopg

from store_sync.crm_database import configured_dsn, describe


def test_crm_database_accepts_sql_and_jsonb(crm_dsn):
    with psycopg.connect(crm_dsn) as conn:
        major = conn.execute("SHOW server_version_num").fetchone()[0]
        assert int(major) >= 150000
        conn.execute("CREATE TABLE t (doc jsonb)")
        with conn.cursor().copy("COPY t (doc) FROM STDIN") as copy:
            copy.write_row(['{"a": "\u00e1"}'])
        assert conn.execute("SELECT doc->>'a' FROM t").fetchone()[0] == "\u00e1"


def test_dsn_precedence_and_hidden_password(monkeypatch):
    monkeypatch.delenv("CRM_DATABASE_URL", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", '{"conn_type": "postgres", "host": "db", "port": 5433, "login": "u", '
                                              '"password": "p@ss", "schema": "crm"}')
    assert configured_dsn() == "postgresql://u:p%40ss@db:5433/crm"
    monkeypatch.setenv("CRM_DATABASE_URL", "postgresql://x:secret@h/crm")
    assert configured_dsn() == "postgresql://x:secret@h/crm"
    assert "secret" not in describe(configured_dsn())


def test_embedded_server_runs_the_integration_role(crm_admin_dsn):
    if configured_dsn():
        return  # a server given by DSN is the user's; nothing embedded to check
    from store_sync.crm_database import EmbeddedPostgres

    with psycopg.connect(EmbeddedPostgres().dsn()) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("crm_sync", "crm")
