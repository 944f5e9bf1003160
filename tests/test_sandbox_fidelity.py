"""The sandbox is as unkind as a real store: refusals, write side effects and full payloads,
checked over real HTTP against what WooCommerce / WooCommerce Subscriptions code does."""

from __future__ import annotations

import calendar
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import requests

from store_sync.store.client import oauth_params
from tests.helpers import free_port

GMT = "%Y-%m-%dT%H:%M:%S"


def call(sandbox, method: str, endpoint: str, params: dict | None = None, body: dict | None = None):
    """One signed request, raw: the test sees the status and the whole error body (``data`` too)."""
    url = f"{sandbox.api}/{endpoint}"
    return requests.request(method, url, params=oauth_params(method, url, params or {}, "ck_sandbox", "cs_sandbox"),
                            json=body, timeout=30)


# -- rest_invalid_param ---------------------------------------------------------------------------
def test_per_page_101_carries_details(sandbox):
    r = call(sandbox, "GET", "orders", {"per_page": 101})
    assert r.status_code == 400
    assert r.json() == {
        "code": "rest_invalid_param", "message": "Invalid parameter(s): per_page",
        "data": {"status": 400,
                 "params": {"per_page": "per_page must be between 1 (inclusive) and 100 (inclusive)"},
                 "details": {"per_page": {"code": "rest_out_of_bounds",
                                          "message": "per_page must be between 1 (inclusive) and 100 (inclusive)",
                                          "data": None}}}}


def test_every_bad_parameter_is_listed_at_once(sandbox):
    r = call(sandbox, "GET", "orders", {"per_page": 0, "orderby": "nope", "status": "processing,shipped",
                                         "modified_after": "2024-05-01"})
    body = r.json()
    assert r.status_code == 400
    assert body["message"] == "Invalid parameter(s): per_page, modified_after, orderby, status"
    assert set(body["data"]["params"]) == set(body["data"]["details"]) == {"per_page", "modified_after", "orderby",
                                                                            "status"}
    assert body["data"]["details"]["orderby"]["code"] == "rest_not_in_enum"
    assert body["data"]["params"]["orderby"] == "orderby is not one of date, id, include, title, slug, and modified."
    status = body["data"]["params"]["status"]
    assert status.startswith("status[1] is not one of any, trash, pending, processing,")
    assert status.endswith(", and checkout-draft.")
    assert body["data"]["details"]["modified_after"] == {"code": "rest_invalid_date", "message": "Invalid date.",
                                                         "data": None}


def test_bad_body_enum_names_the_allowed_values(writable_sandbox):
    order_id = writable_sandbox.client().get("orders", {"per_page": 1})[0]["id"]
    r = call(writable_sandbox, "PUT", f"orders/{order_id}", body={"status": "shipped-by-owl"})
    assert r.status_code == 400
    details = r.json()["data"]["details"]["status"]
    assert details["code"] == "rest_not_in_enum" and details["message"].endswith("failed, and checkout-draft.")


def site_months(gmt: str, months: int) -> str:
    """wcs_add_months with 'offset_site_time', written out independently: calendar months in site
    time (Europe/Madrid), clamped to the month's last day, last day staying last day."""
    when = datetime.strptime(gmt, GMT)
    offset = ZoneInfo("Europe/Madrid").utcoffset(datetime.now(UTC).replace(tzinfo=None))
    local = when + offset
    for _ in range(months):
        last = calendar.monthrange(local.year, local.month)[1]
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        days = calendar.monthrange(year, month)[1]
        day = days if local.day == last or local.day > days else local.day
        local = local.replace(year=year, month=month, day=day)
    return (local - offset).strftime(GMT)


def notes(sandbox, endpoint: str) -> list[str]:
    return [n["note"] for n in call(sandbox, "GET", f"{endpoint}/notes").json()]


