"""Task bodies the DAG files call: thin wrappers that find the connections and run one cycle."""

from __future__ import annotations

from store_sync.crm.database import check_reachable
from store_sync.crm.database import crm_dsn as _crm_dsn

# What the Variable store_sync_overrides may change per entity at run time ("*" applies to all).
TUNABLE = ("poll_seconds", "max_quiet_seconds", "per_page", "overlap_seconds", "settle_seconds", "scan_every_minutes",
           "quiet_after_seconds", "quiet_poll_seconds", "scan_share", "scan_pages_per_cycle",
           "live_apply_max_rows", "live_apply_lock_wait_seconds", "stay_while_busy_seconds", "busy_quiet_seconds",
           "first_load_wait_seconds", "children_per_cycle")


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


def land_entity(entity_name: str, run_id: str, mode: str = "live", store_conn_id: str = "store_api",
                on_landed=None, tweaks: dict | None = None, dsn: str | None = None) -> dict:
    """Migrate if needed, then land one cycle of one entity; returns the counts (small: safe for XCom)."""
    import dataclasses

    from store_sync.inbound.detect import sync_entity
    from store_sync.inbound.first_load import first_load, needs_first_load
    from store_sync.registry import entity
    from store_sync.store.hooks import StoreApiHook

    spec = entity(entity_name)
    tweaks = {k: v for k, v in (overrides(entity_name) if tweaks is None else tweaks).items()
              if k in ("per_page", "overlap_seconds", "settle_seconds", "scan_every_minutes", "scan_share",
                       "scan_pages_per_cycle", "children_per_cycle")}
    if tweaks:
        spec = dataclasses.replace(spec, **tweaks)
    dsn = dsn or ready_crm()
    hook = StoreApiHook(store_conn_id)
    if mode == "live" and needs_first_load(dsn, spec):
        # The first cycle of a new shop reads its whole history: concurrently, on the first-load budget.
        hook.overrides = hook.first_load_budget()
        result = first_load(dsn, hook.get_client(), run_id, [entity_name], transform=False)
        return {"entity": entity_name, "mode": "first_load", "status": "success", "seconds": result["seconds"],
                **result["entities"].get(entity_name, {"read": 0, "landed": 0, "skipped": 0, "quarantined": 0})}
    return sync_entity(dsn, hook.get_client(), spec, run_id, mode=mode, on_landed=on_landed)


def setting(entity_name: str, name: str, tweaks: dict | None = None) -> float:
    """A number from the registry, as the Variable ``store_sync_overrides`` may change it at run time
    (``tweaks``: those overrides, when the caller read them already)."""
    from store_sync.registry import entity

    return float((overrides(entity_name) if tweaks is None else tweaks).get(name, getattr(entity(entity_name), name)))


def land_and_apply(entity_name: str, run_id: str, store_conn_id: str = "store_api", dsn: str | None = None,
                   tweaks: dict | None = None) -> dict:
    """One live cycle, and the CRM transform of what it landed when that is at most ``live_apply_max_rows``
    rows (``store_sync.crm.live_apply``); ``work_left`` says whether ``crm_transform`` has work.
    ``dsn``: the CRM, already checked and migrated by an earlier cycle of the same task; ``tweaks``: the
    overrides that task read (in a task each read is a call to the api-server)."""
    import psycopg

    from store_sync.crm import live_apply
    from store_sync.inbound.landing import get_watermark
    from store_sync.registry import entity

    names = entity(entity_name).with_children()
    tweaks = overrides(entity_name) if tweaks is None else tweaks
    max_rows = int(setting(entity_name, "live_apply_max_rows", tweaks))
    wait = setting(entity_name, "live_apply_lock_wait_seconds", tweaks)
    dsn = dsn or ready_crm()
    with psycopg.connect(dsn) as conn:
        live = get_watermark(conn, entity_name)[0] is not None  # a first load is applied whole, after it
    after = live_apply.inbox_position(dsn)
    applied = {"applied": 0, "quarantined": 0, "stopped": None if live and max_rows > 0 else "a first load, or live_apply_max_rows is 0"}
    seen: set[int] = set()

    def apply_landed() -> None:
        if applied["stopped"]:
            return
        rows = live_apply.landed_rows(dsn, run_id, names, after)
        seen.update(rows)
        if len(seen) > max_rows:
            applied["stopped"] = f"more than {max_rows} rows (live_apply_max_rows)"
            return
        done = live_apply.apply_rows(dsn, rows, wait)
        applied.update(applied=applied["applied"] + done["applied"], stopped=done["stopped"],
                       quarantined=applied["quarantined"] + done["quarantined"])

    counts = land_entity(entity_name, run_id, store_conn_id=store_conn_id, on_landed=apply_landed, tweaks=tweaks,
                         dsn=dsn)
    apply_landed()  # children, customers, what the last page brought
    return {**counts, "crm_applied": applied["applied"], "crm_quarantined": applied["quarantined"],
            "crm_left_because": applied["stopped"], "work_left": live_apply.work_left(dsn, names)}


