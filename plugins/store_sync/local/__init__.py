"""The local stack: Airflow on this machine and `make demo` (the embedded PostgreSQL is crm.database)."""