# -- subscriptions ----------------------------------------------------------------------------------
def test_refused_transition_is_a_500_with_a_note_and_status_is_not_checked(writable_sandbox):
    client = writable_sandbox.client()
    cancelled = client.get("subscriptions", {"status": "cancelled", "per_page": 1})[0]
    sid = cancelled["id"]
    r = call(writable_sandbox, "PUT", f"subscriptions/{sid}",
             body={"transition_status": "active", "billing": {"city": "Nowhere"}})
    assert r.status_code == 500 and r.json()["code"] == "internal_server_error"
    after = client.get(f"subscriptions/{sid}")
    assert after["status"] == "cancelled" and after["billing"]["city"] != "Nowhere", "nothing else is saved"
    assert after["date_modified_gmt"] == cancelled["date_modified_gmt"]
    assert 'Unable to change subscription status to "active".' in notes(writable_sandbox, f"subscriptions/{sid}")
    for refused in ("on-hold", "pending", "switched"):
        assert call(writable_sandbox, "PUT", f"subscriptions/{sid}", body={"transition_status": refused}).status_code == 500
    expired = client.get("subscriptions", {"status": "expired", "per_page": 1})[0]
    assert call(writable_sandbox, "PUT", f"subscriptions/{expired['id']}",
                body={"transition_status": "pending-cancel"}).status_code == 500
    # A refused change inside a batch kills the whole request, as the uncaught exception does.
    r = call(writable_sandbox, "POST", "subscriptions/batch", body={"update": [{"id": sid, "transition_status": "active"}]})
    assert r.status_code == 500
    # `status` is set_status(): no rule, no date side effect.
    forced = client.put(f"subscriptions/{sid}", {"status": "active"})
    assert forced["status"] == "active" and forced["next_payment_date_gmt"] == cancelled["next_payment_date_gmt"]
    assert "Status changed from Cancelled to Active." in notes(writable_sandbox, f"subscriptions/{sid}")


def test_reactivation_keeps_a_future_next_payment_and_counts_calendar_months(writable_sandbox):
    client = writable_sandbox.client()
    active = client.get("subscriptions", {"status": "active", "per_page": 1})[0]
    held = client.put(f"subscriptions/{active['id']}", {"transition_status": "on-hold"})
    assert held["suspension_count"] == active["suspension_count"] + 1
    back = client.put(f"subscriptions/{active['id']}", {"transition_status": "active"})
    assert back["status"] == "active" and back["next_payment_date_gmt"] == active["next_payment_date_gmt"]
    on_hold = client.get("subscriptions", {"status": "on-hold", "per_page": 1})[0]
    assert on_hold["next_payment_date_gmt"] == ""
    revived = client.put(f"subscriptions/{on_hold['id']}", {"transition_status": "active"})
    soon = (datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=2)).strftime(GMT)
    step = int(on_hold["billing_interval"]) * (12 if on_hold["billing_period"] == "year" else 1)
    n, expected = 1, site_months(on_hold["last_payment_date_gmt"], step)
    while expected < soon:
        n += 1
        expected = site_months(on_hold["last_payment_date_gmt"], n * step)
    assert revived["next_payment_date_gmt"] == expected


def test_cancel_date_is_set_once(writable_sandbox):
    client = writable_sandbox.client()
    sub = client.get("subscriptions", {"status": "active", "per_page": 1})[0]
    pending = client.put(f"subscriptions/{sub['id']}", {"transition_status": "pending-cancel"})
    assert pending["cancelled_date_gmt"] and pending["next_payment_date_gmt"] == ""
    assert pending["end_date_gmt"] == sub["next_payment_date_gmt"], "paid up until the next payment"
    time.sleep(1.1)
    cancelled = client.put(f"subscriptions/{sub['id']}", {"transition_status": "cancelled"})
    assert cancelled["cancelled_date_gmt"] == pending["cancelled_date_gmt"]
    assert cancelled["end_date_gmt"] > pending["cancelled_date_gmt"]


def test_related_orders_newest_first_within_a_type(writable_sandbox):
    client = writable_sandbox.client()
    sub = client.get("subscriptions", {"status": "active", "per_page": 1})[0]
    for _ in range(2):  # renewal orders are tied to their subscription by the _subscription_renewal meta
        client.post("orders", {"customer_id": sub["customer_id"], "status": "completed",
                               "meta_data": [{"key": "_subscription_renewal", "value": str(sub["id"])}]})
    related, headers = client.request("GET", f"subscriptions/{sub['id']}/orders")
    renewals = [o["id"] for o in related if o["order_type"] == "renewal_order"]
    assert related[0]["order_type"] == "parent_order" and related[0]["id"] == sub["parent_id"]
    assert len(renewals) >= 2 and renewals == sorted(renewals, reverse=True)
    assert headers["X-WP-TotalPages"] == "1" and headers["X-WP-Total"] == str(len(related))


def test_generated_renewals_follow_the_billing_interval(sandbox):
    subs = [s for s in sandbox.export("subscriptions") if s["status"] == "active"]
    assert subs
    for s in subs:
        step = int(s["billing_interval"]) * (12 if s["billing_period"] == "year" else 1)
        assert s["next_payment_date_gmt"] == site_months(s["last_payment_date_gmt"], step)


