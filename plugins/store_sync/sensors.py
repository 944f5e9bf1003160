"""``StoreChangeSensor``: waits for store changes in the triggerer, holding no worker slot."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseSensorOperator, Variable

from store_sync.triggers import StoreChangeTrigger


def overrides(entity: str) -> dict:
    """Per-entity poll settings from the Airflow Variable ``store_sync_overrides`` (JSON), read at run time."""
    try:
        every = Variable.get("store_sync_overrides", default={}, deserialize_json=True) or {}
    except Exception:  # no Variable backend reachable (e.g. a bare test): registry defaults apply
        every = {}
    return {**every.get("*", {}), **every.get(entity, {})}


class StoreChangeSensor(BaseSensorOperator):
    """Succeeds when the store has something for ``entity`` that the CRM inbox lacks.

    Deferrable by default: the waiting happens in ``StoreChangeTrigger`` on the triggerer.
    Poll interval and the safety-cycle period come from the entity registry, overridable with the
    Variable ``store_sync_overrides`` (``{"orders": {"poll_seconds": 2}}``).
    """

    template_fields = ("entity",)
    ui_color = "#d6eaf8"

    def __init__(self, *, entity: str, store_conn_id: str = "store_api", deferrable: bool = True, **kwargs: Any):
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 5)
        super().__init__(**kwargs)
        self.entity, self.store_conn_id, self.deferrable = entity, store_conn_id, deferrable

    def _trigger(self) -> StoreChangeTrigger:
        import psycopg

        from store_sync.landing import get_watermark
        from store_sync.migrations import migrate
        from store_sync.registry import entity as registry_entity
        from store_sync.tasks import crm_dsn

        spec = registry_entity(self.entity)
        dsn = crm_dsn()
        migrate(dsn)
        with psycopg.connect(dsn) as conn:
            cursor, state = get_watermark(conn, self.entity)
        extra = overrides(self.entity)
        return StoreChangeTrigger(
            entity=self.entity, cursor=cursor.strftime("%Y-%m-%dT%H:%M:%S") if cursor else None,
            store_conn_id=self.store_conn_id, poll_seconds=float(extra.get("poll_seconds", spec.poll_seconds)),
            max_quiet_seconds=float(extra.get("max_quiet_seconds", spec.max_quiet_seconds)),
            state={k: state.get(k) for k in ("max_id", "orders_inbox_id", "last_scan")})

    def execute(self, context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        self.defer(trigger=self._trigger(), method_name="execute_complete")

    def execute_complete(self, context, event: dict | None = None) -> dict:
        if not event or event.get("status") == "error":
            raise RuntimeError(f"{self.entity}: {event.get('message') if event else 'no event from the trigger'}")
        self.log.info("%s: %s", self.entity, event.get("reason"))
        return {"entity": self.entity, "reason": event.get("reason")}

    def poke(self, context) -> bool:
        from store_sync.hooks import StoreApiHook
        from store_sync.registry import entity as registry_entity

        trigger = self._trigger()
        return trigger.check(StoreApiHook(self.store_conn_id).get_client(), registry_entity(self.entity), 0) is not None
