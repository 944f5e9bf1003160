"""The store side: its REST client, the Airflow hook that owns its connection, connection settings, webhook registration."""
