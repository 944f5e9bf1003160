"""Task bodies the DAG files call: thin wrappers that find the connections and run one cycle."""

from __future__ import annotations

from store_sync.crm_database import EmbeddedPostgres, configured_dsn

# What the Variable store_sync_overrides may change per entity at run time ("*" applies to all).
TUNABLE = ("poll_seconds", "max_quiet_seconds", "per_page", "overlap_seconds", "settle_seconds")


def overrides(entity: str) -> dict:
    """Per-entity settings from the Airflow Variable ``store_sync_overrides`` (JSON), read at run time."""
    try:
        from airflow.sdk import Variable

        every = Variable.get("store_sync_overrides", default={}, deserialize_json=True) or {}
    except Exception:  # no Variable backend reachable (a bare script): the registry's values apply
        every = {}
    return {k: v for k, v in {**every.get("*", {}), **every.get(entity, {})}.items() if k in TUNABLE}


def crm_dsn() -> str:
    return configured_dsn() or EmbeddedPostgres().dsn()


def land_entity(entity_name: str, run_id: str, mode: str = "live", store_conn_id: str = "store_api") -> dict:
    """Migrate if needed, then land one cycle of one entity; returns the counts (small: safe for XCom)."""
    import dataclasses

    from store_sync.detect import sync_entity
    from store_sync.hooks import StoreApiHook
    from store_sync.migrations import migrate
    from store_sync.registry import entity

    spec = entity(entity_name)
    tweaks = {k: v for k, v in overrides(entity_name).items() if k in ("per_page", "overlap_seconds", "settle_seconds")}
    if tweaks:
        spec = dataclasses.replace(spec, **tweaks)
    dsn = crm_dsn()
    migrate(dsn)
    return sync_entity(dsn, StoreApiHook(store_conn_id).get_client(), spec, run_id, mode=mode)


def reconcile_entity(entity_name: str, run_id: str, store_conn_id: str = "store_api") -> dict:
    from store_sync.detect import reconcile_deletes
    from store_sync.hooks import StoreApiHook
    from store_sync.migrations import migrate
    from store_sync.registry import entity

    dsn = crm_dsn()
    migrate(dsn)
    return reconcile_deletes(dsn, StoreApiHook(store_conn_id).get_client(), entity(entity_name), run_id)


def backfill_entity(params: dict, run_id: str, store_conn_id: str = "store_api") -> dict:
    """The backfill DAG's body: validated Params in, counts out."""
    from store_sync.backfill import run_backfill
    from store_sync.hooks import StoreApiHook
    from store_sync.migrations import migrate
    from store_sync.registry import entity

    def moment(value):
        from datetime import UTC, datetime

        if not value:
            return None
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)

    dsn = crm_dsn()
    migrate(dsn)
    hook = StoreApiHook(store_conn_id)
    extra = hook.get_connection(store_conn_id).extra_dejson
    # Backfills spend a smaller budget than live sync: the shoppers come first.
    hook.overrides = {"requests_per_second": float(extra.get("backfill_requests_per_second", 2)),
                      "max_in_flight": int(extra.get("backfill_max_in_flight", 1))}
    return run_backfill(dsn, hook.get_client(), entity(params["entity"]), run_id, since=moment(params.get("since")),
                        until=moment(params.get("until")), ids=params.get("ids") or None,
                        chunk_hours=int(params.get("chunk_hours") or 24))
