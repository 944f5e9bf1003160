"""Against a store that sorts, pages and deletes as a real one does: nothing lost, nothing invented.

Each test here failed on the code before these paths were fixed (same-second bursts read by page
number, deletes taken from absent ids, reverts skipped as "already landed", children never deleted).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from sandbox.storage import Store
from store_sync.crm.migrations import migrate
from store_sync.crm.reconcile import reconcile_entity
from store_sync.crm.transform import transform
from store_sync.inbound.detect import ListingRefused, id_scan, reconcile_deletes, sync_entity
from store_sync.inbound.landing import RunRecord, land_page
from store_sync.registry import entity
from tests.helpers import assert_inbox_matches_truth, inbox_duplicates, latest


@pytest.fixture
def crm(crm_dsn):
    migrate(crm_dsn)
    return crm_dsn


def quick(name: str, **changes):
    """A registry entity with test-sized settings (a 1 s overlap keeps the windows short)."""
    spec = entity(name)
    return type(spec)(**{**spec.__dict__, "overlap_seconds": 1, **changes})


def bulk_edit(sandbox, post_type: str, limit: int | None = None) -> tuple[list[int], datetime]:
    """An admin's bulk action or a CSV import: many records saved within one second, as the store
    itself writes them (post_modified and post_modified_gmt of each post)."""
    store = Store(sandbox.db)
    ids = [r[0] for r in store.db.execute("SELECT id FROM posts WHERE post_type=? AND post_status <> 'trash' "
                                           "ORDER BY id" + (f" LIMIT {int(limit)}" if limit else ""), (post_type,))]
    moment = store.now_gmt()
    with store.write_lock:
        store.db.execute("BEGIN IMMEDIATE")
        for pid in ids:
            store.touch_post(pid, moment)
        store.db.execute("COMMIT")
    store.db.close()
    return ids, moment


def wait_past(moment: datetime) -> None:
    """Until ``moment``'s second is behind the last whole second (a cycle's frozen upper bound)."""
    while datetime.now(UTC).replace(tzinfo=None) < moment + timedelta(seconds=2):
        time.sleep(0.1)


def test_modified_ties_come_back_in_a_different_order_on_every_request(sandbox_factory):
    """WordPress adds an id tie-break for orderby=date only (WC_REST_CRUD_Controller::prepare_objects_query)."""
    sandbox = sandbox_factory(size="tiny", seed=11)
    ids, moment = bulk_edit(sandbox, "shop_order")
    client = sandbox.client()
    params = {"orderby": "modified", "order": "asc", "dates_are_gmt": "true", "per_page": 10, "_fields": "id",
              "modified_after": (moment - timedelta(seconds=1)).isoformat(),
              "modified_before": (moment + timedelta(seconds=1)).isoformat()}
    orders = {tuple(r["id"] for r in client.get("orders", params)) for _ in range(6)}
    assert len(orders) > 1, "ties in `modified` must not come back in one stable order"
    by_date = {tuple(r["id"] for r in client.get("orders", {**params, "orderby": "date"})) for _ in range(4)}
    assert len(by_date) == 1, "orderby=date has the store's id tie-break"
    stable = sandbox_factory(size="tiny", seed=11, extra=["--stable-sort"])
    ids, moment = bulk_edit(stable, "shop_order")
    params.update(modified_after=(moment - timedelta(seconds=1)).isoformat(),
                  modified_before=(moment + timedelta(seconds=1)).isoformat())
    kind = {tuple(r["id"] for r in stable.client().get("orders", params)) for _ in range(4)}
    assert len(kind) == 1, "--stable-sort is the kinder, opt-in mode"


def test_thousands_of_records_sharing_one_second_all_land(crm, sandbox_factory):
    # Records are edited while the cycle reads (shift), pages come back empty or without paging headers.
    sandbox = sandbox_factory(size="small", seed=12, extra=["--faults", "shift=0.2,empty=0.05,nopaging=0.1"])
    orders = quick("orders", children=())
    client = sandbox.client(max_retries=10)
    sync_entity(crm, client, orders, "first")
    ids, moment = bulk_edit(sandbox, "shop_order", limit=3000)
    wait_past(moment)
    sync_entity(crm, client, orders, "burst")
    # Stop the edits and the faults; whatever moved on during the burst cycle is read by the next one.
    sandbox.stop()
    still = sandbox_factory(size="small", seed=12, fresh=False, db=sandbox.db, port=sandbox.port)
    time.sleep(1.1)
    sync_entity(crm, still.client(), orders, "after")
    with psycopg.connect(crm) as conn:
        landed_at_burst = conn.execute(
            "SELECT count(DISTINCT source_key) FROM inbox.record WHERE entity='orders' AND source_modified_at = %s",
            (moment.replace(tzinfo=UTC),)).fetchone()[0]
    # The burst's records are all in the inbox in that second's version (unless the shift fault moved
    # one on, and then its newer version landed: assert_inbox_matches_truth checks every record).
    assert landed_at_burst >= 2900
    assert_inbox_matches_truth(crm, still, "orders")


def test_a_revert_lands_again(crm):
    """A -> B -> A: a payment gateway disabled then re-enabled must reach the CRM enabled."""
    gateways = entity("payment_gateways")
    on = {"id": "bacs", "title": "Bank transfer", "method_title": "BACS", "enabled": True}
    off = {**on, "enabled": False}
    for n, version in enumerate([on, off, on, on]):
        with psycopg.connect(crm) as conn, conn.transaction():
            land_page(conn, gateways, [version], f"run-{n}")
        transform(crm, ["payment_gateways"])
    with psycopg.connect(crm) as conn:
        assert conn.execute("SELECT count(*) FROM inbox.record WHERE entity='payment_gateways'").fetchone()[0] == 3
        assert conn.execute("SELECT enabled FROM crm.payment_method WHERE code='bacs'").fetchone()[0] is True
        assert inbox_duplicates(conn) == 0


def test_listings_that_break_invent_no_deletes_and_true_deletes_land(crm, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=13, extra=["--faults", "empty=0.3,nopaging=0.5"])
    client = sandbox.client(max_retries=10)
    for name in ("orders", "customers", "product_categories"):
        spec = quick(name, children=())
        while True:  # a first load under these faults may be refused; it is simply run again
            try:
                sync_entity(crm, client, spec, f"first-{name}-{time.monotonic()}")
                break
            except Exception as exc:  # noqa: BLE001 - the store's transient inconsistencies
                print("retrying first load:", exc)
    for attempt in range(6):
        for name in ("orders", "customers"):
            try:
                reconcile_deletes(crm, client, quick(name, children=()), f"reconcile-{name}-{attempt}")
            except ListingRefused:
                pass
        run = RunRecord(crm, f"scan-{attempt}", "customers", "live")
        id_scan(crm, client, entity("customers"), run, full=True)
        sync_entity(crm, client, quick("product_categories"), f"snap-{attempt}")
    with psycopg.connect(crm) as conn:
        invented = conn.execute("SELECT entity, source_key FROM inbox.record WHERE payload ? 'deleted'").fetchall()
    assert invented == [], f"deletes the store never made: {invented}"
    victim = next(r[0]["id"] for r in iter(lambda: client.get("orders", {"status": "completed", "per_page": 1}), None)
                  if r)  # the empty fault hits this test's own reads too
    client.request("DELETE", f"orders/{victim}", {"force": "true"})
    for attempt in range(6):
        try:
            reconcile_deletes(crm, client, quick("orders", children=()), f"real-{attempt}")
        except ListingRefused:
            continue
    with psycopg.connect(crm) as conn:
        deleted = conn.execute("SELECT entity, source_key FROM inbox.record WHERE payload ? 'deleted'").fetchall()
    assert deleted == [("orders", str(victim))]


def test_a_false_delete_shows_in_reconcile_and_heals(crm, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=14)
    client = sandbox.client()
    orders = quick("orders", children=())
    sync_entity(crm, client, orders, "first")
    transform(crm, ["orders"])
    live = client.get("orders", {"status": "processing", "per_page": 1})[0]["id"]
    # An earlier version of the package (or a broken listing) landed a delete the store never made.
    with psycopg.connect(crm) as conn, conn.transaction():
        land_page(conn, orders, [{"id": live, "deleted": True}], "false-delete", deletes=True)
    transform(crm, ["orders"])
    report = reconcile_entity(crm, client, entity("orders"))
    assert report.deleted_in_crm == [str(live)] and not report.ok
    reconcile_deletes(crm, client, orders, "heal")
    transform(crm, ["orders"])
    assert reconcile_entity(crm, client, entity("orders")).ok
    assert latest(crm, "orders")[str(live)][1] is False


def test_deletes_obey_newest_wins(crm):
    orders = entity("orders")
    money = dict.fromkeys(("discount_total", "discount_tax", "shipping_total", "shipping_tax", "cart_tax", "total_tax"),
                          "0.00")
    v1 = {"id": 7, "number": "7", "status": "processing", "currency": "EUR", "prices_include_tax": False, **money,
          "total": "10.00", "date_created_gmt": "2026-01-01T09:00:00", "date_modified_gmt": "2026-01-01T10:00:00",
          "customer_id": 0, "billing": {}, "shipping": {}, "line_items": [], "meta_data": []}
    v2 = {**v1, "status": "completed", "date_modified_gmt": "2026-01-01T10:05:00"}

    def land(*records, deletes=False):
        with psycopg.connect(crm) as conn, conn.transaction():
            land_page(conn, orders, list(records), "t", deletes=deletes)

    def state():
        with psycopg.connect(crm) as conn:
            return conn.execute("SELECT status, deleted_at IS NOT NULL FROM crm.sales_order WHERE id=7").fetchone()

    # In one batch: a version read after the delete wins over it...
    land(v1)
    land({"id": 7, "deleted": True}, deletes=True)
    land(v2)
    transform(crm, ["orders"])
    assert state() == ("completed", False)
    # ... and a delete received after the version the CRM holds wins, across batches.
    land({"id": 7, "deleted": True}, deletes=True)
    transform(crm, ["orders"])
    assert state() == ("completed", True)


def test_deleted_variations_and_notes_are_deleted_in_the_crm(crm, sandbox_factory):
    sandbox = sandbox_factory(size="tiny", seed=15)
    client = sandbox.client()
    products, orders = quick("products"), quick("orders")
    sync_entity(crm, client, products, "first-products")
    sync_entity(crm, client, orders, "first-orders")
    # A live cycle reads the notes of an order that changes.
    order = client.get("orders", {"status": "processing", "per_page": 1})[0]["id"]
    note = client.post(f"orders/{order}/notes", {"note": "call the customer"})["id"]
    client.put(f"orders/{order}", {"customer_note": "ring twice"})  # a note alone does not bump its order
    time.sleep(1.1)
    sync_entity(crm, client, orders, "with-note")
    transform(crm)
    with psycopg.connect(crm) as conn:
        assert conn.execute("SELECT deleted_at FROM crm.sales_order_note WHERE id=%s", (note,)).fetchone() == (None,)
    # The note is deleted at the store, then the order changes: the note must not stay live.
    client.request("DELETE", f"orders/{order}/notes/{note}", {"force": "true"})
    client.put(f"orders/{order}", {"customer_note": "leave at the door"})
    time.sleep(1.1)
    sync_entity(crm, client, orders, "note-gone")
    # A variation deleted at the store (its product untouched): the hourly reconciliation finds it.
    variable = client.get("products", {"type": "variable", "per_page": 1})[0]
    vid = variable["variations"][0]
    store = Store(sandbox.db)
    with store.write_lock:
        store.db.execute("DELETE FROM posts WHERE id=?", (vid,))
        store.db.execute("DELETE FROM postmeta WHERE post_id=?", (vid,))
    store.db.close()
    reconcile_deletes(crm, client, products, "reconcile")
    transform(crm)
    with psycopg.connect(crm) as conn:
        assert conn.execute("SELECT deleted_at IS NOT NULL FROM crm.sales_order_note WHERE id=%s",
                            (note,)).fetchone() == (True,)
        assert conn.execute("SELECT deleted_at IS NOT NULL FROM crm.product WHERE id=%s", (vid,)).fetchone() == (True,)
        live_variations = conn.execute("SELECT count(*) FROM crm.product WHERE parent_id=%s AND deleted_at IS NULL",
                                       (variable["id"],)).fetchone()[0]
    assert live_variations == len(variable["variations"]) - 1


def test_pages_holding_things_that_are_no_records_stall_nothing(crm, sandbox_factory):
    """A plugin's response filter can leave `false`, `null` or an object without id in a list page:
    each is quarantined with its reason while the records beside it land, for every strategy."""
    sandbox = sandbox_factory(size="tiny", seed=16, extra=["--faults", "junk=0.5"])
    client = sandbox.client()
    for name in ("orders", "products", "customers", "product_categories", "subscriptions"):
        assert sync_entity(crm, client, quick(name), f"junk-{name}")["status"] == "success", name
    reconcile_deletes(crm, client, quick("orders", children=()), "junk-reconcile")
    run = RunRecord(crm, "junk-scan", "customers", "live")
    id_scan(crm, client, entity("customers"), run, full=True)
    with psycopg.connect(crm) as conn:
        quarantined = conn.execute("SELECT count(*) FROM sync.quarantine").fetchone()[0]
        invented = conn.execute("SELECT count(*) FROM inbox.record WHERE payload ? 'deleted'").fetchone()[0]
    assert quarantined > 0 and invented == 0
    # Without the fault, a catch-up lands every record.
    sandbox.stop()
    still = sandbox_factory(size="tiny", seed=16, fresh=False, db=sandbox.db, port=sandbox.port)
    time.sleep(1.1)
    for name in ("orders", "subscriptions"):
        spec = quick(name, children=())
        spec = type(spec)(**{**spec.__dict__, "overlap_seconds": 3600 * 24 * 400})
        sync_entity(crm, still.client(), spec, f"catch-up-{name}")
        assert_inbox_matches_truth(crm, still, name)


def test_the_hour_a_clock_goes_back_loses_no_record(crm, sandbox_factory, monkeypatch):
    """``orderby=modified`` sorts on the local ``post_modified`` (WP_Query::parse_orderby) while
    ``dates_are_gmt`` filters compare ``post_modified_gmt``. In the hour a site's clock goes back
    (Europe/Madrid, 2026-10-25 at 01:00 UTC: 03:00 CEST becomes 02:00 CET) each local 02:xx is shown
    twice, so the two orders differ, and a keyset on GMT skipped records: 4 of a medium store's 125,777
    orders in one first load. A page that ends in such an hour is read on by id."""
    import dataclasses

    from store_sync.inbound import detect

    sandbox = sandbox_factory(size="tiny", seed=12)
    store = Store(sandbox.db)
    assert str(store.tz) == "Europe/Madrid"
    ids = [r[0] for r in store.db.execute("SELECT id FROM posts WHERE post_type = 'shop_order' AND "
                                          "post_status <> 'trash' ORDER BY id LIMIT 60")]
    fold = datetime(2026, 10, 25, 0, 0, 0)  # GMT: 02:00 CEST, an hour before the clock goes back
    with store.write_lock:
        store.db.execute("BEGIN IMMEDIATE")
        for i, pid in enumerate(ids):
            store.touch_post(pid, fold + timedelta(seconds=117 * i))  # over both showings of 02:xx
        store.db.execute("COMMIT")
    store.db.close()
    orders, client = dataclasses.replace(entity("orders"), per_page=10), sandbox.client()
    window = {"mode": "backfill", "since": (fold - timedelta(seconds=10)).replace(tzinfo=UTC),
              "until": (fold + timedelta(hours=3)).replace(tzinfo=UTC)}

    def landed() -> set[int]:
        return {int(k) for k in latest(crm, "orders")} & set(ids)

    with monkeypatch.context() as blind:  # keyset on GMT alone, as before: the store's quirk is real
        blind.setattr(detect, "fold_floor", lambda *args: None)
        sync_entity(crm, client, orders, "blind", **window)
    assert len(landed()) < len(ids), "without reading the fall-back hour by id some orders are skipped"
    sync_entity(crm, client, orders, "folded", **window)
    assert landed() == set(ids), "every order of the hour the clock goes back"
    assert client.site_timezone() is not None and str(client.site_timezone()) == "Europe/Madrid"