# -- orders -----------------------------------------------------------------------------------------
def test_set_paid_acts_only_when_the_order_needs_payment(writable_sandbox):
    client = writable_sandbox.client()
    pending = [o for o in client.get("orders", {"status": "pending", "per_page": 3}) if float(o["total"]) > 0]
    held = client.put(f"orders/{pending[0]['id']}", {"status": "on-hold", "set_paid": True})
    assert held["status"] == "on-hold" and held["date_paid"] is None, "set_paid runs after the status change"
    assert client.put(f"orders/{pending[0]['id']}", {"set_paid": True})["status"] == "on-hold"
    paid = client.put(f"orders/{pending[1]['id']}", {"set_paid": True, "transaction_id": "tx-1"})
    assert paid["status"] == ("processing" if pending[1]["needs_processing"] else "completed")
    assert paid["date_paid_gmt"] and paid["transaction_id"] == "tx-1" and not paid["needs_payment"]
    processing = client.get("orders", {"status": "processing", "per_page": 1})[0]
    again = client.put(f"orders/{processing['id']}", {"set_paid": True})
    assert again["status"] == "processing" and again["date_paid_gmt"] == processing["date_paid_gmt"]


def test_date_paid_once_date_completed_on_every_entry(writable_sandbox):
    client = writable_sandbox.client()
    done = client.get("orders", {"status": "completed", "per_page": 1})[0]
    back = client.put(f"orders/{done['id']}", {"status": "processing"})
    assert back["date_paid_gmt"] == done["date_paid_gmt"] and back["date_completed_gmt"] == done["date_completed_gmt"]
    time.sleep(1.1)
    redone = client.put(f"orders/{done['id']}", {"status": "completed"})
    assert redone["date_completed_gmt"] > done["date_completed_gmt"]
    assert redone["date_paid_gmt"] == done["date_paid_gmt"]
    assert "Order status changed from Processing to Completed." in notes(writable_sandbox, f"orders/{done['id']}")


def test_virtual_downloadable_orders_skip_processing(writable_sandbox):
    client = writable_sandbox.client()
    product = next(p for p in client.iter_records("products", {"type": "simple"})
                   if p["virtual"] and p["downloadable"] and p["status"] == "publish")
    order = client.post("orders", {"status": "pending", "set_paid": True,
                                    "line_items": [{"product_id": product["id"], "quantity": 1}]})
    assert order["status"] == "completed" and order["needs_processing"] is False and order["date_paid_gmt"]


# -- webhooks ---------------------------------------------------------------------------------------
def test_webhook_disabled_on_the_seventh_consecutive_failure_with_a_random_default_secret(writable_sandbox):
    client = writable_sandbox.client()
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: every delivery fails
    hook = client.post("webhooks", {"name": "down", "topic": "order.updated", "delivery_url": dead})
    other = client.post("webhooks", {"name": "other", "topic": "order.created", "delivery_url": dead})
    db = sqlite3.connect(writable_sandbox.db)

    def state():
        return db.execute("SELECT status, failure_count FROM webhooks WHERE id=?", (hook["id"],)).fetchone()

    secrets = [r[0] for r in db.execute("SELECT secret FROM webhooks WHERE id IN (?, ?)", (hook["id"], other["id"]))]
    assert len(set(secrets)) == 2 and all(len(x) == 50 for x in secrets), "random, not derived or fixed"
    orders = [o["id"] for o in client.get("orders", {"per_page": 7})]
    assert len(orders) == 7

    def fail_once(order_id: int, expected: tuple[str, int]) -> None:
        client.put(f"orders/{order_id}", {"customer_note": "poke"})
        deadline = time.monotonic() + 15
        while state() != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state() == expected

    for n, order_id in enumerate(orders[:6], start=1):
        fail_once(order_id, ("active", n))
    fail_once(orders[6], ("disabled", 6))
    assert client.get(f"webhooks/{hook['id']}")["status"] == "disabled"


