"""Is the CRM right? Compare it with the store, entity by entity, and print the differences.

    python -m store_sync.crm.reconcile [--entity orders ...] [--show 10]     (make reconcile)

For each entity with a ``reconcile`` block in the registry: counts, ids missing on either side,
source modified times, and a checksum of the mapped fields (store field → CRM column). Reads the
store with ``_fields`` (cheap pages of a few fields). Exits 1 when it finds a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

import psycopg

from store_sync.registry import Entity, entities
from store_sync.store.client import StoreClient


@dataclass
class Report:
    entity: str
    store_count: int = 0
    crm_count: int = 0
    missing_in_crm: list = field(default_factory=list)
    gone_from_store: list = field(default_factory=list)
    deleted_in_crm: list = field(default_factory=list)
    stale: list = field(default_factory=list)
    differing: list = field(default_factory=list)
    store_checksum: str = ""
    crm_checksum: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing_in_crm or self.gone_from_store or self.deleted_in_crm or self.stale or self.differing)


def norm(value) -> str:
    """One text form for both sides: numbers by value ("10.00" == 10), and 0, "" and None alike."""
    if value in (None, "", 0, "0"):
        return ""
    try:
        return format(Decimal(str(value)).normalize(), "f")
    except InvalidOperation:
        return str(value)


def reconcile_entity(dsn: str, client: StoreClient, spec: Entity, show: int = 10) -> Report:
    cfg = spec.reconcile or {}
    fields = cfg["fields"]
    report = Report(spec.name)
    wanted = ",".join(["id", *([spec.cursor] if spec.cursor else []), *fields])
    store: dict[str, tuple] = {}
    for status in spec.statuses:
        params = {"_fields": wanted, "orderby": "id", "order": "asc", **spec.params, **({"status": status} if status else {})}
        params.pop("dates_are_gmt", None)
        params["orderby"], params["order"] = "id", "asc"
        for page in client.iter_pages(spec.endpoint, params, 100):
            for r in page.records:
                modified = r.get(spec.cursor) if spec.cursor else None
                store[str(r["id"])] = (modified, tuple(norm(r.get(f)) for f in fields))
    columns = ", ".join(fields.values())
    # Trashed records are still listed by the store (status=trash): only hard deletes count as gone.
    # A trashed record deleted for good keeps status 'trash'; its row's last inbox row is the delete event.
    purged = "EXISTS (SELECT 1 FROM inbox.record r WHERE r.inbox_id = landed_inbox_id AND r.payload ? 'deleted')"
    gone = f"deleted_at IS NOT NULL AND (status IS DISTINCT FROM 'trash' OR {purged})" if "status" in fields.values() \
        else "deleted_at IS NOT NULL"
    where = f"WHERE {cfg['where']}" if cfg.get("where") else ""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT id, source_modified_at, {gone}, {columns} FROM {cfg['table']} {where}").fetchall()
    crm = {str(r[0]): (r[1], r[2], tuple(norm(v) for v in r[3:])) for r in rows}
    live_crm = {k: v for k, v in crm.items() if not v[1]}
    report.store_count, report.crm_count = len(store), len(live_crm)
    report.missing_in_crm = sorted(set(store) - set(crm), key=int)
    report.gone_from_store = sorted(set(live_crm) - set(store), key=int)
    # Soft-deleted in the CRM while the store still has the record: a delete the store never made.
    report.deleted_in_crm = sorted((k for k in set(store) & set(crm) if crm[k][1]), key=int)
    for key in sorted(set(store) & set(live_crm), key=int):
        s_mod, s_vals = store[key]
        c_mod, _, c_vals = crm[key]
        if s_mod and c_mod and datetime.fromisoformat(s_mod).replace(tzinfo=UTC) != c_mod:
            report.stale.append(f"{key}: store {s_mod}Z, CRM {c_mod:%Y-%m-%dT%H:%M:%S}Z")
        elif s_vals != c_vals:
            diffs = [f"{f}: store {a!r} / CRM {b!r}" for f, a, b in zip(fields, s_vals, c_vals, strict=True) if a != b]
            report.differing.append(f"{key}: " + ", ".join(diffs))
    digest = lambda items: hashlib.md5(json.dumps(sorted(items)).encode()).hexdigest()[:12]  # noqa: E731
    report.store_checksum = digest([(k, v[1]) for k, v in store.items()])
    report.crm_checksum = digest([(k, v[2]) for k, v in crm.items() if k in store])
    return report


def reconcile(dsn: str, client: StoreClient, names: list[str] | None = None) -> list[Report]:
    return [reconcile_entity(dsn, client, spec) for name, spec in entities().items()
            if spec.reconcile and (not names or name in names)]


def render(reports: list[Report], show: int = 10) -> str:
    lines = []
    for r in reports:
        verdict = "OK" if r.ok else "DIFFERENT"
        lines.append(f"{r.entity:<14} store {r.store_count:>8}  CRM {r.crm_count:>8}  checksum store {r.store_checksum} "
                     f"CRM {r.crm_checksum}  {verdict}")
        for label, items in (("missing in the CRM", r.missing_in_crm), ("gone from the store, live in the CRM",
                             r.gone_from_store), ("deleted in the CRM, live at the store", r.deleted_in_crm), ("older in the CRM", r.stale), ("different values", r.differing)):
            if items:
                lines.append(f"    {len(items)} {label}: " + "; ".join(map(str, items[:show]))
                             + (" …" if len(items) > show else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", action="append")
    parser.add_argument("--show", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ.setdefault("AIRFLOW_CONN_STORE_API", json.dumps({
        "conn_type": "http", "host": "http://127.0.0.1:8765", "login": "ck_sandbox", "password": "cs_sandbox"}))
    from store_sync.store.hooks import StoreApiHook
    from store_sync.tasks import crm_dsn

    client = StoreApiHook().get_client()
    reports = reconcile(crm_dsn(), client, args.entity)
    print(render(reports, args.show))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
