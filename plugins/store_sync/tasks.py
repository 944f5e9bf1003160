"""Task bodies the DAG files call: thin wrappers that find the connections and run one cycle."""

from __future__ import annotations

from store_sync.crm.database import check_reachable
from store_sync.crm.database import crm_dsn as _crm_dsn

# What the Variable store_sync_overrides may change per entity at run time ("*" applies to all).
TUNABLE = ("poll_seconds", "max_quiet_seconds", "per_page", "overlap_seconds", "settle_seconds", "scan_every_minutes")


def overrides(entity: str) -> dict:
    """Per-entity settings from the Airflow Variable ``store_sync_overrides`` (JSON), read at run time."""
    try:
        from airflow.sdk import Variable

        every = Variable.get("store_sync_overrides", default={}, deserialize_json=True) or {}
    except Exception:  # no Variable backend reachable (a bare script): the registry's values apply
        every = {}
    return {k: v for k, v in {**every.get("*", {}), **every.get(entity, {})}.items() if k in TUNABLE}


def crm_dsn() -> str:
    """The CRM's DSN (``crm_database.crm_dsn``: CRM_DATABASE_URL, the connection crm_db, or the demo's own)."""
    return _crm_dsn()


def ready_crm() -> str:
    """The CRM's DSN, reachable and migrated; a person-readable error when it is not."""
    from store_sync.crm.migrations import migrate

    dsn = crm_dsn()
    check_reachable(dsn)
    migrate(dsn)
    return dsn


def land_entity(entity_name: str, run_id: str, mode: str = "live", store_conn_id: str = "store_api") -> dict:
    """Migrate if needed, then land one cycle of one entity; returns the counts (small: safe for XCom)."""
    import dataclasses

    from store_sync.inbound.detect import sync_entity
    from store_sync.inbound.first_load import first_load, needs_first_load
    from store_sync.registry import entity
    from store_sync.store.hooks import StoreApiHook

    spec = entity(entity_name)
    tweaks = {k: v for k, v in overrides(entity_name).items() if k in ("per_page", "overlap_seconds", "settle_seconds",
                                                                     "scan_every_minutes")}
    if tweaks:
        spec = dataclasses.replace(spec, **tweaks)
    dsn = ready_crm()
    hook = StoreApiHook(store_conn_id)
    if mode == "live" and needs_first_load(dsn, spec):
        # The first cycle of a new shop reads its whole history: concurrently, on the first-load budget.
        hook.overrides = hook.first_load_budget()
        result = first_load(dsn, hook.get_client(), run_id, [entity_name], transform=False)
        return {"entity": entity_name, "mode": "first_load", "status": "success", "seconds": result["seconds"],
                **result["entities"].get(entity_name, {"read": 0, "landed": 0, "skipped": 0, "quarantined": 0})}
    return sync_entity(dsn, hook.get_client(), spec, run_id, mode=mode)


def reconcile_entity(entity_name: str, run_id: str, store_conn_id: str = "store_api") -> dict:
    from store_sync.inbound.detect import reconcile_deletes
    from store_sync.registry import entity
    from store_sync.store.hooks import StoreApiHook

    dsn = ready_crm()
    return reconcile_deletes(dsn, StoreApiHook(store_conn_id).get_client(), entity(entity_name), run_id)


def backfill_entity(params: dict, run_id: str, store_conn_id: str = "store_api") -> dict:
    """The backfill DAG's body: validated Params in, counts out."""
    from store_sync.inbound.backfill import run_backfill
    from store_sync.registry import entity
    from store_sync.store.hooks import StoreApiHook

    def moment(value):
        from datetime import UTC, datetime

        if not value:
            return None
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)

    dsn = ready_crm()
    hook = StoreApiHook(store_conn_id)
    hook.overrides = hook.backfill_budget()  # backfills spend a smaller budget than live sync
    return run_backfill(dsn, hook.get_client(), entity(params["entity"]), run_id, since=moment(params.get("since")),
                        until=moment(params.get("until")), ids=params.get("ids") or None,
                        chunk_hours=int(params.get("chunk_hours") or 24))
