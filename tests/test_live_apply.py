"""A small live landing reaches the CRM tables within the landing task itself; a large one is left to
``crm_transform`` (announced through the inbox Asset); newest wins whichever path applies first.
Run through Airflow (``dag.test()``) against the sandbox store and a real PostgreSQL."""

from __future__ import annotations

import json
import threading
import time

import psycopg

from store_sync.dag_defaults import inbox_asset_name


def overrides(monkeypatch, **orders) -> None:
    # stay_while_busy_seconds 0: one cycle per run, unless a test asks for more.
    monkeypatch.setenv("AIRFLOW_VAR_STORE_SYNC_OVERRIDES",
                       json.dumps({"orders": {"stay_while_busy_seconds": 0, **orders}}))


def crm_order(dsn: str, order_id: int) -> tuple | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT status, landed_inbox_id FROM crm.sales_order WHERE id = %s", (order_id,)).fetchone()


def unapplied(dsn: str, entity: str = "orders") -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM inbox.record WHERE entity = %s AND applied_at IS NULL",
                            (entity,)).fetchone()[0]


def inbox_events(entity: str) -> int:
    """Asset events Airflow recorded for the entity's inbox Asset (what schedules crm_transform)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return session.scalar(select(func.count()).select_from(AssetEvent).join(
            AssetModel, AssetModel.id == AssetEvent.asset_id).where(AssetModel.name == inbox_asset_name(entity)))


def first_load(dagbag, dsn: str) -> None:
    assert dagbag.get_dag("store_watch_orders").test().state == "success"
    assert unapplied(dsn) == 0, "the watch task applies its first load itself"
    time.sleep(1.1)  # the first window's upper bound passes: nothing is pending


def change_status(client, status_from: str, status_to: str) -> int:
    order = client.get("orders", {"status": status_from, "per_page": 1})[0]
    client.put(f"orders/{order['id']}", {"status": status_to})
    return order["id"]


def test_a_small_change_reaches_the_crm_within_the_landing_task(dagbag, wired, sandbox_factory, monkeypatch):
    sandbox = sandbox_factory(size="tiny", seed=21)
    dsn = wired(sandbox)
    overrides(monkeypatch)
    first_load(dagbag, dsn)
    events = inbox_events("orders")
    client = sandbox.client()
    order_id = change_status(client, "processing", "completed")
    time.sleep(1.1)  # the change's second is over: the window (which ends at the last whole second) takes it
    assert dagbag.get_dag("store_watch_orders").test().state == "success"  # crm_transform does not run
    assert crm_order(dsn, order_id)[0] == "completed", "the CRM row is there right after the landing task"
    assert unapplied(dsn, "orders") == 0 and unapplied(dsn, "order_notes") == 0
    with psycopg.connect(dsn) as conn:
        notes = conn.execute("SELECT count(*) FROM crm.sales_order_note n JOIN inbox.record r ON "
                             "r.inbox_id = n.landed_inbox_id WHERE n.order_id = %s AND r.run_id LIKE 'manual__%%' "
                             "AND r.received_at > now() - interval '1 minute'", (order_id,)).fetchone()[0]
    assert notes >= 1, "the order's new note, read after the order landed, is in the CRM too"
    assert inbox_events("orders") == events, "nothing left for crm_transform: the inbox Asset is not announced"


def test_while_the_store_keeps_changing_the_task_keeps_landing(dagbag, wired, sandbox_factory, monkeypatch):
    sandbox = sandbox_factory(size="tiny", seed=22)
    dsn = wired(sandbox)
    overrides(monkeypatch, stay_while_busy_seconds=30, busy_quiet_seconds=4)
    first_load(dagbag, dsn)
    client = sandbox.client()
    first = change_status(client, "processing", "completed")
    later: list[int] = []
    threading.Timer(2.5, lambda: later.append(change_status(client, "processing", "on-hold"))).start()
    time.sleep(1.1)
    run = dagbag.get_dag("store_watch_orders").test()
    assert run.state == "success"
    assert later and crm_order(dsn, first)[0] == "completed" and crm_order(dsn, later[0])[0] == "on-hold"
    with psycopg.connect(dsn) as conn:
        cycles = [r[0] for r in conn.execute("SELECT run_id FROM sync.landing_run WHERE entity = 'orders' AND "
                                             "run_id LIKE %s ORDER BY started_at", (f"{run.run_id}%",))]
    assert len(cycles) >= 2 and cycles[1].startswith(f"{run.run_id}~"), "one run, one landing_run row per cycle"


def test_a_large_batch_is_left_to_crm_transform(dagbag, wired, sandbox_factory, monkeypatch):
    sandbox = sandbox_factory(size="tiny", seed=23)
    dsn = wired(sandbox)
    overrides(monkeypatch, live_apply_max_rows=2)
    first_load(dagbag, dsn)
    events = inbox_events("orders")
    client = sandbox.client()
    ids = [change_status(client, "processing", "completed") for _ in range(3)]
    time.sleep(1.1)
    assert dagbag.get_dag("store_watch_orders").test().state == "success"
    assert all(crm_order(dsn, i)[0] == "processing" for i in ids), "more rows than live_apply_max_rows: not applied"
    assert unapplied(dsn) >= 3
    assert inbox_events("orders") == events + 1, "the inbox Asset announces the work to crm_transform"
    assert dagbag.get_dag("crm_transform").test().state == "success"
    assert all(crm_order(dsn, i)[0] == "completed" for i in ids) and unapplied(dsn) == 0


def test_newest_wins_when_both_paths_apply(dagbag, wired, sandbox_factory, monkeypatch):
    sandbox = sandbox_factory(size="tiny", seed=24)
    dsn = wired(sandbox)
    overrides(monkeypatch, live_apply_max_rows=0)
    first_load(dagbag, dsn)
    client = sandbox.client()
    order_id = change_status(client, "processing", "on-hold")
    time.sleep(1.1)
    watch = dagbag.get_dag("store_watch_orders")
    assert watch.test().state == "success"  # the older version waits for crm_transform
    assert crm_order(dsn, order_id)[0] == "processing"
    client.put(f"orders/{order_id}", {"status": "completed"})
    time.sleep(1.1)
    overrides(monkeypatch)
    assert watch.test().state == "success"  # the newer version applies in the landing task
    newer = crm_order(dsn, order_id)
    assert newer[0] == "completed"
    assert dagbag.get_dag("crm_transform").test().state == "success"  # then the older one, late
    assert crm_order(dsn, order_id) == newer, "an older version never applies over a newer one"
    assert unapplied(dsn) == 0, "the older version is settled (applied, dropped as older)"


def test_a_landing_does_not_wait_behind_a_long_transform(dagbag, wired, sandbox_factory, monkeypatch):
    from store_sync.crm.transform import BATCH_LOCK

    sandbox = sandbox_factory(size="tiny", seed=25)
    dsn = wired(sandbox)
    overrides(monkeypatch, live_apply_lock_wait_seconds=0.5)
    first_load(dagbag, dsn)
    events = inbox_events("orders")
    order_id = change_status(sandbox.client(), "processing", "completed")
    time.sleep(1.1)
    with psycopg.connect(dsn) as transform_running:  # a long crm_transform batch holds the lock meanwhile
        transform_running.execute(BATCH_LOCK)
        # Were the landing to queue for the lock, this would never return: the lock is let go after it.
        assert dagbag.get_dag("store_watch_orders").test().state == "success"
        assert crm_order(dsn, order_id)[0] == "processing" and unapplied(dsn) >= 1
        transform_running.rollback()
    assert inbox_events("orders") == events + 1, "the landed rows are announced to crm_transform instead"
    assert dagbag.get_dag("crm_transform").test().state == "success"
    assert crm_order(dsn, order_id)[0] == "completed"


def test_a_landing_killed_after_the_orders_landed_still_reads_their_notes(crm_dsn, sandbox_factory):
    """The orders page lands before its notes are read: a run that dies in between must not lose the notes
    (the rerun sees the orders as already landed, yet reads their notes)."""
    import pytest

    from store_sync.crm.migrations import migrate
    from store_sync.inbound.detect import sync_entity
    from store_sync.registry import entity

    crm = crm_dsn
    migrate(crm)
    sandbox = sandbox_factory(size="tiny", seed=26)
    client, orders = sandbox.client(), entity("orders")
    sync_entity(crm, client, orders, "first-load")
    time.sleep(1.1)
    order_id = change_status(client, "processing", "completed")  # the store adds a note to the order
    time.sleep(1.1)

    def killed() -> None:
        raise RuntimeError("the worker died here")

    with pytest.raises(RuntimeError, match="died"):
        sync_entity(crm, client, orders, "killed", on_landed=killed)
    with psycopg.connect(crm) as conn:
        landed = conn.execute("SELECT count(*) FROM inbox.record WHERE entity = 'orders' AND source_key = %s "
                              "AND run_id = 'killed'", (str(order_id),)).fetchone()[0]
        notes_before = conn.execute("SELECT count(*) FROM inbox.latest WHERE entity = 'order_notes' AND "
                                    "split_part(source_key, ':', 1) = %s", (str(order_id),)).fetchone()[0]
    assert landed == 1 and notes_before == 0, "killed after the order landed, before its notes"
    sync_entity(crm, client, orders, "rerun")
    with psycopg.connect(crm) as conn:
        notes = {r[0] for r in conn.execute("SELECT split_part(source_key, ':', 2) FROM inbox.latest WHERE "
                                            "entity = 'order_notes' AND split_part(source_key, ':', 1) = %s",
                                            (str(order_id),))}
    assert notes == {str(n["id"]) for n in client.get(f"orders/{order_id}/notes")}


def test_the_first_run_applies_its_first_load_and_carries_on_as_live_sync(dagbag, wired, sandbox_factory, monkeypatch):
    """A new shop: the watch DAG's first run lands the history, applies it to the CRM itself (no
    crm_transform run, no inbox Asset), then stays and lands a change made after that, in the same run:
    no hand-over to a new DAG run, which costs Airflow seconds while changes wait."""
    sandbox = sandbox_factory(size="tiny", seed=24)
    dsn = wired(sandbox)
    overrides(monkeypatch, stay_while_busy_seconds=60, busy_quiet_seconds=6)
    client = sandbox.client()
    total = len(sandbox.export("orders"))
    events = inbox_events("orders")
    changed: list[int] = []

    def change_once_loaded() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with psycopg.connect(dsn) as conn:
                loaded = conn.execute("SELECT to_regclass('crm.sales_order') IS NOT NULL").fetchone()[0] and \
                    conn.execute("SELECT count(*) FROM crm.sales_order").fetchone()[0]
            if loaded == total:
                time.sleep(1.5)
                changed.append(change_status(client, "processing", "completed"))
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=change_once_loaded)
    watcher.start()
    run = dagbag.get_dag("store_watch_orders").test()
    watcher.join()
    assert run.state == "success" and changed, "the first load reached the CRM within the first run"
    assert crm_order(dsn, changed[0])[0] == "completed", "the change after the first load, in the same run"
    assert unapplied(dsn, "orders") == 0
    with psycopg.connect(dsn) as conn:
        modes = [r[0] for r in conn.execute("SELECT DISTINCT mode FROM sync.landing_run WHERE entity = 'orders' "
                                            "AND run_id LIKE %s", (f"{run.run_id}%",))]
        took = conn.execute("SELECT l.run_id FROM inbox.record r JOIN sync.landing_run l USING (run_id, entity) "
                            "WHERE r.entity = 'orders' AND r.source_key = %s ORDER BY r.inbox_id DESC LIMIT 1",
                            (str(changed[0]),)).fetchone()[0]
    assert sorted(modes) == ["first_load", "live"] and took.startswith(f"{run.run_id}~")
    assert inbox_events("orders") == events, "nothing left for crm_transform: the inbox Asset is not announced"


def notes_in_inbox(dsn: str, order_ids) -> dict[str, set[str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT split_part(source_key, ':', 1), split_part(source_key, ':', 2) FROM inbox.latest "
                            "WHERE entity = 'order_notes' AND NOT is_delete AND split_part(source_key, ':', 1) = ANY(%s)",
                            ([str(i) for i in order_ids],)).fetchall()
    out: dict[str, set[str]] = {}
    for order_id, note_id in rows:
        out.setdefault(order_id, set()).add(note_id)
    return out


def change_orders(client, count: int, skip: int = 0) -> list[int]:
    """Change the status of ``count`` orders, after the first ``skip`` by id (the store adds a note to each)."""
    changed = []
    for order in client.get("orders", {"per_page": skip + count, "orderby": "id", "order": "asc"})[skip:]:
        client.put(f"orders/{order['id']}", {"status": "on-hold" if order["status"] != "on-hold" else "processing"})
        changed.append(order["id"])
    assert len(changed) == count
    return changed


def test_a_backlog_of_notes_is_read_over_the_next_cycles_and_none_is_lost(crm_dsn, sandbox_factory):
    """Catching up with many changed orders (one note request each) must not hold the next changes back:
    a cycle lands every changed order but reads the notes of at most children_per_cycle of them; the
    others are due (kept in the watermark, so a killed task loses none) and the next cycles read them."""
    import dataclasses

    from store_sync.crm.migrations import migrate
    from store_sync.inbound.detect import sync_entity
    from store_sync.inbound.landing import get_watermark
    from store_sync.registry import entity

    migrate(crm_dsn)
    sandbox = sandbox_factory(size="tiny", seed=27)
    client, orders = sandbox.client(), dataclasses.replace(entity("orders"), children_per_cycle=2)
    sync_entity(crm_dsn, client, orders, "first-load")
    time.sleep(1.1)
    changed = change_orders(client, 5)
    time.sleep(1.1)
    truth = {str(i): {str(n["id"]) for n in client.get(f"orders/{i}/notes")} for i in changed}
    assert all(truth.values()), "every changed order has a note"

    counts = sync_entity(crm_dsn, client, orders, "cycle-1")
    with psycopg.connect(crm_dsn) as conn:
        landed = {r[0] for r in conn.execute("SELECT source_key FROM inbox.record WHERE run_id = 'cycle-1' AND "
                                             "entity = 'orders'")}
        due = set(get_watermark(conn, "orders")[1].get("children_due") or ())
    assert landed == set(truth), "every changed order lands in the cycle, whatever its notes wait for"
    assert len(notes_in_inbox(crm_dsn, changed)) == 2 and counts["children_due"] == 3 and len(due) == 3
    assert due.isdisjoint(notes_in_inbox(crm_dsn, changed)), "due: exactly the orders whose notes were not read"

    # A new change meanwhile: its order lands at once; a cap's half goes to the parents due before.
    [newer] = change_orders(client, 1, skip=5)
    time.sleep(1.1)
    truth[str(newer)] = {str(n["id"]) for n in client.get(f"orders/{newer}/notes")}
    counts = sync_entity(crm_dsn, client, orders, "cycle-2")
    assert counts["landed"] >= 1 + 2, "the new order and the notes of two orders"
    cycles = 2
    while counts["children_due"]:
        cycles += 1
        assert cycles < 10, "the backlog drains"
        counts = sync_entity(crm_dsn, client, orders, f"cycle-{cycles}")
    assert notes_in_inbox(crm_dsn, truth) == truth, "every changed order's notes, none lost"
    with psycopg.connect(crm_dsn) as conn:
        assert not get_watermark(conn, "orders")[1].get("children_due")


def test_the_watch_task_stays_until_the_notes_it_left_are_read(dagbag, wired, sandbox_factory, monkeypatch):
    """Through Airflow: one watch run lands the changed orders, then keeps cycling while their notes are
    due, and its trigger says so when a run ended with notes still due."""
    sandbox = sandbox_factory(size="tiny", seed=28)
    dsn = wired(sandbox)
    overrides(monkeypatch, stay_while_busy_seconds=60, busy_quiet_seconds=1, children_per_cycle=2)
    first_load(dagbag, dsn)
    client = sandbox.client()
    changed = change_orders(client, 5)
    time.sleep(1.1)
    truth = {str(i): {str(n["id"]) for n in client.get(f"orders/{i}/notes")} for i in changed}
    assert dagbag.get_dag("store_watch_orders").test().state == "success"
    assert notes_in_inbox(dsn, changed) == truth
    assert unapplied(dsn, "order_notes") == 0, "and applied to the CRM in the same task"
    with psycopg.connect(dsn) as conn:
        cycles = conn.execute("SELECT count(*) FROM sync.landing_run WHERE entity = 'orders' AND mode = 'live' "
                              "AND landed > 0").fetchone()[0]
    assert cycles >= 3, "five orders' notes at two per cycle"

    from store_sync.registry import entity
    from store_sync.triggers import StoreChangeTrigger

    trigger = StoreChangeTrigger(entity="orders", cursor="2026-01-01T00:00:00", state={"children_due": 3})
    assert "children of 3" in trigger.check(None, entity("orders"), 0), "fires without asking the store"
