"""What every DAG of the package shares: owner, retries, tags (from one place), pools."""

from __future__ import annotations

from datetime import timedelta

DEFAULT_ARGS = {
    "owner": "crm-integration",
    "retries": 3,
    "retry_delay": timedelta(seconds=5),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=5),
}

# Store calls go through these Airflow pools; backfills get fewer slots than live sync.
LIVE_POOL = "store_api"
BACKFILL_POOL = "store_api_backfill"
TRANSFORM_POOL = "crm_transform"
FETCH_POOL = "store_api_fetch"
MAINTENANCE_POOL = "airflow_maintenance"
# Live sync: one slot per watch DAG (a busy one keeps landing for minutes, see stay_while_busy_seconds)
# plus the code-list snapshots; what they ask of the store is bounded by the request budget, not slots.
# The backfill pool's slots are how many backfill chunks run at once (on any worker).
POOLS = {LIVE_POOL: (8, "store API calls of live sync"), BACKFILL_POOL: (2, "store API calls of backfills"),
         TRANSFORM_POOL: (1, "CRM transforms (one writer at a time)"),
         FETCH_POOL: (1, "store API calls of fetch on demand (sync.fetch_request)"),
         MAINTENANCE_POOL: (1, "Airflow metadata cleanup (airflow db clean)")}
# Below every other task (Airflow's default weight is 1) when executor slots are short.
FETCH_PRIORITY = 0


class Tag:
    SYNC = "store-sync"
    INBOX = "inbox"
    LIVE = "live"
    BACKFILL = "backfill"
    RECONCILE = "reconcile"
    LOOKUPS = "lookups"
    CRM = "crm"
    OUTBOX = "outbox"
    WEBHOOKS = "webhooks"
    ON_DEMAND = "on-demand"
    MAINTENANCE = "maintenance"


def inbox_asset_name(entity: str) -> str:
    return f"crm_inbox_{entity}"


def inbox_alias_name(entity: str) -> str:
    """The watch task's outlet: it adds the inbox Asset only when rows are left for crm_transform."""
    return f"crm_inbox_{entity}_pending"
