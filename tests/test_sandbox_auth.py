"""The store's authentication rules, over real HTTP and HTTPS, with the store's own error bodies."""

from __future__ import annotations

import time
from urllib.parse import quote

import pytest
import requests

from store_sync.store.client import StoreAuthError, oauth_params


def signed_get(sandbox, endpoint: str, key="ck_sandbox", secret="cs_sandbox", **params):
    url = f"{sandbox.api}/{endpoint}"
    return requests.get(url, params=oauth_params("GET", url, params, key, secret), timeout=10)


def test_oauth_over_http_lists_orders(sandbox):
    r = signed_get(sandbox, "orders", per_page=5)
    assert r.status_code == 200
    assert len(r.json()) == 5


def test_oauth_wrong_secret_is_an_invalid_signature(sandbox):
    r = signed_get(sandbox, "orders", secret="cs_wrong")
    assert r.status_code == 401
    assert r.json() == {"code": "woocommerce_rest_authentication_error",
                        "message": "Invalid signature - provided signature does not match.", "data": {"status": 401}}


def test_oauth_unknown_key(sandbox):
    r = signed_get(sandbox, "orders", key="ck_nobody")
    assert r.status_code == 401
    assert r.json()["message"] == "Consumer key is invalid."


def test_oauth_stale_timestamp_and_reused_nonce(sandbox):
    url = f"{sandbox.api}/orders"
    params = oauth_params("GET", url, {}, "ck_sandbox", "cs_sandbox")
    assert requests.get(url, params=params, timeout=10).status_code == 200
    replay = requests.get(url, params=params, timeout=10)
    assert replay.status_code == 401
    assert replay.json()["message"] == "Invalid nonce - nonce has already been used."
    old = oauth_params("GET", url, {}, "ck_sandbox", "cs_sandbox")
    old["oauth_timestamp"] = str(int(time.time()) - 3600)
    from sandbox.auth import oauth_signature

    old["oauth_signature"] = oauth_signature("GET", url, old, "cs_sandbox")
    r = requests.get(url, params=old, timeout=10)
    assert (r.status_code, r.json()["message"]) == (401, "Invalid timestamp.")


def test_oauth_missing_parameter(sandbox):
    r = requests.get(f"{sandbox.api}/orders", params={"oauth_consumer_key": "ck_sandbox"}, timeout=10)
    assert r.status_code == 401
    body = r.json()
    assert body["code"] == "woocommerce_rest_authentication_missing_parameter"
    assert "oauth_signature" in body["message"]


def test_basic_auth_over_plain_http_is_ignored_like_a_real_store(sandbox):
    r = requests.get(f"{sandbox.api}/orders", auth=("ck_sandbox", "cs_sandbox"), timeout=10)
    assert r.status_code == 401
    assert r.json()["code"] == "woocommerce_rest_cannot_view"
    assert r.json()["message"] == "Sorry, you cannot list resources."


def test_namespace_index_is_public(sandbox):
    # Why a connection check must not use it: wrong keys pass (airbyte#20222).
    assert requests.get(sandbox.api, timeout=10).status_code == 200


@pytest.fixture(scope="module")
def tls_sandbox(sandbox_factory):
    return sandbox_factory(size="tiny", seed=1, tls=True)


def test_basic_auth_over_https(tls_sandbox):
    r = requests.get(f"{tls_sandbox.api}/customers", auth=("ck_sandbox", "cs_sandbox"), verify=str(tls_sandbox.cert),
                     timeout=10)
    assert r.status_code == 200 and r.json()


def test_query_string_keys_over_https(tls_sandbox):
    r = requests.get(f"{tls_sandbox.api}/customers", params={"consumer_key": "ck_sandbox", "consumer_secret": "cs_sandbox"},
                     verify=str(tls_sandbox.cert), timeout=10)
    assert r.status_code == 200


def test_wrong_secret_over_https_falls_through_to_oauth_without_www_authenticate(tls_sandbox):
    """A failed Basic login goes on to OAuth, which sets auth_method to oauth1: the Basic
    challenge header of send_unauthorized_headers is then never sent."""
    r = requests.get(f"{tls_sandbox.api}/orders", auth=("ck_sandbox", "nope"), verify=str(tls_sandbox.cert), timeout=10)
    assert r.status_code == 401
    assert r.json()["message"] == "Consumer secret is invalid."
    assert "WWW-Authenticate" not in r.headers


