"""The CRM: its database, migrations, the 3NF transforms and checks, reconciliation with the store."""
