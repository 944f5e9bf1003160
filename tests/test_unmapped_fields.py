"""The CRM keeps what it receives: every field path of every received record lands in a column of the
model (the registry's ``mapped`` list) or in its entity's extra table, never nowhere."""

from __future__ import annotations

import copy
import html
import re
from collections import defaultdict
from datetime import datetime, timedelta

import psycopg
import pytest

from store_sync.crm.migrations import migrate
from store_sync.crm.transform import transform
from store_sync.inbound.landing import land_page
from store_sync.registry import SCHEMAS, entity

# registry entity -> (extra table, its key column, the record's CRM id from its inbox key)
EXTRAS = {"customers": ("crm.customer_extra", "customer_id"), "products": ("crm.product_extra", "product_id"),
          "product_categories": ("crm.product_category_extra", "category_id"),
          "orders": ("crm.sales_order_extra", "order_id"), "refunds": ("crm.refund_extra", "refund_id"),
          "subscriptions": ("crm.subscription_extra", "subscription_id"),
          "order_notes": ("crm.sales_order_note_extra", "note_id")}
EXPORTS = {"categories": "product_categories", "customers": "customers", "products": "products",
           "variations": "products", "orders": "orders", "refunds": "refunds", "subscriptions": "subscriptions"}
TRANSFORMS = SCHEMAS.parent / "sql" / "transform"


def crm_id(source_key: str) -> int:
    return int(source_key.rsplit(":", 1)[-1])  # order notes: "<order id>:<note id>"


def walk(value, path: str = "", out: list | None = None) -> list[tuple[str, object]]:
    """Every leaf (scalar, or empty object / array) with its concrete path: `line_items[0].taxes[1].id`."""
    out = [] if out is None else out
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            walk(inner, f"{path}.{key}" if path else key, out)
    elif isinstance(value, list) and value:
        for i, inner in enumerate(value):
            walk(inner, f"{path}[{i}]", out)
    else:
        out.append((path, value))
    return out