# -- payload completeness (woocommerce-rest-api-docs wp-api-v3 _products.md, _product-variations.md,
#    _product-categories.md, _orders.md; subscriptions-rest-api-docs; WCS 9 controller) --------------
PRODUCT_FIELDS = {
    "id", "name", "slug", "permalink", "date_created", "date_created_gmt", "date_modified", "date_modified_gmt",
    "type", "status", "featured", "catalog_visibility", "description", "short_description", "sku", "price",
    "regular_price", "sale_price", "date_on_sale_from", "date_on_sale_from_gmt", "date_on_sale_to",
    "date_on_sale_to_gmt", "price_html", "on_sale", "purchasable", "total_sales", "virtual", "downloadable",
    "downloads", "download_limit", "download_expiry", "external_url", "button_text", "tax_status", "tax_class",
    "manage_stock", "stock_quantity", "stock_status", "backorders", "backorders_allowed", "backordered",
    "sold_individually", "weight", "dimensions", "shipping_required", "shipping_taxable", "shipping_class",
    "shipping_class_id", "reviews_allowed", "average_rating", "rating_count", "related_ids", "upsell_ids",
    "cross_sell_ids", "parent_id", "purchase_note", "categories", "tags", "images", "attributes",
    "default_attributes", "variations", "grouped_products", "menu_order", "meta_data",
    # in the controller's schema, not (yet) in the docs' table
    "global_unique_id", "low_stock_amount", "has_options", "post_password",
}
VARIATION_FIELDS = {
    "id", "date_created", "date_created_gmt", "date_modified", "date_modified_gmt", "description", "permalink",
    "sku", "price", "regular_price", "sale_price", "date_on_sale_from", "date_on_sale_from_gmt", "date_on_sale_to",
    "date_on_sale_to_gmt", "on_sale", "status", "purchasable", "virtual", "downloadable", "downloads",
    "download_limit", "download_expiry", "tax_status", "tax_class", "manage_stock", "stock_quantity",
    "stock_status", "backorders", "backorders_allowed", "backordered", "weight", "dimensions", "shipping_class",
    "shipping_class_id", "image", "attributes", "menu_order", "meta_data",
}
LINE_ITEM_FIELDS = {"id", "name", "product_id", "variation_id", "quantity", "tax_class", "subtotal", "subtotal_tax",
                    "total", "total_tax", "taxes", "meta_data", "sku", "price", "image", "parent_name"}
ORDER_FIELDS = {
    "id", "parent_id", "number", "order_key", "created_via", "version", "status", "currency", "date_created",
    "date_created_gmt", "date_modified", "date_modified_gmt", "discount_total", "discount_tax", "shipping_total",
    "shipping_tax", "cart_tax", "total", "total_tax", "prices_include_tax", "customer_id", "customer_ip_address",
    "customer_user_agent", "customer_note", "billing", "shipping", "payment_method", "payment_method_title",
    "date_paid", "date_paid_gmt", "date_completed", "date_completed_gmt", "meta_data", "line_items", "tax_lines",
    "shipping_lines", "fee_lines", "coupon_lines", "payment_url", "is_editable", "needs_payment", "needs_processing",
}
SUBSCRIPTION_FIELDS = ORDER_FIELDS | {
    "billing_period", "billing_interval", "trial_period", "suspension_count", "requires_manual_renewal",
    "start_date_gmt", "trial_end_date_gmt", "next_payment_date_gmt", "last_payment_date_gmt", "cancelled_date_gmt",
    "end_date_gmt", "resubscribed_from", "resubscribed_subscription", "removed_line_items",
}


def test_products_and_variations_carry_every_documented_field(sandbox):
    products = sandbox.export("products")
    for p in products:
        assert PRODUCT_FIELDS <= set(p), PRODUCT_FIELDS - set(p)
    assert any(p["images"] and isinstance(p["images"][0]["id"], int) for p in products)
    assert any(p["downloads"] for p in products)
    variations = sandbox.export("variations")
    for v in variations:
        assert VARIATION_FIELDS <= set(v), VARIATION_FIELDS - set(v)
    categories = sandbox.export("categories")
    assert all("image" in c for c in categories)
    assert any(isinstance(c["image"], dict) and c["image"]["src"] for c in categories)


def test_orders_and_subscriptions_carry_every_documented_field(sandbox):
    orders = sandbox.export("orders")
    for o in orders:
        assert ORDER_FIELDS <= set(o), ORDER_FIELDS - set(o)
        assert o["payment_url"].endswith(f"&key={o['order_key']}")
        for li in o["line_items"]:
            assert LINE_ITEM_FIELDS <= set(li) and isinstance(li["image"]["id"], int)
    variation_lines = [li for o in orders for li in o["line_items"] if li["variation_id"]]
    parents = {p["id"]: p["name"] for p in sandbox.export("products")}
    assert variation_lines and all(li["parent_name"] == parents[li["product_id"]] for li in variation_lines)
    assert all(li["parent_name"] is None for o in orders for li in o["line_items"] if not li["variation_id"])
    subs = sandbox.export("subscriptions")
    for s in subs:
        assert SUBSCRIPTION_FIELDS <= set(s), SUBSCRIPTION_FIELDS - set(s)
        assert not {"transaction_id", "refunds", "set_paid", "cart_hash"} & set(s)
        assert isinstance(s["suspension_count"], int) and isinstance(s["requires_manual_renewal"], bool)
    assert any(s["fee_lines"] for s in subs), "generated subscriptions carry fee lines too"


def test_needs_payment_wants_a_total_above_zero(writable_sandbox):
    client = writable_sandbox.client()
    empty = client.post("orders", {"status": "pending"})
    assert empty["total"] == "0.00" and empty["needs_payment"] is False and empty["needs_processing"] is False
    assert any(o["needs_payment"] for o in client.get("orders", {"status": "pending"}) if float(o["total"]) > 0)
