"""The store client against a misbehaving store: every fault kind is survived, nothing is lost."""

from __future__ import annotations

import threading
import time

import pytest

from store_sync.client import RequestBudget, StoreClient, StoreUnavailable
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
    from store_sync.client import shared_budget

    assert shared_budget("https://shop.test", 5, 3) is shared_budget("https://shop.test", 50, 30)


def test_rising_latency_slows_the_client_down(sandbox_factory):
    slow = sandbox_factory(size="tiny", seed=1, extra=["--faults", "slow=0.3", "--slow-seconds", "1.2"])
    client = slow.client(requests_per_second=50)
    for _ in range(12):
        client.get("orders", {"per_page": 1})
    assert client.budget.latency_slowdowns > 0
    assert client.budget.rate < client.budget.max_rate
