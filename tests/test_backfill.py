"""A backfill cut into slices that run side by side (as the DAG's mapped tasks on several workers do):
nothing lost or doubled between chunks, every done chunk remembered, a rerun reads nothing again."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from store_sync.crm.migrations import migrate
from store_sync.inbound.backfill import MAX_SLICES, plan_backfill, run_slice
from store_sync.registry import entity
from tests.helpers import assert_inbox_matches_truth


def test_slices_side_by_side_land_every_order_once_and_remember_every_chunk(crm_dsn, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=31)
    migrate(crm_dsn)
    orders = entity("orders")
    oldest = min(o["date_modified_gmt"] for o in sandbox.export("orders"))
    since = datetime.fromisoformat(oldest).replace(tzinfo=UTC)
    plan = plan_backfill(orders, since=since, chunk_hours=24)
    assert len(plan) >= 20 and all(len(p["windows"]) == 1 for p in plan)
    # Neighbouring chunks meet exactly: no gap for a record to fall through.
    bounds = [w for p in plan for w in p["windows"]]
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))

    errors: list[BaseException] = []

    def worker(parts):
        try:
            client = sandbox.client()
            for part in parts:
                run_slice(crm_dsn, client, orders, "bf-1", part)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(plan[n::3],)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert_inbox_matches_truth(crm_dsn, sandbox, "orders")  # none lost, none doubled
    with psycopg.connect(crm_dsn) as conn:
        state = conn.execute("SELECT state FROM sync.watermark WHERE entity='orders@backfill'").fetchone()[0]
        live = conn.execute("SELECT count(*) FROM sync.watermark WHERE entity='orders'").fetchone()[0]
    assert len(state["done:bf-1"]) == len(plan), "a chunk finished beside another lost its done mark"
    assert live == 0, "a backfill does not create or move the live watermark"
    # Cleared and rerun: every chunk is known done, nothing is read again.
    again = [run_slice(crm_dsn, sandbox.client(), orders, "bf-1", p) for p in plan]
    assert sum(r["skipped_chunks"] for r in again) == len(plan) and sum(r["read"] for r in again) == 0


def test_a_long_window_shares_tasks_but_keeps_its_chunks():
    since = datetime(2020, 1, 1, tzinfo=UTC)
    plan = plan_backfill(entity("orders"), since=since, until=since + timedelta(days=1000), chunk_hours=24)
    assert len(plan) <= MAX_SLICES
    assert sum(len(p["windows"]) for p in plan) == 1000


def test_a_plan_refuses_what_cannot_be_read():
    with pytest.raises(ValueError, match="needs 'since'"):
        plan_backfill(entity("orders"))
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="must be after"):
        plan_backfill(entity("orders"), since=now, until=now - timedelta(hours=1))
    assert plan_backfill(entity("orders"), ids=[5, 7]) == [{"entity": "orders", "label": "2 ids", "ids": [5, 7]}]
