"""The store client against a misbehaving store: every fault kind is survived, nothing is lost."""

from __future__ import annotations

import threading
import time

import pytest

from store_sync.store.client import RequestBudget, StoreClient, StoreUnavailable
from tests.helpers import free_port


@pytest.fixture(scope="module")
def clean_orders(sandbox):
    return [o["id"] for o in sandbox.client().iter_records("orders", {"orderby": "id", "order": "asc", "_fields": "id"},
                                                           per_page=10)]


@pytest.mark.parametrize("kind,status", [("429", 429), ("429nr", 429), ("500", 500), ("502", 502), ("504", 504),
                                         ("truncated", 200), ("notice", 200)])
def test_every_fault_kind_is_retried_and_nothing_is_lost(sandbox_factory, clean_orders, kind, status):
    faulty = sandbox_factory(size="tiny", seed=1, extra=["--faults", f"{kind}=0.35", "--slow-seconds", "0.1"])
    client = faulty.client(max_retries=12)
    got = [o["id"] for o in client.iter_records("orders", {"orderby": "id", "order": "asc", "_fields": "id"}, per_page=10)]
    assert got == clean_orders
    assert client.stats.retries > 0, f"the {kind} fault never fired"
    assert client.stats.errors_by_status.get(status, 0) > 0
    if kind.startswith("429"):
        assert client.stats.throttled > 0
        assert client.budget.rate < client.budget.max_rate, "429s must slow the client down"


def test_retry_after_is_honoured(sandbox_factory):
    faulty = sandbox_factory(size="tiny", seed=3, extra=["--faults", "429=1.0"])
    client = faulty.client(max_retries=1, backoff_base=0.01)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="HTTP 429"):
        client.get("orders")
    assert time.monotonic() - started >= 1.0, "Retry-After: 1 was not waited for"
    assert client.stats.requests == 2


def test_unreachable_store_fails_fast_with_a_plain_message():
    client = StoreClient(f"http://127.0.0.1:{free_port()}", "ck_keyvalue", "cs", max_retries=1, backoff_base=0.01,
                         budget=RequestBudget(100, 2))
    with pytest.raises(StoreUnavailable, match="cannot reach the store at http://127.0.0.1") as err:
        client.check()
    assert "ck_keyvalue" not in str(err.value) and "oauth_signature" not in str(err.value)


def test_secret_never_shows_in_repr_or_errors(sandbox):
    client = sandbox.client(secret="cs_wrong_secret_value")
    assert "cs_wrong_secret_value" not in repr(client)
    with pytest.raises(Exception) as err:
        client.get("orders")
    assert "cs_wrong_secret_value" not in str(err.value)


def test_concurrent_pages_match_sequential(sandbox):
    client = sandbox.client(max_in_flight=4)
    params = {"orderby": "id", "order": "asc", "_fields": "id,status"}
    first = client.get_page("orders", params, 1, per_page=7)
    pages = list(client.fetch_pages("orders", params, range(1, first.total_pages + 1), per_page=7, concurrency=4))
    assert [p.number for p in pages] == list(range(1, first.total_pages + 1))
    assert [r for p in pages for r in p.records] == list(client.iter_records("orders", params, per_page=7))


def test_budget_caps_rate_and_in_flight():
    budget = RequestBudget(requests_per_second=20, max_in_flight=2)
    peak, current, lock = 0, 0, threading.Lock()

    def call():
        nonlocal peak, current
        budget.acquire()
        with lock:
            current += 1
            peak = max(peak, current)
        time.sleep(0.02)
        with lock:
            current -= 1
        budget.release()

    started = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak <= 2
    assert time.monotonic() - started >= 9 / 20, "10 requests at 20/s need at least 0.45 s"


def test_one_budget_per_store_is_shared():
    from store_sync.store.client import shared_budget

    assert shared_budget("https://shop.test", 5, 3) is shared_budget("https://shop.test", 50, 30)


def test_rising_latency_slows_the_client_down(sandbox_factory):
    slow = sandbox_factory(size="tiny", seed=1, extra=["--faults", "slow=0.3", "--slow-seconds", "1.2"])
    client = slow.client(requests_per_second=50)
    for _ in range(12):
        client.get("orders", {"per_page": 1})
    assert client.budget.latency_slowdowns > 0
    assert client.budget.rate < client.budget.max_rate


# -- configuration through the store connection ---------------------------------------------------------
def _store_conn(monkeypatch, value) -> None:
    import json

    monkeypatch.setenv("AIRFLOW_CONN_STORE_API", value if isinstance(value, str) else json.dumps(value))