# Entities (of those given) being first-loaded now, or with first-loaded rows that wait for a transform.
FIRST_LOAD_UNDER_WAY = """
SELECT e FROM unnest(%s::text[]) e
WHERE EXISTS (SELECT 1 FROM sync.landing_run l WHERE l.entity = e AND l.mode = 'first_load' AND l.status = 'running')
   OR EXISTS (SELECT 1 FROM inbox.record r JOIN sync.landing_run l ON l.run_id = r.run_id AND l.entity = r.entity
              WHERE r.entity = e AND r.applied_at IS NULL AND l.mode = 'first_load'
                AND NOT EXISTS (SELECT 1 FROM sync.transform_quarantine q
                                WHERE q.inbox_id = r.inbox_id AND q.resolved_at IS NULL))"""


def apply_first_load(entity_name: str, dsn: str, tweaks: dict | None = None) -> dict:
    """After a watch task's first load of ``entity_name``: apply what it landed to the CRM in this task, so
    the task carries on as live sync instead of ending for ``crm_transform`` (a new DAG run costs Airflow
    2-10 s on 2 cores, and every change made meanwhile waits for it).

    As in a first load of every entity (``first_load.Loader``), the entities an earlier transform step
    reads come first: while one of them is being first-loaded, or has first-loaded rows not yet applied,
    it waits (a customer before its orders, so no order queues a fetch for a customer about to land), at
    most ``first_load_wait_seconds``; then it applies its own rows whatever the others do (what an order
    lacks is fetched on demand, as in live sync). An entity whose first load has not started (its DAG
    paused, a test running one DAG) is not waited for."""
    import time

    import psycopg

    from store_sync.crm import live_apply
    from store_sync.crm.transform import steps, transform
    from store_sync.registry import entity

    names = entity(entity_name).with_children()
    own = min(file for file, step_names in steps() if set(step_names) & set(names))
    before = [n for file, step_names in steps() if file < own for n in step_names]
    deadline = time.monotonic() + setting(entity_name, "first_load_wait_seconds", tweaks)
    while True:
        with psycopg.connect(dsn) as conn:
            waiting = [r[0] for r in conn.execute(FIRST_LOAD_UNDER_WAY, (before,))]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(1)
    started = time.monotonic()
    steps_run = transform(dsn, names=names)
    return {"crm_applied": sum(s["inbox_rows"] for s in steps_run),
            "crm_quarantined": sum(s["quarantined"] for s in steps_run),
            "first_load_applied_in": round(time.monotonic() - started, 2),
            "first_load_did_not_wait_for": sorted(waiting), "work_left": live_apply.work_left(dsn, names)}


