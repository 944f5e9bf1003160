"""One bad record never stops the CRM: what the store accepts lands and applies, or waits in a
quarantine with its reason while everything beside it applies; fuzzed payloads prove it."""

from __future__ import annotations

import copy
import random
import shutil
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from store_sync.crm.migrations import migrate
from store_sync.crm.transform import TransformFailed, retry_quarantine, run_checks, transform
from store_sync.inbound.landing import land_page
from store_sync.registry import entity

# sandbox export name -> registry entity, CRM table (every one keeps landed_inbox_id)
EXPORTS = {"categories": ("product_categories", "crm.product_category"), "customers": ("customers", "crm.customer"),
           "products": ("products", "crm.product"), "variations": ("products", "crm.product"),
           "orders": ("orders", "crm.sales_order"), "refunds": ("refunds", "crm.refund"),
           "subscriptions": ("subscriptions", "crm.subscription")}


@pytest.fixture(scope="module")
def store(sandbox):
    """Real payloads, as the API renders them, from the shared tiny store (read only)."""
    return {name: sandbox.export(name) for name in EXPORTS}


@pytest.fixture
def crm(crm_dsn):
    migrate(crm_dsn)
    return crm_dsn


def land(dsn: str, name: str, records: list, deletes: bool = False):
    with psycopg.connect(dsn) as conn, conn.transaction():
        return land_page(conn, entity(name), records, "test", deletes=deletes)


def land_store(dsn: str, store: dict, **replace) -> None:
    """Every export, with some records replaced ({export: [records]})."""
    for name, (entity_name, _) in EXPORTS.items():
        land(dsn, entity_name, replace.get(name, store[name]))


def one(dsn: str, sql: str, *args):
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchone()


def rows(dsn: str, sql: str, *args) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchall()


def later(gmt: str, days: int = 1) -> str:
    return (datetime.fromisoformat(gmt) + timedelta(days=days)).isoformat()


def assert_nothing_left_behind(dsn: str) -> None:
    """Every inbox row applied, or waiting in the quarantine with a reason."""
    stuck = rows(dsn, "SELECT r.entity, r.source_key FROM inbox.record r WHERE r.applied_at IS NULL AND NOT EXISTS "
                      "(SELECT 1 FROM sync.transform_quarantine q WHERE q.inbox_id = r.inbox_id AND q.resolved_at IS NULL "
                      "AND q.reason <> '')")
    assert not stuck, f"inbox rows neither applied nor quarantined: {stuck[:10]}"


def assert_second_run_is_a_no_op(dsn: str) -> None:
    before = rows(dsn, "SELECT quarantine_id, attempts, resolved_at FROM sync.transform_quarantine ORDER BY 1")
    again = transform(dsn)
    assert all(s["inbox_rows"] == 0 and s["quarantined"] == 0 for s in again), again
    assert rows(dsn, "SELECT quarantine_id, attempts, resolved_at FROM sync.transform_quarantine ORDER BY 1") == before


# -- what the store accepts, the CRM now accepts (each of these failed the whole transform before) -----
def test_a_country_name_where_a_code_belongs_stops_nothing(crm, store):
    customers = copy.deepcopy(store["customers"])
    german = next(c for c in customers if c["billing"].get("country"))
    german["billing"]["country"], german["shipping"]["country"] = "Germany", "de"
    orders = copy.deepcopy(store["orders"])
    for o in orders[-5:]:  # orders placed after it, with the same free text
        o["billing"]["country"] = "Germany"
    land_store(crm, store, customers=customers, orders=orders)
    transform(crm)
    assert one(crm, "SELECT country_iso2, country_raw FROM crm.customer_address WHERE customer_id = %s "
                    "AND kind = 'billing'", german["id"]) == (None, "Germany")
    assert one(crm, "SELECT country_iso2, country_raw FROM crm.customer_address WHERE customer_id = %s "
                    "AND kind = 'shipping'", german["id"]) == ("DE", None)
    assert one(crm, "SELECT count(*) FROM crm.sales_order")[0] == len(orders)
    assert one(crm, "SELECT count(*) FROM crm.sales_order_address WHERE country_raw = 'Germany'")[0] == 5
    assert one(crm, "SELECT count(*) FROM sync.transform_quarantine")[0] == 0
    run_checks(crm)