def pattern(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def ancestors(path: str) -> list[str]:
    """`a.b[0].c` -> `a`, `a.b`, `a.b[0]`, `a.b[0].c`."""
    return [path[:m.start()] for m in re.finditer(r"\.|\[", path) if m.start()] + [path]


def at(record, path: str):
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        record = record[int(part[1:-1])] if part.startswith("[") else record[part]
    return record


def destination(name: str, path: str, value, extras: dict[str, object], record: dict) -> str | None:
    """Where a received leaf lands, or None."""
    fields = entity(name).field_map()
    for prefix in ancestors(path):
        if pattern(prefix) in entity(name).derived:
            return f"derived ({pattern(prefix)})"  # checked by test_derived_fields_are_what_the_crm_derives
        if fields.get(pattern(prefix)) == "column":
            return f"column ({pattern(prefix)})"
        if prefix in extras:
            assert extras[prefix] == at(record, prefix), f"{name} {path}: the extra row holds another value"
            return f"extra ({prefix})"
    if value in ({}, []) and fields.get(pattern(path)) in ("object", "array"):
        return "relation (none)"  # an empty list of lines is no line
    return None


def land(dsn: str, name: str, records: list, prefix: str = "") -> None:
    with psycopg.connect(dsn) as conn, conn.transaction():
        land_page(conn, entity(name), records, "test", key_prefix=prefix)


@pytest.fixture(scope="module")
def store(sandbox):
    client = sandbox.client()
    notes = {o["id"]: client.get(f"orders/{o['id']}/notes") for o in client.get("orders", {"per_page": 10})}
    return {name: sandbox.export(name) for name in EXPORTS}, notes


@pytest.fixture
def crm(crm_dsn, store):
    migrate(crm_dsn)
    exports, notes = store
    for export, name in EXPORTS.items():
        land(crm_dsn, name, exports[export])
    for order_id, order_notes in notes.items():
        land(crm_dsn, "order_notes", order_notes, f"{order_id}:")
    transform(crm_dsn)
    return crm_dsn


def extras_of(dsn: str, name: str) -> dict[int, dict[str, object]]:
    table, fk = EXTRAS[name]
    out: dict[int, dict[str, object]] = defaultdict(dict)
    with psycopg.connect(dsn) as conn:
        for key, path, value in conn.execute(f"SELECT {fk}, path, value FROM {table}"):
            out[key][path] = value
    return out


def test_every_received_field_lands_somewhere(crm):
    with psycopg.connect(crm) as conn:
        latest = conn.execute("SELECT r.entity, r.source_key, r.payload FROM inbox.latest l JOIN inbox.record r "
                              "USING (inbox_id) WHERE NOT l.is_delete AND r.entity = ANY(%s) ORDER BY 1, 2",
                              [list(EXTRAS)]).fetchall()
        assert not conn.execute("SELECT 1 FROM sync.transform_quarantine").fetchall()
    assert {r[0] for r in latest} == set(EXTRAS), "every entity is received"
    where: dict[tuple[str, str], set[str]] = defaultdict(set)
    nowhere: dict[tuple[str, str], list[str]] = defaultdict(list)
    extras = {name: extras_of(crm, name) for name in EXTRAS}
    for name, key, record in latest:
        for path, value in walk(record):
            lands = destination(name, path, value, extras[name].get(crm_id(key), {}), record)
            if lands is None:
                nowhere[(name, pattern(path))].append(key)
            else:
                where[(name, pattern(path))].add(re.sub(r"\[\d+\]", "[]", lands))
    for (name, path), lands in sorted(where.items()):
        print(f"{name:20} {path:45} -> {', '.join(sorted(lands))}")
    assert any("extra" in d for d in set().union(*where.values())), "fields the mapping leaves are kept"
    assert not nowhere, "received fields that land nowhere:\n" + "\n".join(
        f"  {name} {path} (records {', '.join(keys[:3])})" for (name, path), keys in sorted(nowhere.items()))


def test_derived_fields_are_what_the_crm_derives(crm, store):
    """A line's `derived` fields are not kept: each is what the CRM's own rows give (the line's total and
    quantity; the product's name, image and GTIN as the CRM holds them), for every line received."""
    exports, _ = store
    with psycopg.connect(crm) as conn:
        products = {pid: (parent, name, extra or {}) for pid, parent, name, extra in conn.execute(
            "SELECT p.id, p.parent_id, p.name, x.fields FROM crm.product p "
            "LEFT JOIN crm.product_extra_fields x ON x.product_id = p.id")}
    with_product = 0
    for export in ("orders", "refunds", "subscriptions"):
        assert set(entity(EXPORTS[export]).derived) == {f"line_items[].{f}" for f in
                                                        ("price", "image", "parent_name", "global_unique_id")}
        for record in exports[export]:
            for line in record["line_items"]:
                quantity, total = line["quantity"], float(line["total"])
                assert line["price"] == pytest.approx(total / quantity if quantity else 0), (export, line)
                product = products.get(line["variation_id"] or line["product_id"])
                if product is None or line["sku"] is None:
                    # a product the store no longer has (its sku is null then): it derives nothing either
                    assert (line["image"], line["global_unique_id"], line["parent_name"]) == (
                        {"id": 0, "src": ""}, None, None), (export, line)
                    continue
                with_product += 1
                parent, _, extra = product
                image = extra.get("image") if parent else (extra.get("images") or [{"id": 0}])[0]
                assert line["image"]["id"] == (image or {}).get("id", 0), (export, line, extra)
                assert line["global_unique_id"] == extra.get("global_unique_id", ""), (export, line)
                # the variation's parent product, as the CRM names it (text decoded; the store's is raw)
                expected = products[parent][1] if line["variation_id"] else None
                assert (line["parent_name"] and html.unescape(line["parent_name"])) == expected, (export, line)
    assert with_product > 20


def test_the_mapped_lists_name_what_the_transforms_read():
    """A path in `mapped` must be read by its entity's transform (no hiding a field by listing it)."""
    for name in EXTRAS:
        sql = (TRANSFORMS / entity(name).transform).read_text()
        for path in entity(name).mapped:
            field = path.rsplit(".", 1)[-1].removesuffix("[]")
            if field != "id" and not path.endswith("date_modified_gmt"):  # ids: the key; modified: the cursor
                # read by key (x->>'field') or as a column of a jsonb_to_record(set) expansion (field text)
                read = f"'{field}'" in sql or re.search(rf"[(,]\s*{re.escape(field)} (?:text|jsonb)\b", sql)
                assert read, f"{name}: {path} is listed as mapped but {entity(name).transform} never reads it"


def test_a_field_the_store_adds_tomorrow_is_kept_then_dropped_with_it(crm, store):
    exports, _ = store
    order = next(o for o in exports["orders"] if o["line_items"])
    customer = next(c for c in exports["customers"] if c["date_modified_gmt"])

    def newer(record: dict, days: int, **fields) -> dict:
        record = copy.deepcopy(record)
        record["date_modified_gmt"] = (datetime.fromisoformat(record["date_modified_gmt"])
                                       + timedelta(days=days)).isoformat()
        record.update(fields)
        return record

    tomorrow = newer(order, 1, loyalty={"tier": "gold", "points": 120})
    tomorrow["line_items"][0]["warranty_months"] = 24
    tomorrow["billing"]["vat_id"] = "DE123"
    land(crm, "orders", [tomorrow])
    land(crm, "customers", [newer(customer, 1, loyalty_tier="gold")])
    transform(crm)
    kept = extras_of(crm, "orders")[order["id"]]
    assert kept["loyalty"] == {"tier": "gold", "points": 120}
    assert kept["line_items[0].warranty_months"] == 24
    assert kept["billing.vat_id"] == "DE123"
    assert extras_of(crm, "customers")[customer["id"]]["loyalty_tier"] == "gold"

    land(crm, "orders", [newer(order, 2)])
    transform(crm)
    kept = extras_of(crm, "orders")[order["id"]]
    assert not {"loyalty", "line_items[0].warranty_months", "billing.vat_id"} & set(kept), kept
    assert kept, "the fields the mapping leaves are still kept"

    # An older version arriving late changes nothing (newest wins, as for the other children).
    land(crm, "orders", [newer(order, 1, loyalty={"tier": "late"})])
    transform(crm)
    assert "loyalty" not in extras_of(crm, "orders")[order["id"]]


def test_a_record_with_a_field_named_deleted_is_no_delete(crm, store):
    """Only what landed as the store's delete answer is a delete: a newer version of an order whose
    document has a top-level `deleted` field (a plugin's flag) is applied, not taken for a delete."""
    exports, _ = store
    order = copy.deepcopy(next(o for o in exports["orders"] if o["status"] == "processing"))
    order["date_modified_gmt"] = (datetime.fromisoformat(order["date_modified_gmt"]) + timedelta(days=1)).isoformat()
    order["deleted"] = False
    order["customer_note"] = "flagged by a plugin"
    land(crm, "orders", [order])
    transform(crm)
    with psycopg.connect(crm) as conn:
        row = conn.execute("SELECT status, customer_note, deleted_at FROM crm.sales_order WHERE id = %s",
                           (order["id"],)).fetchone()
    assert row == ("processing", "flagged by a plugin", None)
    assert extras_of(crm, "orders")[order["id"]]["deleted"] is False