def reconcile_entity(entity_name: str, run_id: str, store_conn_id: str = "store_api") -> dict:
    import psycopg

    from store_sync.inbound.detect import reconcile_deletes
    from store_sync.inbound.landing import get_watermark
    from store_sync.registry import entity
    from store_sync.store.hooks import StoreApiHook

    dsn = ready_crm()
    with psycopg.connect(dsn) as conn:
        if get_watermark(conn, entity_name)[0] is None:
            # Its first load has not finished: nothing landed to compare yet, and listing every id beside
            # the first load's own listing would only take requests from it and from live sync.
            return {"entity": entity_name, "mode": "reconcile", "status": "skipped",
                    "reason": "its first load has not finished"}
    hook = StoreApiHook(store_conn_id)
    hook.overrides = hook.lane_budget("reconcile")  # its own lane: live cycles never wait behind a listing
    return reconcile_deletes(dsn, hook.get_client(), entity(entity_name), run_id)


def compare_crm(store_conn_id: str = "store_api") -> tuple[list, list[str]]:
    """The CRM compared with the store (``crm.reconcile``), on the reconcile lane of the store's budget, for
    the entities whose first load has finished: (the reports, the entities left for a later run). Run at
    once after an install, it would list every record a first load has not landed yet as missing, and
    take the requests live sync needs."""
    import psycopg

    from store_sync.crm.reconcile import reconcile
    from store_sync.inbound.landing import get_watermark
    from store_sync.registry import entities
    from store_sync.store.hooks import StoreApiHook

    dsn = ready_crm()
    compared = [n for n, e in entities().items() if e.reconcile]
    with psycopg.connect(dsn) as conn:
        waiting = [n for n in compared if get_watermark(conn, n)[0] is None]
    names = [n for n in compared if n not in waiting]
    if not names:
        return [], waiting
    hook = StoreApiHook(store_conn_id)
    hook.overrides = hook.lane_budget("reconcile")
    return reconcile(dsn, hook.get_client(), names), waiting


def _moment(value):
    from datetime import UTC, datetime

    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def _backfill_client(store_conn_id: str):
    from store_sync.store.hooks import StoreApiHook

    hook = StoreApiHook(store_conn_id)
    hook.overrides = hook.backfill_budget()  # backfills spend a smaller budget than live sync
    return hook.get_client()


def plan_backfill(params: dict, store_conn_id: str = "store_api") -> list[dict]:
    """The backfill DAG's first task: validated Params in, the slices its mapped task runs out; logs how
    many records the window holds (one count per status filter)."""
    import logging
    from datetime import datetime

    from store_sync.inbound.backfill import expected_records
    from store_sync.inbound.backfill import plan_backfill as plan
    from store_sync.registry import entity

    spec = entity(params["entity"])
    slices = plan(spec, since=_moment(params.get("since")), until=_moment(params.get("until")),
                  ids=params.get("ids") or None, chunk_hours=int(params.get("chunk_hours") or 24))
    if slices[0].get("windows"):
        ready_crm()  # the store's shared request budget lives in the CRM database
        since, until = (datetime.fromisoformat(slices[0]["windows"][0][0]),
                        datetime.fromisoformat(slices[-1]["windows"][-1][1]))
        chunks = sum(len(s["windows"]) for s in slices)
        logging.getLogger(__name__).info(
            "backfill %s: %d chunks in %d tasks, about %d records", spec.name, chunks, len(slices),
            expected_records(_backfill_client(store_conn_id), spec, since, until))
    return slices


def backfill_slice(part: dict, run_id: str, store_conn_id: str = "store_api") -> dict:
    """One mapped task of the backfill DAG: one slice of the plan, counts out."""
    from store_sync.inbound.backfill import run_slice
    from store_sync.registry import entity

    dsn = ready_crm()
    return run_slice(dsn, _backfill_client(store_conn_id), entity(part["entity"]), run_id, part)


def backfill_entity(params: dict, run_id: str, store_conn_id: str = "store_api") -> dict:
    """A whole backfill in one process (scripts); the DAG maps ``backfill_slice`` over ``plan_backfill``."""
    from store_sync.inbound.backfill import run_backfill
    from store_sync.registry import entity

    dsn = ready_crm()
    return run_backfill(dsn, _backfill_client(store_conn_id), entity(params["entity"]), run_id,
                        since=_moment(params.get("since")), until=_moment(params.get("until")),
                        ids=params.get("ids") or None, chunk_hours=int(params.get("chunk_hours") or 24))
