"""The sandbox scaled out (``--workers``), pre-rendered (``--prerender``) and as slow and limited as a
hosted shop (``--page-latency``, ``--max-concurrent``): what a client sees must not change, only speed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from store_sync.store.client import oauth_params
from tests.helpers import WebhookReceiver


def call(sandbox, method: str, endpoint: str, params: dict | None = None, body: dict | None = None,
         key: str = "ck_sandbox", secret: str = "cs_sandbox") -> requests.Response:
    """One signed request on a new connection (so the kernel hands it to any worker)."""
    url = f"{sandbox.api}/{endpoint}"
    params = {k: str(v) for k, v in (params or {}).items()}
    with requests.Session() as session:
        return session.request(method, url, params={**params, **oauth_params(method, url, params, key, secret)},
                               json=body, timeout=60)


def total(sandbox, endpoint: str, **params) -> int:
    r = call(sandbox, "GET", endpoint, {"per_page": 1, "_fields": "id", **params})
    assert r.status_code == 200, r.text
    return int(r.headers["X-WP-Total"])


@pytest.fixture(scope="module")
def workers(sandbox_factory):
    return sandbox_factory(size="tiny", seed=5, extra_args=["--workers", "3", "--changes-per-second", "20",
                                                            "--webhook-delay", "0.1"])


def test_concurrent_writes_through_every_worker_all_land(workers):
    """Writers on many connections (three worker processes, the simulator writing too): no write fails,
    none is lost, none gets another's id, and every worker sees every write."""
    orders_before = total(workers, "orders", status="any")
    stamp = time.time_ns()

    def create(n: int) -> tuple[int, int, int, int]:
        order = call(workers, "POST", "orders", body={"status": "pending", "billing": {"email": f"w{n}@example.com"}})
        customer = call(workers, "POST", "customers", body={"email": f"scale{stamp}-{n}@example.com"})
        return order.status_code, order.json().get("id"), customer.status_code, customer.json().get("id")

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(create, range(60)))
    assert [r for r in results if r[0] != 201 or r[2] != 201] == []
    order_ids, customer_ids = [r[1] for r in results], [r[3] for r in results]
    assert len(set(order_ids)) == 60 and len(set(customer_ids)) == 60
    workers_control(workers, rate=0)  # the simulator stops: the counts below are ours to check
    try:
        for _ in range(6):  # six new connections: several workers answer, each sees every write
            found = call(workers, "GET", "orders", {"include": ",".join(map(str, order_ids)), "per_page": 100,
                                                     "_fields": "id"})
            assert sorted(d["id"] for d in found.json()) == sorted(order_ids)
            assert total(workers, "customers", search=f"scale{stamp}") == 60
        assert total(workers, "orders", status="any") >= orders_before + 60
    finally:
        workers_control(workers, rate=20)