def test_oauth_is_also_accepted_over_https(tls_sandbox):
    url = f"{tls_sandbox.api}/orders"
    r = requests.get(url, params=oauth_params("GET", url, {"per_page": 2}, "ck_sandbox", "cs_sandbox"),
                     verify=str(tls_sandbox.cert), timeout=10)
    assert r.status_code == 200 and len(r.json()) == 2


def test_oauth_header_realm_is_not_signed(sandbox):
    url = f"{sandbox.api}/orders"
    signed = oauth_params("GET", url, {}, "ck_sandbox", "cs_sandbox")
    header = "OAuth realm=\"" + url + "\", " + ", ".join(f'{k}="{quote(v, safe="")}"' for k, v in signed.items())
    r = requests.get(url, headers={"Authorization": header}, timeout=10)
    assert r.status_code == 200, r.text


def test_oauth_array_params_are_signed_by_index(sandbox):
    from sandbox.auth import oauth_signature

    url = f"{sandbox.api}/orders"
    params = oauth_params("GET", url, {}, "ck_sandbox", "cs_sandbox")
    del params["oauth_signature"]
    # What PHP's $_GET holds for status[]=processing&status[]=completed: signed as status[0], status[1].
    params["oauth_signature"] = oauth_signature("GET", url, {**params, "status": ["processing", "completed"]},
                                                "cs_sandbox")
    query = list(params.items()) + [("status[]", "processing"), ("status[]", "completed")]
    r = requests.get(url, params=query, timeout=10)
    assert r.status_code == 200, r.text
    assert {o["status"] for o in r.json()} <= {"processing", "completed"}
    # Signing the array as one comma-joined value (what some clients do) does not match.
    del params["oauth_signature"]
    params["oauth_nonce"] += "x"
    params["oauth_signature"] = oauth_signature("GET", url, {**params, "status[]": "completed"}, "cs_sandbox")
    bad = requests.get(url, params=list(params.items()) + [("status[]", "completed")], timeout=10)
    assert (bad.status_code, bad.json()["message"]) == (401, "Invalid signature - provided signature does not match.")


def test_write_only_key_cannot_read(sandbox):
    r = signed_get(sandbox, "orders", key="ck_sandbox_wo", secret="cs_sandbox_wo")
    assert r.status_code == 401
    assert r.json() == {"code": "woocommerce_rest_authentication_error",
                        "message": "The API key provided does not have read permissions.", "data": {"status": 401}}


def test_unknown_key_over_https_fails_the_permission_check(tls_sandbox):
    r = requests.get(f"{tls_sandbox.api}/orders/1", auth=("ck_nobody", "x"), verify=str(tls_sandbox.cert), timeout=10)
    assert r.status_code == 401
    assert r.json()["code"] == "woocommerce_rest_cannot_view"
    assert r.json()["message"] == "Sorry, you cannot view this resource."


def test_read_only_key_cannot_write(sandbox):
    client = sandbox.client(key="ck_sandbox_ro", secret="cs_sandbox_ro")
    order_id = client.get("orders", {"per_page": 1})[0]["id"]
    with pytest.raises(StoreAuthError) as err:
        client.put(f"orders/{order_id}", {"status": "completed"})
    assert err.value.status == 401
    assert err.value.message == "The API key provided does not have write permissions."


def test_client_uses_basic_over_https_and_does_not_retry_401(tls_sandbox):
    good = tls_sandbox.client()
    assert good.get("orders", {"per_page": 2})
    bad = tls_sandbox.client(secret="cs_wrong")
    with pytest.raises(StoreAuthError) as err:
        bad.get("orders")
    assert err.value.code == "woocommerce_rest_authentication_error"
    assert bad.stats.requests == 1, "a 401 must never be retried"


def test_check_explains_a_wrong_key(sandbox):
    with pytest.raises(StoreAuthError, match="check the consumer key and secret"):
        sandbox.client(key="ck_typo").check()
