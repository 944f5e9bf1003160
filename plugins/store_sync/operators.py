"""``LandStoreChangesOperator``: wait for store changes without a worker slot, then land them.

One operator per watch DAG run:

1. on a worker, one cheap question to the store ("anything newer than the watermark?"); if the
   answer is yes, land at once: under a steady stream of changes this saves the round trip through
   the triggerer;
2. otherwise defer to ``StoreChangeTrigger``: the waiting happens in the triggerer and holds no
   worker or pool slot;
3. when the trigger fires, resume on a worker and land.

Waiting and landing sit in one task because each task hop costs Airflow 0.3-1 s
(``shared/reference/airflow3-latency.md``) and freshness is the point of these DAGs. For the same
reason a small live landing applies its CRM transform itself (``store_sync.crm.live_apply``), a first
load (the first cycle of a new shop) applies its own (``tasks.apply_first_load``) and carries on, and
while the store keeps changing the task keeps landing (``stay_while_busy_seconds``) instead of
paying for a new DAG run per change; the inbox Asset is announced only when rows are left for the
``crm_transform`` DAG (a large batch, or a transform that held the lock too long).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from store_sync.tasks import overrides
from store_sync.triggers import StoreChangeTrigger


class LandStoreChangesOperator(BaseOperator):
    """Land the changes of ``entity`` (a registry name) as soon as the store has any.

    Poll interval and safety-cycle period come from the entity registry, overridable with the
    Variable ``store_sync_overrides`` (``{"orders": {"poll_seconds": 2}}``).
    """

    template_fields = ("entity",)
    ui_color = "#d6eaf8"

    def __init__(self, *, entity: str, store_conn_id: str = "store_api", deferrable: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.entity, self.store_conn_id, self.deferrable = entity, store_conn_id, deferrable

    def _trigger(self, migrate_first: bool = True, extra: dict | None = None) -> StoreChangeTrigger:
        import psycopg

        from store_sync.crm.migrations import migrate
        from store_sync.inbound.landing import get_watermark
        from store_sync.registry import entity as registry_entity
        from store_sync.tasks import crm_dsn

        spec = registry_entity(self.entity)
        dsn = crm_dsn()
        if migrate_first:
            migrate(dsn)
        with psycopg.connect(dsn) as conn:
            cursor, state = get_watermark(conn, self.entity)
        extra = overrides(self.entity) if extra is None else extra
        return StoreChangeTrigger(
            entity=self.entity, cursor=cursor.strftime("%Y-%m-%dT%H:%M:%S") if cursor else None,
            store_conn_id=self.store_conn_id, poll_seconds=float(extra.get("poll_seconds", spec.poll_seconds)),
            max_quiet_seconds=float(extra.get("max_quiet_seconds", spec.max_quiet_seconds)),
            quiet_after_seconds=float(extra.get("quiet_after_seconds", spec.quiet_after_seconds)),
            quiet_poll_seconds=float(extra.get("quiet_poll_seconds", spec.quiet_poll_seconds)),
            state={**{k: state.get(k) for k in ("max_id", "orders_inbox_id", "webhook_event_id", "last_scan",
                                                "scan_next_at", "last_change_at")},
                   "children_due": len(state.get("children_due") or ()),
                   "scan_every_minutes": float(extra.get("scan_every_minutes", spec.scan_every_minutes))})

    def execute(self, context) -> Any:
        from store_sync.registry import entity as registry_entity
        from store_sync.store.hooks import StoreApiHook

        trigger = self._trigger()
        reason = trigger.check(StoreApiHook(self.store_conn_id).get_client(), registry_entity(self.entity), 0)
        if reason or not self.deferrable:
            return self._land(context, reason or "scheduled cycle")
        self.defer(trigger=trigger, method_name="execute_complete")

    def execute_complete(self, context, event: dict | None = None) -> dict:
        if not event or event.get("status") == "error":
            raise RuntimeError(f"{self.entity}: {event.get('message') if event else 'no event from the trigger'}")
        return self._land(context, event.get("reason", ""))

    def _land(self, context, reason: str) -> dict:
        import time

        from airflow.sdk import Asset, AssetAlias

        from store_sync.dag_defaults import inbox_alias_name, inbox_asset_name
        from store_sync.tasks import land_and_apply, overrides, ready_crm, setting

        # Read once per task: every cycle of this run uses them (a change applies from the next run on).
        extra, run_id = overrides(self.entity), context["dag_run"].run_id
        stay = setting(self.entity, "stay_while_busy_seconds", extra)
        started, cycle, landed, dsn = time.monotonic(), 1, 0, ready_crm()
        while True:
            self.log.info("%s: %s; landing", self.entity, reason)
            cycle_started = time.time()
            # Each cycle its own sync.landing_run row: "<run id>~2" is the run's second cycle.
            counts = land_and_apply(self.entity, run_id if cycle == 1 else f"{run_id}~{cycle}", self.store_conn_id,
                                    dsn=dsn, tweaks=extra)
            landed += counts["landed"]
            self.log.info("%s: %s", self.entity, counts)
            if counts.get("mode") == "first_load" and counts["work_left"]:
                # A new shop's history: applied here, and the task goes on as live sync (no new DAG run)
                from store_sync.tasks import apply_first_load

                counts = {**counts, **apply_first_load(self.entity, dsn, extra)}
                self.log.info("%s: first load applied to the CRM: %s", self.entity, counts)
                started = time.monotonic()  # live sync's stay starts now
            if counts["landed"]:
                from store_sync.triggers import note_change

                note_change(self.entity, run_id)  # every waiting trigger polls fast again
            if counts["work_left"] or time.monotonic() - started >= stay:
                break
            if counts["landed"] or counts.get("children_due"):
                # changes are flowing (or notes wait for the next cycles): the next cycle is the check
                reason = "still busy: the last cycle landed changes" if counts["landed"] else \
                    f"still busy: the children of {counts['children_due']} changed records to read"
                self._next_second(cycle_started)
            else:
                reason = self._busy(started + stay, cycle_started, extra)
                if not reason:
                    break
            cycle += 1
        if counts["work_left"]:  # rows wait for crm_transform: announce the inbox Asset (through the alias)
            context["outlet_events"][AssetAlias(inbox_alias_name(self.entity))].add(Asset(inbox_asset_name(self.entity)))
        return {**counts, "cycles": cycle, "landed_in_all_cycles": landed}

    def _busy(self, until: float, last_cycle_started: float, extra: dict) -> str | None:
        """While the store is busy: a change within ``busy_quiet_seconds`` (checked every ``poll_seconds``)
        is landed by this task at once; None once the store was quiet that long (or ``until`` passed)."""
        import time

        from store_sync.registry import entity as registry_entity
        from store_sync.store.hooks import StoreApiHook
        from store_sync.tasks import setting

        quiet_until = min(until, time.monotonic() + setting(self.entity, "busy_quiet_seconds", extra))
        poll, spec = setting(self.entity, "poll_seconds", extra), registry_entity(self.entity)
        client = StoreApiHook(self.store_conn_id).get_client()
        polls = 0
        while time.monotonic() < quiet_until:
            reason = self._trigger(migrate_first=False, extra=extra).check(client, spec, polls)
            if reason:
                self._next_second(last_cycle_started)
                return f"still busy: {reason}"
            polls += 1
            time.sleep(poll)
        return None

    @staticmethod
    def _next_second(last_cycle_started: float) -> None:
        """A window ends at the last whole second: a cycle started in the same second as the last one would
        find nothing new, so the next starts in a later second."""
        import time

        time.sleep(max(0.0, int(last_cycle_started) + 1 - time.time()))


class WriteBackOperator(BaseOperator):
    """Send the outbox's due requests to the store; when none is due, wait deferred (no worker slot)."""

    template_fields = ("request_ids", "dry_run")
    ui_color = "#fdebd0"

    def __init__(self, *, store_conn_id: str = "store_api", deferrable: bool = True, request_ids=None,
                 dry_run=False, **kwargs: Any):
        super().__init__(**kwargs)
        self.store_conn_id, self.deferrable = store_conn_id, deferrable
        self.request_ids, self.dry_run = request_ids, dry_run

    def execute(self, context) -> Any:
        from store_sync.crm.migrations import migrate
        from store_sync.outbound.writeback import pending
        from store_sync.tasks import crm_dsn
        from store_sync.triggers import OutboxTrigger

        dsn = crm_dsn()
        migrate(dsn)
        if self.request_ids or self.dry_run or not self.deferrable or pending(dsn):
            return self._send(dsn)
        self.defer(trigger=OutboxTrigger(), method_name="execute_complete")

    def execute_complete(self, context, event: dict | None = None) -> dict:
        from store_sync.tasks import crm_dsn

        self.log.info("%s", (event or {}).get("reason", "woken"))
        return self._send(crm_dsn())

    def _send(self, dsn: str) -> dict:
        from store_sync.outbound.writeback import send
        from store_sync.store.hooks import StoreApiHook

        ids = [int(i) for i in (self.request_ids or [])] or None
        counts = send(dsn, StoreApiHook(self.store_conn_id).get_client(), dry_run=bool(self.dry_run), request_ids=ids)
        for item in counts.get("would_send", []):
            self.log.info("dry run: request %(request_id)s %(entity)s %(record_id)s %(action)s %(change)s -> "
                          "%(decision)s %(reason)s", item)
        self.log.info("write-back: %s", {k: v for k, v in counts.items() if k != "would_send"})
        return {k: v for k, v in counts.items() if k != "would_send"}
