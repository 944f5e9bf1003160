"""The store's listing rules and write side effects, checked over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from store_sync.store.client import StoreApiError, StoreNotFound
from tests.helpers import WebhookReceiver

GMT = "%Y-%m-%dT%H:%M:%S"


def test_paging_headers_and_links(sandbox):
    client = sandbox.client()
    data, headers = client.request("GET", "orders", {"per_page": 10, "page": 2})
    total = int(headers["X-WP-Total"])
    assert total == len(sandbox.export("orders")) - sum(1 for o in sandbox.export("orders") if o["status"] == "trash")
    assert int(headers["X-WP-TotalPages"]) == -(-total // 10)
    assert 'rel="prev"' in headers["Link"] and 'rel="next"' in headers["Link"]
    assert 'rel="first"' not in headers["Link"] and 'rel="last"' not in headers["Link"]
    assert len(data) == 10
    past_end, headers = client.request("GET", "orders", {"per_page": 10, "page": 99})
    assert past_end == [] and int(headers["X-WP-Total"]) == total


@pytest.mark.parametrize("per_page", [0, 101, 500])
def test_per_page_out_of_bounds_is_rejected(sandbox, per_page):
    with pytest.raises(StoreApiError) as err:
        sandbox.client().get("orders", {"per_page": per_page})
    assert err.value.status == 400
    assert err.value.code == "rest_invalid_param"
    assert err.value.message == "Invalid parameter(s): per_page"


def test_per_page_100_is_the_maximum(sandbox):
    assert len(sandbox.client().get("orders", {"per_page": 100})) > 10


def test_default_order_is_newest_created_first(sandbox):
    ids_dates = [(o["date_created_gmt"], o["id"]) for o in sandbox.client().get("orders", {"per_page": 20})]
    assert ids_dates == sorted(ids_dates, reverse=True)


def test_modified_filters_are_strict_and_whole_second_in_site_time(sandbox):
    """Site timezone Europe/Madrid: naive values are site-local unless dates_are_gmt, Z is converted."""
    client = sandbox.client()
    order = client.get("orders", {"per_page": 1, "orderby": "modified", "order": "desc"})[0]
    t_gmt = datetime.strptime(order["date_modified_gmt"], GMT)
    t_local = datetime.strptime(order["date_modified"], GMT)
    assert t_local - t_gmt == ZoneInfo("Europe/Madrid").utcoffset(t_gmt), "the site is not on UTC"

    def ids(**params):
        return {o["id"] for o in client.iter_records("orders", {**params, "_fields": "id"})}

    gmt_at = order["date_modified_gmt"]
    assert order["id"] not in ids(modified_after=gmt_at, dates_are_gmt="true"), "modified_after must be strict"
    assert order["id"] in ids(modified_after=(t_gmt - timedelta(seconds=1)).strftime(GMT), dates_are_gmt="true")
    assert order["id"] not in ids(modified_before=gmt_at, dates_are_gmt="true"), "modified_before must be strict"
    assert order["id"] in ids(modified_before=(t_gmt + timedelta(seconds=1)).strftime(GMT), dates_are_gmt="true")
    # Fractions do not make it finer: the store compares whole seconds.
    assert order["id"] not in ids(modified_after=gmt_at + ".999", dates_are_gmt="true")
    # Without dates_are_gmt a naive value is site-local wall-clock time.
    assert order["id"] not in ids(modified_after=order["date_modified"])
    assert order["id"] in ids(modified_after=(t_local - timedelta(seconds=1)).strftime(GMT))
    # The quirk: an explicit Z is converted to site time, then compared with the GMT column.
    z_just_before = (t_gmt - timedelta(seconds=1)).strftime(GMT) + "Z"
    assert order["id"] not in ids(modified_after=z_just_before, dates_are_gmt="true")


def test_date_only_filter_is_rejected(sandbox):
    with pytest.raises(StoreApiError) as err:
        sandbox.client().get("orders", {"modified_after": "2024-05-01"})
    assert err.value.status == 400 and err.value.message == "Invalid parameter(s): modified_after"


def test_customers_cannot_be_filtered_by_date(sandbox):
    client = sandbox.client()
    everything = client.count("customers")
    assert client.count("customers", {"modified_after": "2099-01-01T00:00:00"}) == everything
    assert any(c["date_modified"] is None for c in sandbox.export("customers")), "some customers lack date_modified"


def test_guest_orders_exist_only_in_orders(sandbox):
    guests = [o for o in sandbox.export("orders") if o["customer_id"] == 0]
    assert guests
    emails = {c["email"] for c in sandbox.client().iter_records("customers", {"role": "all"})}
    assert not {g["billing"]["email"] for g in guests} & emails


def test_trash_is_hidden_from_any_and_listable(sandbox):
    client = sandbox.client()
    trashed = {o["id"] for o in sandbox.export("orders") if o["status"] == "trash"}
    assert trashed
    assert not trashed & {o["id"] for o in client.iter_records("orders", {"_fields": "id"})}
    assert trashed == {o["id"] for o in client.iter_records("orders", {"status": "trash", "_fields": "id"})}


def test_fields_keeps_id(sandbox):
    rows = sandbox.client().get("orders", {"per_page": 3, "_fields": "status,billing.email"})
    assert all(set(r) == {"id", "status", "billing"} and set(r["billing"]) == {"email"} for r in rows)


def test_status_change_side_effects(writable_sandbox):
    client = writable_sandbox.client()
    order = client.get("orders", {"status": "pending", "per_page": 1})[0]
    assert order["date_paid"] is None
    updated = client.put(f"orders/{order['id']}", {"status": "processing"})
    assert updated["status"] == "processing" and updated["date_paid_gmt"]
    assert updated["date_modified_gmt"] >= order["date_modified_gmt"]
    done = client.put(f"orders/{order['id']}", {"status": "completed"})
    assert done["date_completed_gmt"]
    notes = [n["note"] for n in client.get(f"orders/{order['id']}/notes")]
    assert "Order status changed from Pending payment to Processing." in notes
    assert "Order status changed from Processing to Completed." in notes


def test_write_errors_use_the_store_codes(writable_sandbox):
    client = writable_sandbox.client()
    order_id = client.get("orders", {"per_page": 1})[0]["id"]
    with pytest.raises(StoreApiError) as err:
        client.put(f"orders/{order_id}", {"status": "shipped-by-owl"})
    assert (err.value.status, err.value.code) == (400, "rest_invalid_param")
    with pytest.raises(StoreApiError) as err:
        client.put("orders/999999", {"status": "completed"})
    assert (err.value.status, err.value.code) == (400, "woocommerce_rest_shop_order_invalid_id")
    with pytest.raises(StoreNotFound) as err:
        client.get("orders/999999")
    assert err.value.code == "woocommerce_rest_shop_order_invalid_id" and err.value.message == "Invalid ID."
    with pytest.raises(StoreApiError) as err:
        client.put(f"orders/{order_id}", {"customer_id": 987654})
    assert err.value.code == "woocommerce_rest_invalid_customer_id"


def test_subscription_status_versus_transition_status(writable_sandbox):
    client = writable_sandbox.client()
    subs = client.get("subscriptions", {"status": "active", "per_page": 2})
    assert len(subs) == 2
    held = client.put(f"subscriptions/{subs[0]['id']}", {"status": "on-hold"})
    assert held["status"] == "on-hold" and held["next_payment_date_gmt"] == subs[0]["next_payment_date_gmt"]
    cancelled = client.put(f"subscriptions/{subs[1]['id']}", {"transition_status": "cancelled"})
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_date_gmt"] and cancelled["end_date_gmt"] and cancelled["next_payment_date_gmt"] == ""
    related = client.request("GET", f"subscriptions/{subs[1]['id']}/orders")
    assert related[1]["X-WP-TotalPages"] == "1"
    assert {o["order_type"] for o in related[0]} <= {"parent_order", "renewal_order", "switch_order"}
    assert "parent_order" in {o["order_type"] for o in related[0]}


def test_delete_trashes_then_410_then_force_deletes(writable_sandbox):
    client = writable_sandbox.client()
    order_id = client.get("orders", {"per_page": 1, "status": "completed"})[0]["id"]
    before = client.request("DELETE", f"orders/{order_id}")[0]
    assert before["id"] == order_id and before["status"] == "completed", "DELETE answers the record as it was"
    assert client.get(f"orders/{order_id}")["status"] == "trash"
    with pytest.raises(StoreApiError) as err:
        client.request("DELETE", f"orders/{order_id}")
    assert (err.value.status, err.value.code) == (410, "woocommerce_rest_already_trashed")
    client.request("DELETE", f"orders/{order_id}", {"force": "true"})
    with pytest.raises(StoreNotFound):
        client.get(f"orders/{order_id}")


def test_customers_do_not_support_trash(writable_sandbox):
    client = writable_sandbox.client()
    customer_id = client.get("customers", {"per_page": 1})[0]["id"]
    with pytest.raises(StoreApiError) as err:
        client.request("DELETE", f"customers/{customer_id}")
    assert (err.value.status, err.value.code) == (501, "woocommerce_rest_trash_not_supported")


def test_batch_limit_and_per_item_errors(writable_sandbox):
    client = writable_sandbox.client()
    with pytest.raises(StoreApiError) as err:
        client.post("orders/batch", {"update": [{"id": i, "status": "completed"} for i in range(101)]})
    assert (err.value.status, err.value.code) == (413, "woocommerce_rest_request_entity_too_large")
    ids = [o["id"] for o in client.get("orders", {"status": "processing", "per_page": 2})]
    result = client.post("orders/batch", {"update": [{"id": ids[0], "status": "completed"},
                                                     {"id": 999999, "status": "completed"}],
                                          "delete": [ids[1]]})
    assert result["update"][0]["status"] == "completed"
    assert result["update"][1]["id"] == 999999 and result["update"][1]["error"]["code"] == "woocommerce_rest_shop_order_invalid_id"
    assert result["delete"][0]["id"] == ids[1]
    with pytest.raises(StoreNotFound):
        client.get(f"orders/{ids[1]}")  # batch deletes are permanent, not trash


def test_webhooks_are_signed_over_the_raw_body(writable_sandbox):
    client = writable_sandbox.client()
    receiver = WebhookReceiver()
    try:
        secret = "s3cr3t/with+chars"
        hook = client.post("webhooks", {"name": "crm", "topic": "order.updated", "delivery_url": receiver.url,
                                        "secret": secret})
        client.post("webhooks", {"name": "crm-del", "topic": "order.deleted", "delivery_url": receiver.url,
                                 "secret": secret})
        ping = receiver.wait_for(lambda r: r["body"].startswith(b"webhook_id="))
        assert ping[0]["body"] == f"webhook_id={hook['id']}".encode()
        order_id = client.get("orders", {"status": "processing", "per_page": 1})[0]["id"]
        client.put(f"orders/{order_id}", {"status": "completed"})
        got = receiver.wait_for(lambda r: r["headers"].get("x-wc-webhook-topic") == "order.updated")[0]
        expected = base64.b64encode(hmac.new(secret.encode(), got["body"], hashlib.sha256).digest()).decode()
        assert got["headers"]["x-wc-webhook-signature"] == expected
        assert got["headers"]["x-wc-webhook-resource"] == "order" and got["headers"]["x-wc-webhook-event"] == "updated"
        assert got["headers"]["x-wc-webhook-id"] == str(hook["id"]) and got["headers"]["x-wc-webhook-delivery-id"]
        assert b"\\/" in got["body"], "PHP escapes slashes: verify the raw bytes, never re-serialised JSON"
        payload = json.loads(got["body"])
        assert payload["id"] == order_id and payload["status"] == "completed"
        client.request("DELETE", f"orders/{order_id}")
        deleted = receiver.wait_for(lambda r: r["headers"].get("x-wc-webhook-topic") == "order.deleted")[0]
        assert json.loads(deleted["body"]) == {"id": order_id}
    finally:
        receiver.close()


def test_ground_truth_export_is_not_a_public_route(sandbox):
    with pytest.raises(StoreNotFound) as err:
        sandbox.client().get("export")
    assert err.value.code == "rest_no_route"


def test_generator_is_deterministic(tmp_path):
    from sandbox.generate import generate

    a = generate(tmp_path / "a.sqlite", "tiny", seed=5, now=datetime(2026, 1, 1))
    b = generate(tmp_path / "b.sqlite", "tiny", seed=5, now=datetime(2026, 1, 1))
    q = "SELECT id, post_type, post_status, post_modified_gmt FROM posts ORDER BY id"
    assert a.db.execute(q).fetchall() == b.db.execute(q).fetchall()
    assert a.db.execute("SELECT COUNT(*) FROM lookup WHERE list_id IS NULL").fetchone()[0] >= 10, "the table of tables"