def workers_control(sandbox, **body) -> dict:
    r = requests.post(f"{sandbox.url}/sandbox/control", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_fault_set_on_one_worker_applies_to_all_and_is_counted_once(workers):
    before = requests.get(f"{workers.url}/sandbox/stats", timeout=30).json()["faults"].get("500", 0)
    workers_control(workers, faults="500=1")
    try:
        codes = [call(workers, "GET", "orders", {"per_page": 1}).status_code for _ in range(12)]
    finally:
        stats = workers_control(workers, faults="")
    assert codes == [500] * 12
    assert stats["faults"]["500"] - before == 12
    assert [call(workers, "GET", "orders", {"per_page": 1}).status_code for _ in range(6)] == [200] * 6


def test_one_simulator_for_all_workers(workers):
    """Stopping the simulator through any worker stops every change: there is only one."""
    for _ in range(3):  # asked of whichever workers answer: always the same simulator
        assert requests.get(f"{workers.url}/sandbox/stats", timeout=30).json()["simulator"]["rate"] == 20
    stats = workers_control(workers, rate=0)
    assert stats["simulator"]["running"] is False
    try:
        before = [total(workers, "orders", status="any"), total(workers, "customers", role="all")]
        time.sleep(1.5)  # at 20 changes/s a second simulator would have written ~30 records by now
        assert [total(workers, "orders", status="any"), total(workers, "customers", role="all")] == before
        steps = requests.get(f"{workers.url}/sandbox/stats", timeout=30).json()["simulator"]["steps"]
        assert requests.get(f"{workers.url}/sandbox/stats", timeout=30).json()["simulator"]["steps"] == steps
    finally:
        workers_control(workers, rate=20)


def test_webhooks_are_delivered_once_per_change_whichever_worker_wrote(workers):
    receiver = WebhookReceiver()
    try:
        hook = call(workers, "POST", "webhooks", body={"topic": "customer.updated", "delivery_url": receiver.url,
                                                       "secret": "s3cret"})
        assert hook.status_code == 201
        customers = [d["id"] for d in call(workers, "GET", "customers", {"per_page": 8, "orderby": "id"}).json()]
        workers_control(workers, rate=0)  # only our changes now
        receiver.received.clear()
        for uid in customers:  # each on its own connection: the workers share the writes
            assert call(workers, "PUT", f"customers/{uid}", body={"first_name": f"Scaled {uid}"}).status_code == 200
        mine = lambda r: r["headers"].get("x-wc-webhook-topic") == "customer.updated"  # noqa: E731
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len([r for r in receiver.received if mine(r)]) < len(customers):
            time.sleep(0.1)
        time.sleep(1)  # a second delivery of any of them would arrive within the webhook delay
        import json

        delivered = sorted(json.loads(r["body"])["id"] for r in receiver.received if mine(r))
        assert delivered == sorted(customers)
    finally:
        workers_control(workers, rate=20)
        call(workers, "DELETE", f"webhooks/{hook.json()['id']}", {"force": "true"})
        receiver.close()


def test_the_concurrency_limit_holds_across_workers(sandbox_factory):
    """Past --max-concurrent requests in flight (over all workers) the host answers 503, as nginx's
    limit_conn does, or 429 with Retry-After when told to."""
    for status in (503, 429):
        shop = sandbox_factory(size="tiny", seed=6, extra_args=[
            "--workers", "3", "--max-concurrent", "2", "--page-latency", "4-4", "--over-limit", str(status)])
        wait_for_free_slots(shop)  # the start-up probes queued while the workers started hold slots a while
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _, shop=shop: call(shop, "GET", "orders", {"per_page": 100}), range(8)))
        codes = sorted(a.status_code for a in answers)
        # Eight requests at once, each holding its slot for 4 s: two served, six refused.
        assert codes == [200, 200] + [status] * 6, (codes, [a.text[:100] for a in answers])
        refused = [a for a in answers if a.status_code == status]
        if status == 429:
            assert all(a.headers.get("Retry-After") == "1" for a in refused)
        else:
            assert all("Retry-After" not in a.headers and "nginx" in a.text for a in refused)
        served = [a for a in answers if a.status_code == 200]
        assert all(len(a.json()) == min(100, int(a.headers["X-WP-Total"])) for a in served)
        # Once the slots are free again, the shop answers.
        wait_for_free_slots(shop)
        assert call(shop, "GET", "orders", {"per_page": 1}).status_code == 200
        shop.stop()


def wait_for_free_slots(shop) -> None:
    deadline = time.monotonic() + 30
    while requests.get(f"{shop.url}/sandbox/stats", timeout=30).json()["host"]["in_flight"]:
        assert time.monotonic() < deadline, "the host's slots never came free"
        time.sleep(0.2)


