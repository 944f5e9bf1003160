"""Quiet costs little: the customers' rolling scan and the triggers' adaptive polling, over real parts."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import timedelta

import psycopg
import pytest

from store_sync.crm.migrations import migrate
from store_sync.inbound.detect import fmt, now_utc, scan_due, sync_entity
from store_sync.inbound.landing import get_watermark, parse_gmt
from store_sync.registry import entity
from store_sync.store.client import RequestBudget
from tests.helpers import latest


@pytest.fixture
def crm(crm_dsn):
    migrate(crm_dsn)
    return crm_dsn


def small_slices(**changes):
    # 30 customers, 5 a page, 2 pages a cycle: a pass takes several cycles
    return dataclasses.replace(entity("customers"), per_page=5, scan_pages_per_cycle=2, scan_every_minutes=0, **changes)


def scan_state(dsn: str) -> dict:
    with psycopg.connect(dsn) as conn:
        return get_watermark(conn, "customers")[1]


def test_rolling_scan_finds_every_change_and_delete_a_slice_at_a_time(crm, writable_sandbox):
    client = writable_sandbox.client()
    customers = small_slices()
    sync_entity(crm, client, customers, "first", mode="backfill")  # the whole store, as a first load reads it
    ids = sorted(int(k) for k in latest(crm, "customers"))
    assert len(ids) >= 25
    low, high, gone = ids[1], ids[-2], ids[len(ids) // 2]
    # changes no webhook and no order tells us about, at both ends of the id range, and a delete
    client.post("customers/batch", {"update": [{"id": low, "first_name": "Rolling"}, {"id": high, "last_name": "Scan"}]})
    client.request("DELETE", f"customers/{gone}", {"force": "true"})
    slices = []
    for cycle in range(12):
        before = client.stats.requests
        sync_entity(crm, client, customers, f"live-{cycle}")
        slices.append(client.stats.requests - before)
        landed = latest(crm, "customers")
        if (landed[str(low)][0].get("first_name") == "Rolling" and landed[str(high)][0].get("last_name") == "Scan"
                and landed[str(gone)][1]):
            break
    else:
        pytest.fail(f"a whole pass of rolling slices never found the changes and the delete; requests {slices}")
    assert cycle >= 2, "the scan read the whole store in one cycle: it is not rolling"
    # each cycle: the newest-id check, at most 2 scan pages (+1 on a step back) and the records it found
    assert max(slices) <= 1 + 3 + 2 + 2, f"requests per cycle {slices}"
    # nothing deleted on a listing's word only: the other customers are all still live
    assert sum(1 for _, (_, deleted) in latest(crm, "customers").items() if deleted) == 1


def test_the_scan_is_paced_at_a_tenth_of_the_live_budget(crm, writable_sandbox):
    client = writable_sandbox.client()
    client.budget = RequestBudget(5, 2)  # the connection's default live budget
    customers = small_slices()
    sync_entity(crm, client, customers, "first", mode="backfill")
    # the whole first pass was just paid for: no slice is due yet; make it due as time would
    assert not scan_due(scan_state(crm), customers, now_utc())
    with psycopg.connect(crm) as conn:
        conn.execute("UPDATE sync.watermark SET state = state || '{\"scan_next_at\": \"2020-01-01T00:00:00\"}' "
                     "WHERE entity='customers'")
    started = now_utc()
    before = client.stats.requests
    sync_entity(crm, client, customers, "slice")
    state = scan_state(crm)
    scan_requests = client.stats.requests - before - 1  # the newest-id check is not the scan's
    # the next slice waits until the requests spent are paid for at 10 % of 5 requests/s
    assert scan_requests >= 2
    assert parse_gmt(state["scan_next_at"]) >= started + timedelta(seconds=scan_requests / 0.5)
    assert not scan_due(state, customers, started + timedelta(seconds=1))
    assert scan_due(state, customers, started + timedelta(seconds=scan_requests / 0.5 + 60))


def test_trigger_polls_fast_while_busy_and_slowly_after_quiet():
    from store_sync.triggers import StoreChangeTrigger

    now = time.time()
    busy = StoreChangeTrigger("orders", None, poll_seconds=1, quiet_after_seconds=300, quiet_poll_seconds=20,
                              state={"last_change_at": now - 60})
    quiet = StoreChangeTrigger("orders", None, poll_seconds=1, quiet_after_seconds=300, quiet_poll_seconds=20,
                               state={"last_change_at": now - 301})
    assert (busy.interval(now), quiet.interval(now)) == (1, 20)
    quiet.state["woken_at"] = now  # a webhook or another entity's change
    assert quiet.interval(now) == 1
    off = StoreChangeTrigger("orders", None, poll_seconds=1, quiet_after_seconds=300, quiet_poll_seconds=1,
                             state={"last_change_at": now - 10_000})
    assert off.interval(now) == 1
    # the pace survives serialisation: the trigger is re-created from these kwargs
    path, kwargs = quiet.serialize()
    assert StoreChangeTrigger(**kwargs).interval(now) == 1 and kwargs["quiet_poll_seconds"] == 20


def test_last_change_survives_deferrals_through_the_watermark(wired, sandbox):
    from store_sync.operators import LandStoreChangesOperator
    from store_sync.tasks import land_entity
    from store_sync.triggers import note_change

    dsn = wired(sandbox, requests_per_second=100, max_in_flight=4)
    counts = land_entity("orders", "first-load")
    assert counts["landed"] > 0
    trigger = LandStoreChangesOperator(task_id="t", entity="orders")._trigger()
    assert trigger.state.get("last_change_at") is None and trigger.interval() == trigger.quiet_poll_seconds
    note_change("orders", "first-load")
    trigger = LandStoreChangesOperator(task_id="t", entity="orders")._trigger()
    assert trigger.state["last_change_at"] > time.time() - 60
    assert trigger.interval() == trigger.poll_seconds, "a change just landed: poll fast"
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE sync.watermark SET state = state || jsonb_build_object('last_change_at', %s::float8) "
                     "WHERE entity='orders'", (time.time() - 3600,))
    trigger = LandStoreChangesOperator(task_id="t", entity="orders")._trigger()
    assert trigger.interval() == trigger.quiet_poll_seconds == entity("orders").quiet_poll_seconds


def test_a_webhook_wakes_a_slow_trigger_at_once(wired, sandbox):
    from store_sync.tasks import land_entity
    from store_sync.triggers import StoreChangeTrigger

    dsn = wired(sandbox, requests_per_second=100, max_in_flight=4)
    land_entity("customers", "first-load")
    state = scan_state(dsn)
    # quiet for an hour: the next poll would be an hour away, and no scan slice is due
    trigger = StoreChangeTrigger("customers", None, poll_seconds=1, quiet_after_seconds=60, quiet_poll_seconds=3600,
                                 max_quiet_seconds=7200,
                                 state={**state, "last_change_at": time.time() - 3600,
                                        "scan_next_at": fmt(now_utc() + timedelta(hours=2))})

    async def scenario():
        events = trigger.run()
        waiting = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(4)
        assert not waiting.done(), "the quiet trigger fired with nothing to report"
        with psycopg.connect(dsn) as conn:
            conn.execute("INSERT INTO sync.webhook_event (entity, source_key, topic, delivery_id) "
                         "VALUES ('customers', '1', 'customer.updated', 'd1')")
        event = await asyncio.wait_for(waiting, 60)
        await events.aclose()
        return event

    event = asyncio.run(scenario())
    assert event.payload["reason"] == "the store sent customer webhooks"