def test_a_fractional_stock_quantity_is_kept(crm, store):
    products = copy.deepcopy(store["products"])
    products[0].update(manage_stock=True, stock_quantity=2.5)
    land_store(crm, store, products=products)
    transform(crm)
    assert one(crm, "SELECT stock_quantity FROM crm.product WHERE id = %s", products[0]["id"])[0] == Decimal("2.5")
    assert one(crm, "SELECT count(*) FROM crm.product")[0] == len(products) + len(store["variations"])
    run_checks(crm)


def test_an_idr_total_past_numeric_14_4_is_kept(crm, store):
    orders = copy.deepcopy(store["orders"])
    big = next(o for o in orders if o["line_items"] and o["status"] != "trash")
    big["currency"] = "IDR"
    for holder, field in ((big, "total"), (big["line_items"][0], "total"), (big["line_items"][0], "subtotal")):
        holder[field] = str(Decimal(holder[field]) + Decimal("1e15"))
    land_store(crm, store, orders=orders)
    transform(crm)
    assert one(crm, "SELECT total, currency FROM crm.sales_order WHERE id = %s", big["id"]) == (Decimal(big["total"]), "IDR")
    assert Decimal(big["total"]) > Decimal("1e15")
    assert one(crm, "SELECT count(*) FROM crm.sales_order")[0] == len(orders)
    run_checks(crm)  # the lines still add up to the total


def test_a_category_slug_reused_after_a_delete(crm, store):
    cats = store["categories"]
    land(crm, "product_categories", cats)
    transform(crm)
    parents = {c["parent"] for c in cats}
    leaf = next(c for c in cats if c["id"] not in parents)
    newcomer = {**leaf, "id": max(c["id"] for c in cats) + 1, "name": "Reborn"}
    land(crm, "product_categories", [{"id": leaf["id"], "deleted": True}], deletes=True)
    land(crm, "product_categories", [newcomer])
    # ... and two categories swapping slugs, one side seen first
    a, b = [c for c in cats if c["id"] != leaf["id"]][:2]
    land(crm, "product_categories", [{**a, "slug": b["slug"]}])
    transform(crm)
    assert rows(crm, "SELECT id, deleted_at IS NOT NULL FROM crm.product_category WHERE slug = %s ORDER BY id",
                leaf["slug"]) == [(leaf["id"], True), (newcomer["id"], False)]
    assert one(crm, "SELECT slug FROM crm.product_category WHERE id = %s", a["id"])[0] == b["slug"]
    assert one(crm, "SELECT count(*) FROM sync.transform_quarantine")[0] == 0
    run_checks(crm)


def test_nul_lands_and_applies(crm, store):
    customers = copy.deepcopy(store["customers"])
    odd = next(c for c in customers if c["billing"].get("address_1"))
    odd["first_name"] = "Ann\u0000Marie"  # valid JSON, not valid PostgreSQL text
    odd["meta_data"].append({"id": 999999, "key": "note\u0000", "value": ["\u0000"]})
    result = land(crm, "customers", customers)
    assert (result.landed, result.quarantined) == (len(customers), 0)
    assert land(crm, "customers", [odd]).skipped == 1, "the same record read again is still skipped"
    transform(crm)
    assert one(crm, "SELECT first_name FROM crm.customer WHERE id = %s", odd["id"])[0] == "Ann\ufffdMarie"
    assert one(crm, "SELECT value FROM crm.customer_meta WHERE meta_id = 999999")[0] == ["\ufffd"]
    assert one(crm, "SELECT count(*) FROM crm.customer")[0] == len(customers)


def test_lone_surrogates_land_and_apply(crm, store):
    customers = copy.deepcopy(store["customers"])
    odd = next(c for c in customers if c["billing"].get("address_1"))
    odd["billing"]["city"] = "K\ud800ln"  # "\ud800" alone: valid JSON, not UTF-8
    odd["meta_data"].append({"id": 999999, "key": "k", "value": {"\udfff": 1}})
    assert land(crm, "customers", customers).landed == len(customers)
    assert land(crm, "customers", [odd]).skipped == 1
    transform(crm)
    assert one(crm, "SELECT city FROM crm.customer_address WHERE customer_id = %s AND kind = 'billing'",
               odd["id"])[0] == "K\ufffdln"
    assert one(crm, "SELECT count(*) FROM crm.customer")[0] == len(customers)


