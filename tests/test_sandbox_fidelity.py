"""The sandbox is as unkind as a real store: refusals, write side effects and full payloads,
checked over real HTTP against what WooCommerce / WooCommerce Subscriptions code does."""

from __future__ import annotations

import requests

from store_sync.client import oauth_params


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