def test_extras_given_as_strings_mean_what_they_say(monkeypatch, sandbox):
    from store_sync.store.hooks import StoreApiHook

    _store_conn(monkeypatch, {"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox",
                              "extra": {"query_string_auth": "false", "verify": "no", "max_in_flight": "2",
                                        "requests_per_second": "7.5", "timeout": "12", "max_retries": "0"}})
    client = StoreApiHook().get_client()
    # bool("false") is True: the keys would have gone into every URL
    assert client.query_string_auth is False and client.verify is False
    assert (client.budget.max_in_flight, client.budget.max_rate, client.timeout, client.max_retries) == (2, 7.5, 12, 0)
    _store_conn(monkeypatch, {"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_sandbox",
                              "extra": {"query_string_auth": "1"}})
    assert StoreApiHook().get_client().query_string_auth is True


@pytest.mark.parametrize("extra,name", [({"max_in_flight": "lots"}, "max_in_flight"), ({"timeout": "30s"}, "timeout"),
                                        ({"query_string_auth": "perhaps"}, "query_string_auth"),
                                        ({"max_in_flight": "2.5"}, "max_in_flight"),
                                        ({"verify": "/nowhere/ca.pem"}, "verify")])
def test_garbage_in_an_extra_is_named_in_the_error(monkeypatch, extra, name):
    from store_sync.store.hooks import StoreApiHook

    _store_conn(monkeypatch, {"conn_type": "http", "host": "https://shop.example.com", "login": "ck_x", "password": "cs_y",
                              "extra": extra})
    with pytest.raises(ValueError, match=f"store connection 'store_api': extra '{name}'"):
        StoreApiHook().get_client()
    ok, message = StoreApiHook().test_connection()
    assert not ok and name in message


def test_airflow_uri_form_means_plain_http_when_it_says_http(monkeypatch, sandbox):
    from store_sync.store.hooks import StoreApiHook, store_url

    _store_conn(monkeypatch, f"http://ck_sandbox:cs_sandbox@127.0.0.1:{sandbox.port}")
    hook = StoreApiHook()
    assert hook.base_url() == f"http://127.0.0.1:{sandbox.port}"
    assert hook.get_client().check()  # plain HTTP with OAuth 1.0a, as the URI says
    _store_conn(monkeypatch, "https://ck_x:cs_y@shop.example.com/shop")
    assert StoreApiHook().base_url() == "https://shop.example.com/shop"  # a sub-folder lands in `schema`
    assert store_url("shop.example.com", None, "", None) == "https://shop.example.com"  # nothing said: HTTPS
    assert store_url("shop.example.com", 8443, "https", "http") == "https://shop.example.com:8443"


def test_tls_errors_carry_no_key_secret_or_signature_anywhere(monkeypatch, sandbox_factory, crm_dsn):
    """Query-string auth on HTTPS puts the secret in the URL; requests repeats the URL in its errors."""
    import json

    import psycopg

    from store_sync.store.hooks import StoreApiHook
    from store_sync.tasks import land_entity

    tls = sandbox_factory(size="tiny", seed=1, tls=True)  # a self-signed certificate the client refuses
    monkeypatch.setenv("CRM_DATABASE_URL", crm_dsn)
    _store_conn(monkeypatch, json.dumps({"conn_type": "http", "host": tls.url, "login": "ck_sandbox",
                                         "password": "cs_sandbox", "extra": {"query_string_auth": True}}))
    ok, message = StoreApiHook().test_connection()
    assert not ok and "TLS" in message
    with pytest.raises(StoreUnavailable) as err:
        land_entity("orders", "test-tls")
    with psycopg.connect(crm_dsn) as conn:
        stored = conn.execute("SELECT error FROM sync.landing_run WHERE run_id='test-tls'").fetchone()[0]
    for text in (message, str(err.value), stored):
        assert "cs_sandbox" not in text and "consumer_secret" not in text and "ck_sandbox" not in text, text


def test_wrong_key_fails_at_once_in_words(monkeypatch, sandbox):
    from store_sync.store.hooks import StoreApiHook

    _store_conn(monkeypatch, {"conn_type": "http", "host": sandbox.url, "login": "ck_sandbox", "password": "cs_wrong"})
    started = time.monotonic()
    ok, message = StoreApiHook().test_connection()
    assert not ok and "consumer key and secret" in message and "cs_wrong" not in message
    assert time.monotonic() - started < 5, "a refused key is not retried"