# -- landing: whatever a store returns lands or is quarantined with its reason, never stalls -----------
def test_landing_takes_or_quarantines_anything(crm, store):
    # Copies carry no lines (line, tax, shipping, fee and coupon ids are global keys in the CRM).
    order = store["orders"][0]
    bare = {**order, **{k: [] for k in ("line_items", "tax_lines", "shipping_lines", "fee_lines", "coupon_lines")}}
    nested: object = "bottom"
    for _ in range(300):
        nested = {"deeper": [nested]}
    hostile = [
        ["not", "a", "record"], "a string", 42, None, {},
        {**bare, "id": True}, {**bare, "id": 2**70},
        {**bare, "id": 901, "date_modified_gmt": "0000-00-00T00:00:00"},  # matches the schema, no date
        {**bare, "id": 902, "date_modified_gmt": "2026-02-30T10:00:00"},
        {**bare, "id": 903, "customer_note": "nul \u0000 here", "billing": {**order["billing"], "city": "\udfff"}},
        {**bare, "id": 904, "meta_data": [{"id": 1, "key": "deep", "value": nested}]},
        {**bare, "id": 905, "customer_note": "x" * 2_000_000},
        {**bare, "id": 906, "discount_total": float("nan"), "cart_tax": float("inf")},
        {**bare, "id": 907, "meta_data": [{"id": 1, "key": "\u0000", "value": 10**300}]},
        {**bare, "id": 908, "customer_note": "x" * 17_000_000},
        {**bare, "id": 909, "line_items": "oops"},
        order,  # and a good one beside them
    ]
    result = land(crm, "orders", hostile)
    assert result.read == len(hostile) == result.landed + result.skipped + result.quarantined
    landed = {r[0] for r in rows(crm, "SELECT source_key FROM inbox.record")}
    assert landed == {str(order["id"]), str(2**70), "903", "904", "905", "907"}
    quarantined = rows(crm, "SELECT source_key, reason FROM sync.quarantine ORDER BY quarantine_id")
    assert len(quarantined) == result.quarantined == 11 and all(reason for _, reason in quarantined)
    reasons = dict(quarantined[5:])
    assert "not a date" in reasons["901"] and "not a date" in reasons["902"]
    assert "NaN" in reasons["906"] and "exceeds the landing limit" in reasons["908"]
    # a lookup keyed by code: a key of the wrong type, a key holding NUL
    result = land(crm, "countries", [{"code": {"a": 1}, "name": "x"}, {"code": "D\u0000E"}, {"code": "DE", "name": "Germany"}])
    assert (result.landed, result.quarantined) == (1, 2)
    # the entity goes on: the transform applies what landed and quarantines what the model rejects
    transform(crm)
    assert_nothing_left_behind(crm)
    assert one(crm, "SELECT count(*) FROM crm.sales_order WHERE id = %s", order["id"])[0] == 1


