"""Task bodies the DAG files call: thin wrappers that find the connections and run one cycle."""

from __future__ import annotations

from store_sync.crm_database import EmbeddedPostgres, configured_dsn


def crm_dsn() -> str:
    return configured_dsn() or EmbeddedPostgres().dsn()


def land_entity(entity_name: str, run_id: str, mode: str = "live", store_conn_id: str = "store_api") -> dict:
    """Migrate if needed, then land one cycle of one entity; returns the counts (small: safe for XCom)."""
    from store_sync.detect import sync_entity
    from store_sync.hooks import StoreApiHook
    from store_sync.migrations import migrate
    from store_sync.registry import entity

    dsn = crm_dsn()
    migrate(dsn)
    return sync_entity(dsn, StoreApiHook(store_conn_id).get_client(), entity(entity_name), run_id, mode=mode)