def test_bad_shop_flags_fail_fast_in_words(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    for flags, words in ((["--page-latency", "3-1"], "HIGH >= LOW"), (["--page-latency", "fast"], "LOW-HIGH"),
                         (["--workers", "0"], "--workers must be at least 1"),
                         (["--workers", "2", "--faults", "nope=1"], "unknown fault kind 'nope'")):
        out = subprocess.run([sys.executable, "-m", "sandbox", "serve", "--db", str(tmp_path / "x.sqlite"), *flags],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and words in out.stderr + out.stdout, (flags, out.stderr)


# -- pre-rendered pages ---------------------------------------------------------------------------
ENTITIES = ("orders", "products", "customers", "subscriptions", "refunds")


@pytest.fixture(scope="module")
def twins(sandbox_factory):
    """One store served twice: pre-rendered (two workers) and live, both with related_ids in a fixed
    order so that every field can be compared."""
    pre = sandbox_factory(size="tiny", seed=8, extra_args=["--prerender", "--workers", "2", "--fixed-related"])
    live = sandbox_factory(size="tiny", seed=8, fresh=False, db=pre.db, extra_args=["--fixed-related"])
    return pre, live


def everything(sandbox, entity: str, **params) -> tuple[list, dict]:
    """Every page of ``entity`` (as parsed JSON, the sandbox's own URL made neutral) and the headers."""
    import json

    out, page, headers = [], 1, {}
    while True:
        r = call(sandbox, "GET", entity, {"per_page": 7, "orderby": "id", "order": "asc", "page": page,
                                          **({"role": "all"} if entity == "customers" else {"status": "any"}
                                             if entity in ("orders", "subscriptions", "products") else {}), **params})
        assert r.status_code == 200, r.text
        out += json.loads(r.text.replace(sandbox.url.replace("/", "\\/"), "URL").replace(sandbox.url, "URL"))
        headers = {k: r.headers.get(k, "").replace(sandbox.url, "URL") for k in ("X-WP-Total", "X-WP-TotalPages")}
        if page >= int(r.headers["X-WP-TotalPages"] or 0):
            return out, headers
        page += 1


def assert_same_answers(pre, live) -> None:
    for entity in ENTITIES:
        got, want = everything(pre, entity), everything(live, entity)
        assert got[1] == want[1], entity
        assert len(got[0]) == len(want[0]) > 0, entity
        for a, b in zip(got[0], want[0], strict=True):
            assert a == b, f"{entity} {b.get('id')}: " + ", ".join(k for k in b if a.get(k) != b.get(k))
    # _fields, a filter and the variations list behave as without pre-rendering.
    fields = {"_fields": "id,status,total,billing.email,line_items"}
    assert everything(pre, "orders", **fields) == everything(live, "orders", **fields)
    assert everything(pre, "orders", status="completed") == everything(live, "orders", status="completed")
    variable = [d["id"] for d in everything(live, "products", type="variable")[0]]
    for pid in variable[:2]:
        assert everything(pre, f"products/{pid}/variations") == everything(live, f"products/{pid}/variations")


def settled(sandbox) -> None:
    deadline = time.monotonic() + 60
    while requests.get(f"{sandbox.url}/sandbox/stats", timeout=30).json()["prerender"]["pending"]:
        assert time.monotonic() < deadline, "the renderer never caught up"
        time.sleep(0.2)


def test_prerendered_pages_equal_the_live_rendering_before_and_after_writes(twins):
    pre, live = twins
    settled(pre)
    assert_same_answers(pre, live)
    # Writes of every kind, through both servers: the simulator's mix (orders, customers, prices,
    # renewals, refunds, trash, bulk edits) and REST edits that touch what other records show: a
    # product's SKU and name appear in the orders that bought it, a refund in its order.
    workers_control(pre, rate=40, profile="chaos")
    ordered = next(o for o in everything(live, "orders", status="completed")[0]
                   if any(not i["variation_id"] for i in o["line_items"]))
    product_id = next(i["product_id"] for i in ordered["line_items"] if not i["variation_id"])
    assert call(pre, "PUT", f"products/{product_id}", body={"sku": "RENAMED-SKU", "name": "Renamed"}).status_code == 200
    assert call(live, "POST", f"orders/{ordered['id']}/refunds", body={"amount": "1.00", "api_refund": False}
                ).status_code == 201
    customer = everything(live, "customers")[0][0]["id"]
    assert call(live, "PUT", f"customers/{customer}", body={"billing": {"city": "Elsewhere"}}).status_code == 200
    time.sleep(2)
    workers_control(pre, rate=0, profile="default")
    assert_same_answers(pre, live)  # right away: stale bodies are gone, their records render live
    settled(pre)
    assert_same_answers(pre, live)  # and once re-rendered
    line = [d for d in everything(pre, "orders", include=ordered["id"])[0]][0]["line_items"]
    assert any(i["sku"] == "RENAMED-SKU" for i in line)


def test_prerendered_products_shuffle_related_ids_per_read(sandbox_factory):
    pre = sandbox_factory(size="tiny", seed=8, extra_args=["--prerender"])
    fixed = sandbox_factory(size="tiny", seed=8, fresh=False, db=pre.db, extra_args=["--fixed-related"])
    pool = {d["id"]: d["related_ids"] for d in everything(fixed, "products")[0]}
    seen: dict[int, set[tuple]] = {}
    for _ in range(6):
        for d in everything(pre, "products")[0]:
            seen.setdefault(d["id"], set()).add(tuple(d["related_ids"]))
            assert d["id"] not in d["related_ids"] and len(d["related_ids"]) == len(set(d["related_ids"]))
    assert any(len(orders) > 1 for pid, orders in seen.items() if len(pool[pid]) > 1)
    assert all(len(o) == len(pool[pid]) for pid, orders in seen.items() for o in orders)