# -- quarantine: bisected out of its batch, the rest applies, later steps run ----------------------------
def test_a_bad_row_is_quarantined_and_the_rest_applies(crm, store):
    orders = copy.deepcopy(store["orders"])
    customers = copy.deepcopy(store["customers"])
    bad_order, bad_customer = orders[len(orders) // 2], customers[3]
    bad_order["date_paid_gmt"] = "2026-02-30T10:00:00"  # the JSON Schema's pattern lets it through
    bad_customer["id"] = 2**70  # an absurd id: valid JSON, valid schema, no bigint
    land_store(crm, store, orders=orders, customers=customers)
    steps = {s["step"]: s for s in transform(crm)}
    assert steps["50_orders.sql"]["quarantined"] == 1 and steps["50_orders.sql"]["splits"] >= 1
    open_rows = rows(crm, "SELECT q.entity, q.source_key, q.step, q.sqlstate, q.reason, q.record->>'date_paid_gmt', "
                          "q.attempts, v.crm_version_inbox_id FROM sync.transform_quarantine q "
                          "JOIN sync.transform_quarantine_open v USING (quarantine_id) ORDER BY 1")
    assert [(r[0], r[1], r[2], r[3]) for r in open_rows] == [
        ("customers", str(2**70), "30_customers.sql", "22003"), ("orders", str(bad_order["id"]), "50_orders.sql", "22008")]
    assert "out of range" in open_rows[0][4] and "2026-02-30" in open_rows[1][4]
    assert open_rows[1][5] == "2026-02-30T10:00:00" and open_rows[1][6] == 1 and open_rows[1][7] is None
    # Every other record of every step applied, the steps after the failures included.
    assert one(crm, "SELECT count(*) FROM crm.sales_order")[0] == len(orders) - 1
    assert one(crm, "SELECT count(*) FROM crm.customer")[0] == len(customers) - 1
    assert one(crm, "SELECT count(*) FROM crm.refund")[0] == len(store["refunds"])
    assert one(crm, "SELECT count(*) FROM crm.subscription")[0] == len(store["subscriptions"])
    assert_nothing_left_behind(crm)
    run_checks(crm)
    assert_second_run_is_a_no_op(crm)


def test_a_quarantined_newer_version_leaves_the_older_in_the_crm_until_fixed(crm, store):
    a, b, c = copy.deepcopy([x for x in store["customers"] if x["date_modified_gmt"]][:3])
    land(crm, "customers", [a, b])
    transform(crm)
    v1_inbox = dict(rows(crm, "SELECT source_key, inbox_id FROM inbox.record"))
    # v2 of a and b: the store took them without a role; the model requires one
    a2 = {**a, "role": None, "first_name": "Ada2", "date_modified_gmt": later(a["date_modified_gmt"])}
    b2 = {**b, "role": None, "first_name": "Bob2", "date_modified_gmt": later(b["date_modified_gmt"])}
    # c arrives as a bad v2 before a good, older v1 (order independence within one batch)
    c2 = {**c, "role": None, "first_name": "Cy2", "date_modified_gmt": later(c["date_modified_gmt"])}
    land(crm, "customers", [a2, b2, c2])
    land(crm, "customers", [c])
    transform(crm)
    names = dict(rows(crm, "SELECT id, first_name FROM crm.customer"))
    assert (names[a["id"]], names[b["id"]], names[c["id"]]) == (a["first_name"], b["first_name"], c["first_name"])
    held = dict(rows(crm, "SELECT source_key, crm_version_inbox_id FROM sync.transform_quarantine_open"))
    assert held[str(a["id"])] == v1_inbox[str(a["id"])], "the quarantine says which version the CRM shows"
    assert set(held) == {str(a["id"]), str(b["id"]), str(c["id"])}
    assert "null value in column \"role\"" in one(crm, "SELECT reason FROM sync.transform_quarantine LIMIT 1")[0]
    run_checks(crm)
    # b is fixed at the store: its v3 lands and applies, and its quarantined v2 is moot
    b3 = {**b, "first_name": "Bob3", "date_modified_gmt": later(b["date_modified_gmt"], 2)}
    land(crm, "customers", [b3])
    transform(crm)
    assert one(crm, "SELECT first_name FROM crm.customer WHERE id = %s", b["id"])[0] == "Bob3"
    assert rows(crm, "SELECT resolution FROM sync.transform_quarantine WHERE source_key = %s", str(b["id"])) == [("superseded",)]
    # a retry before any fix: still quarantined, one attempt more
    assert retry_quarantine(crm)["still_quarantined"] == 2
    assert one(crm, "SELECT min(attempts) FROM sync.transform_quarantine WHERE resolved_at IS NULL")[0] == 2
    # the model is widened (a migration would do this); re-applying now brings a2 and c2 in
    with psycopg.connect(crm) as conn:
        conn.execute("ALTER TABLE crm.customer ALTER role DROP NOT NULL")
    result = retry_quarantine(crm)
    assert (result["retried"], result["resolved"], result["still_quarantined"]) == (2, 2, 0)
    names = dict(rows(crm, "SELECT id, first_name FROM crm.customer"))
    assert (names[a["id"]], names[b["id"]], names[c["id"]]) == ("Ada2", "Bob3", "Cy2")
    assert one(crm, "SELECT count(*) FROM sync.transform_quarantine_open")[0] == 0
    assert_nothing_left_behind(crm)
    assert_second_run_is_a_no_op(crm)


def test_a_failing_step_does_not_stop_the_later_ones(crm, store, tmp_path, monkeypatch):
    import store_sync.crm.transform as runner

    broken = tmp_path / "sql"
    shutil.copytree(runner.SQL, broken)
    path = broken / "transform" / "20_product_categories.sql"
    path.write_text(path.read_text().replace("payload->>'slug'", "payload->>'slug' || no_such_column", 1))
    monkeypatch.setattr(runner, "SQL", broken)
    land_store(crm, store)
    with pytest.raises(TransformFailed, match=r"20_product_categories\.sql: UndefinedColumn"):
        transform(crm)
    assert one(crm, "SELECT count(*) FROM crm.product_category")[0] == 0
    assert one(crm, "SELECT count(*) FROM crm.sales_order")[0] == len(store["orders"])
    assert one(crm, "SELECT count(*) FROM crm.subscription")[0] == len(store["subscriptions"])
    assert one(crm, "SELECT count(*) FROM sync.transform_quarantine")[0] == 0, "a bug in the SQL is no bad record"
    monkeypatch.undo()
    transform(crm)  # fixed: the categories apply now
    assert one(crm, "SELECT count(*) FROM crm.product_category")[0] == len(store["categories"])
    run_checks(crm)


def test_retry_command_and_dag(crm, store, dagbag, monkeypatch, capsys):
    from store_sync.crm.transform import main

    monkeypatch.setenv("CRM_DATABASE_URL", crm)
    subs = copy.deepcopy(store["subscriptions"])
    subs[0]["billing_interval"] = subs[1]["billing_interval"] = 0  # paused by a plugin: the model wants > 0
    land_store(crm, store, subscriptions=subs)
    transform(crm)
    ids = [r[0] for r in rows(crm, "SELECT quarantine_id FROM sync.transform_quarantine ORDER BY 1")]
    assert len(ids) == 2
    assert main(["--list-quarantine"]) == 1
    assert "subscription_billing_interval_check" in capsys.readouterr().out
    with psycopg.connect(crm) as conn:  # the fix, as a migration would bring it
        conn.execute("ALTER TABLE crm.subscription DROP CONSTRAINT subscription_billing_interval_check")
    assert main(["--retry-quarantine", "--id", str(ids[0])]) == 1, "the other one is still open"
    assert "retried 1, resolved 1, still quarantined 0" in capsys.readouterr().out
    run = dagbag.get_dag("crm_retry_quarantine").test(run_conf={"quarantine_ids": [ids[1]]})
    assert run.state == "success"
    assert one(crm, "SELECT count(*) FROM sync.transform_quarantine_open")[0] == 0
    assert rows(crm, "SELECT DISTINCT resolution FROM sync.transform_quarantine") == [("applied",)]
    assert one(crm, "SELECT count(*) FROM crm.subscription WHERE billing_interval = 0")[0] == 2
    assert main(["--retry-quarantine"]) == 0
    run_checks(crm)


def test_retry_dag_form_rejects_bad_input(dagbag):
    from airflow.sdk.definitions.param import ParamsDict

    dag = dagbag.get_dag("crm_retry_quarantine")
    for bad in ({"quarantine_ids": ["x"]}, {"quarantine_ids": [0]}, {"entities": ["unicorns"]}):
        params = ParamsDict(dag.params)
        with pytest.raises(Exception):  # noqa: B017 - ParamValidationError, surfaced by the trigger form
            params.update(bad)
            params.validate()


# -- fuzz: hostile but valid JSON, through the landing and every transform --------------------------------
ODD_VALUES = [None, "", "N/A", "x" * 5000, "\u0000", "a\ud800b", "ǘ😀 ‮rtl", -1, 0, 2**63, 2**70, 1e308, 0.5, -0.0,
              True, [], {}, [None], {"nested": {"deeper": [1, "2"]}}, "Germany", "2026-02-30T00:00:00",
              "9999-99-99T99:99:99", "1e15", "1000000000000000.0000", "12.3456789", "-5", "0000-00-00T00:00:00"]


def mutate(record: dict, rng: random.Random) -> dict:
    """1-3 hostile edits at random places: a value replaced, a key removed, an object nulled."""
    out = copy.deepcopy(record)
    for _ in range(rng.randint(1, 3)):
        holder, path = out, []
        while True:  # walk down a random branch, stopping at some depth
            keys = list(holder) if isinstance(holder, dict) else list(range(len(holder)))
            keys = [k for k in keys if k not in ("id", "_links")] if holder is out else keys
            if not keys:
                break
            key = rng.choice(keys)
            child = holder[key]
            if isinstance(child, dict | list) and child and rng.random() < 0.6:
                holder, path = child, [*path, key]
                continue
            action = rng.random()
            if action < 0.15 and isinstance(holder, dict):
                del holder[key]
            else:
                holder[key] = rng.choice(ODD_VALUES)
            break
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_payloads_apply_or_wait_in_quarantine(crm, store, seed):
    rng = random.Random(seed)
    versions: dict[tuple[str, str], list[tuple[dict, bool]]] = {}  # (entity, key) -> [(record, is_good)]
    read = landed_or_skipped_or_quarantined = 0
    for name, (entity_name, _) in EXPORTS.items():
        page, then = [], []  # a page keeps one version per record: second versions land on later pages
        for record in store[name]:
            key = (entity_name, str(record["id"]))
            roll = rng.random()
            if roll < 0.3:  # one hostile version only
                page.append(mutate(record, rng))
                versions[key] = [(page[-1], False)]
            elif roll < 0.5:  # the good version, and a newer hostile one, in either order
                bad = mutate(record, rng)
                if isinstance(bad.get("date_modified_gmt"), str) and bad["date_modified_gmt"][:4].isdigit():
                    try:
                        bad["date_modified_gmt"] = later(bad["date_modified_gmt"])
                    except ValueError:
                        pass
                first, second = (record, bad) if rng.random() < 0.5 else (bad, record)
                page.append(first)
                then.append(second)
                versions[key] = [(record, True), (bad, False)]
            else:
                page.append(record)
                versions[key] = [(record, True)]
        for records in (page, then):
            rng.shuffle(records)
            for start in range(0, len(records), 17):  # several pages per entity
                result = land(crm, entity_name, records[start:start + 17])
                read += result.read
                landed_or_skipped_or_quarantined += result.landed + result.skipped + result.quarantined
    assert read == landed_or_skipped_or_quarantined
    assert one(crm, "SELECT count(*) FROM sync.quarantine WHERE coalesce(reason, '') = ''")[0] == 0

    steps = transform(crm)  # raises if any step stalled
    assert all("error" not in s for s in steps)
    assert_nothing_left_behind(crm)

    # The good records beside the hostile ones applied; where a hostile newer version was quarantined,
    # the CRM shows the good older one; where it applied, the newer one.
    inbox = {(e, k, h): i for i, e, k, h in rows(crm, "SELECT inbox_id, entity, source_key, payload_hash FROM inbox.record")}
    quarantined = {r[0] for r in rows(crm, "SELECT inbox_id FROM sync.transform_quarantine WHERE resolved_at IS NULL")}
    from store_sync.inbound.landing import fingerprint
    from store_sync.registry import entities

    tables = {e: t for e, t in EXPORTS.values()}
    checked = 0
    for (entity_name, key), recs in versions.items():
        good = [r for r, ok in recs if ok]
        if not good:
            continue
        held = one(crm, f"SELECT landed_inbox_id FROM {tables[entity_name]} WHERE id = %s", int(key))
        assert held, f"{entity_name} {key}: a good record is missing from the CRM"
        good_id = inbox.get((entity_name, key, fingerprint(good[0], entities()[entity_name].volatile)[1]))
        assert good_id, f"{entity_name} {key}: a good record did not land"
        bad_ids = [inbox.get((entity_name, key, fingerprint(r, entities()[entity_name].volatile)[1]))
                   for r, ok in recs if not ok]
        newer_bad_applied = [i for i in bad_ids if i and i not in quarantined]
        if held[0] != good_id:
            assert held[0] in newer_bad_applied, f"{entity_name} {key}: the CRM shows neither version"
        checked += 1
    assert checked > 50
    assert one(crm, "SELECT count(*) FROM sync.transform_quarantine")[0] > 0, "the fuzz must have bitten"
    assert_second_run_is_a_no_op(crm)
