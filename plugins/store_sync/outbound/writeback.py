"""Write-back: send the outbox's requests to the store, exactly once in effect.

A request (``sync.outbox``, filled by ``crm.request_order_status`` and its siblings) goes through:

1. **claim**: the due requests, oldest first and one per record at a time, are marked ``sent`` (with
   ``attempts + 1``) and committed *before* anything is written to the store;
2. **read the store**: one ``include=`` read per 100 records gives each record's status, modified time
   and meta. A record carrying our marker ``_crm_outbox_request`` = the request's id already has the
   change (a task killed between the store's answer and the CRM's commit): marked ``applied`` without
   a write. A record already in the requested state: ``applied`` without a write. A record the store
   changed after the version the request was based on, in a field the request changes: handled by
   ``sync.outbox_policy`` (``conflict`` by default: both versions kept for a person);
3. **write**: order statuses through ``POST orders/batch`` (100 per call, each item's own error read),
   with the marker in the same write; subscriptions one by one with ``transition_status`` (the store's
   rules apply; a refusal is an uncaught exception there, HTTP 500 even inside a batch, so a batch
   would fail whole: WooCommerce Subscriptions ``WC_Subscription::update_status``); refunds with
   ``POST orders/{id}/refunds`` and ``api_refund=false``, marked in their meta and reason;
4. **record**: ``applied`` with the store's modified time, ``rejected`` with the store's message,
   back to ``pending`` with a backoff after a transport failure (the next attempt reads the marker
   first), ``failed`` after ``max_attempts``. The CRM's own tables change only when the store's new
   version comes back through the normal sync (``confirmed_at``), so nothing loops.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

from store_sync.store.client import StoreApiError, StoreAuthError, StoreClient, StoreNotFound

log = logging.getLogger(__name__)
MARKER = "_crm_outbox_request"
BATCH = 100
LEASE = timedelta(minutes=5)  # a request left 'sent' longer than this by a dead task is taken again
REFUSED = re.compile(r'Unable to change subscription status to "([^"]+)"')


@dataclass
class Outcome:
    sent: int = 0
    applied: int = 0
    already_true: int = 0
    rejected: int = 0
    conflict: int = 0
    retry: int = 0
    failed: int = 0
    batch_calls: int = 0
    would_send: list = field(default_factory=list)

    def bump(self, state: str) -> None:
        setattr(self, state, getattr(self, state) + 1)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "would_send"}
        if self.would_send:
            out["would_send"] = self.would_send[:200]
        return out


def gmt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value[:19]).replace(tzinfo=UTC) if value else None


def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(600, 2 ** min(attempts, 10)))


# -- claiming --------------------------------------------------------------------------------------
DUE = """
    SELECT o.request_id FROM sync.outbox o
    WHERE o.target_system = 'store' AND (
          (o.state = 'pending' AND o.next_attempt_at <= now())
       OR (o.state = 'sent' AND o.sent_at < now() - %(lease)s::interval))
      AND (%(ids)s::bigint[] IS NULL OR o.request_id = ANY(%(ids)s))
      AND NOT EXISTS (SELECT 1 FROM sync.outbox e WHERE e.target_system = o.target_system AND e.entity = o.entity
                      AND e.record_id = o.record_id AND e.request_id < o.request_id
                      AND e.state IN ('pending', 'sent', 'conflict'))
    ORDER BY o.request_id LIMIT %(limit)s
"""


COLUMNS = ("request_id", "entity", "record_id", "action", "change", "note", "based_on_modified_at", "based_on",
           "attempts")


def due_args(limit: int, ids: list[int] | None) -> dict:
    return {"lease": f"{int(LEASE.total_seconds())} seconds", "ids": ids, "limit": limit}


def claim(conn: psycopg.Connection, limit: int, ids: list[int] | None) -> list[dict]:
    """Mark the due requests 'sent' and commit, so a killed task leaves a trace the next one reads."""
    with conn.transaction():
        rows = conn.execute(
            f"UPDATE sync.outbox SET state = 'sent', attempts = attempts + 1, sent_at = now() "
            f"WHERE request_id IN (SELECT request_id FROM sync.outbox WHERE request_id IN ({DUE}) "
            f"FOR UPDATE SKIP LOCKED) RETURNING {', '.join(COLUMNS)}", due_args(limit, ids)).fetchall()
    return sorted((dict(zip(COLUMNS, r, strict=True)) for r in rows), key=lambda r: r["request_id"])


def peek(conn: psycopg.Connection, limit: int, ids: list[int] | None) -> list[dict]:
    """What a claim would take, without taking it (dry runs)."""
    rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM sync.outbox WHERE request_id IN ({DUE}) "
                        f"ORDER BY request_id", due_args(limit, ids)).fetchall()
    return [dict(zip(COLUMNS, r, strict=True)) for r in rows]


def finish(conn: psycopg.Connection, request_id: int, state: str, *, error: str | None = None,
           result: dict | None = None, store_modified_at: datetime | None = None,
           store_version: dict | None = None) -> None:
    conn.execute(
        "UPDATE sync.outbox SET state = %s, last_error = %s, result = COALESCE(%s, result), "
        "store_modified_at = COALESCE(%s, store_modified_at), store_version = COALESCE(%s, store_version), "
        "finished_at = now() WHERE request_id = %s",
        (state, error, json.dumps(result) if result is not None else None, store_modified_at,
         json.dumps(store_version) if store_version is not None else None, request_id))


def retry_later(conn: psycopg.Connection, request: dict, error: str, max_attempts: int) -> str:
    if request["attempts"] >= max_attempts:
        finish(conn, request["request_id"], "failed", error=f"gave up after {request['attempts']} attempts: {error}")
        return "failed"
    conn.execute("UPDATE sync.outbox SET state = 'pending', last_error = %s, next_attempt_at = now() + %s "
                 "WHERE request_id = %s", (error, backoff(request["attempts"]), request["request_id"]))
    return "retry"


# -- reading the store -----------------------------------------------------------------------------
def read_records(client: StoreClient, entity: str, ids: list[int]) -> dict[int, dict]:
    """The store's current records by id (trashed ones too), ``include=`` 100 at a time."""
    found: dict[int, dict] = {}
    wanted = sorted(set(ids))
    for start in range(0, len(wanted), BATCH):
        chunk = wanted[start:start + BATCH]
        for status in ("any", "trash"):
            missing = [i for i in chunk if i not in found]
            if not missing:
                break
            page = client.get_page(entity, {"include": ",".join(map(str, missing)), "status": status}, 1, BATCH)
            found.update({int(r["id"]): r for r in page.records if isinstance(r, dict) and "id" in r})
    return found


def marker(record: dict) -> int:
    for m in record.get("meta_data") or []:
        if isinstance(m, dict) and m.get("key") == MARKER and str(m.get("value", "")).isdigit():
            return int(m["value"])
    return 0


def policy(conn: psycopg.Connection) -> dict[tuple[str, str], str]:
    return {(e, f): p for e, f, p in conn.execute("SELECT entity, field, policy FROM sync.outbox_policy")}


def decide(request: dict, record: dict | None, policies: dict) -> tuple[str, str | None]:
    """('write' | 'applied' | 'already' | 'conflict' | 'superseded' | 'gone', reason)."""
    if record is None:
        return "gone", f"{request['entity']} {request['record_id']} is not at the store any more"
    if request["action"] == "create_refund":
        return "write", None  # refunds are checked against the order's refunds, by marker
    if marker(record) >= request["request_id"]:
        return "applied", "the store already carries this request's marker"
    fields = dict(request["change"])
    current = {"status": record.get("status"), "next_payment_date": (record.get("next_payment_date_gmt") or "")[:19]}
    wanted = {k: (v.replace(" ", "T") if k == "next_payment_date" else v) for k, v in fields.items()}
    if all(current.get(k) == v for k, v in wanted.items()):
        return "already", None
    base = request["based_on"] or {}
    store_moved = (gmt(record.get("date_modified_gmt")) or datetime.min.replace(tzinfo=UTC)) > (
        request["based_on_modified_at"] or datetime.min.replace(tzinfo=UTC))
    for name in fields:
        was = (base.get(name) or "")
        was = was.replace(" ", "T") if name == "next_payment_date" else was
        if store_moved and current.get(name) != was:
            rule = policies.get((request["entity"], name), "conflict")
            if rule == "conflict":
                return "conflict", (f"the store changed {name} to {current.get(name)!r} after the CRM's version "
                                    f"({was!r}, {request['based_on_modified_at']:%Y-%m-%d %H:%M:%S}Z)")
            if rule == "store_wins":
                return "superseded", f"the store changed {name} to {current.get(name)!r} since the request was made"
    return "write", None


# -- writing ---------------------------------------------------------------------------------------
def send(dsn: str, client: StoreClient, *, dry_run: bool = False, request_ids: list[int] | None = None,
         limit: int = 1000, max_attempts: int = 8) -> dict:
    """Send what is due (or just ``request_ids``); returns counts (small, safe for XCom)."""
    out = Outcome()
    with psycopg.connect(dsn, autocommit=True) as conn:
        policies = policy(conn)
        while True:
            requests = peek(conn, min(limit, BATCH), request_ids) if dry_run else claim(conn, min(limit, BATCH),
                                                                                       request_ids)
            if not requests:
                break
            by_entity: dict[str, list[dict]] = {}
            for r in requests:
                by_entity.setdefault(r["entity"], []).append(r)
            for entity, batch in by_entity.items():
                try:
                    records = read_records(client, entity, [r["record_id"] for r in batch])
                except (StoreAuthError, StoreNotFound):
                    raise
                except StoreApiError as exc:
                    for r in batch:
                        if not dry_run:
                            out.bump(retry_later(conn, r, f"reading the store failed: {exc}", max_attempts))
                    continue
                writes = []
                for r in batch:
                    verdict, reason = decide(r, records.get(r["record_id"]), policies)
                    if dry_run:
                        out.would_send.append({"request_id": r["request_id"], "entity": entity,
                                               "record_id": r["record_id"], "action": r["action"],
                                               "change": r["change"], "decision": verdict, "reason": reason})
                        continue
                    record = records.get(r["record_id"]) or {}
                    if verdict == "applied":
                        finish(conn, r["request_id"], "applied", store_modified_at=gmt(record.get("date_modified_gmt")),
                               result={"found": "marker"})
                        out.applied += 1
                    elif verdict == "already":
                        finish(conn, r["request_id"], "applied", store_modified_at=gmt(record.get("date_modified_gmt")),
                               result={"found": "already true at the store"})
                        out.already_true += 1
                    elif verdict == "conflict":
                        finish(conn, r["request_id"], "conflict", error=reason,
                               store_version={"status": record.get("status"),
                                              "next_payment_date_gmt": record.get("next_payment_date_gmt"),
                                              "date_modified_gmt": record.get("date_modified_gmt")})
                        out.conflict += 1
                    elif verdict in ("superseded", "gone"):
                        finish(conn, r["request_id"], "rejected", error=reason)
                        out.rejected += 1
                    else:
                        writes.append(r)
                if dry_run or not writes:
                    continue
                if entity == "orders":
                    status_writes = [r for r in writes if r["action"] == "set_status"]
                    for start in range(0, len(status_writes), BATCH):
                        write_order_batch(conn, client, status_writes[start:start + BATCH], out, max_attempts)
                    for r in writes:
                        if r["action"] == "create_refund":
                            write_refund(conn, client, r, out, max_attempts)
                else:
                    for r in writes:
                        write_subscription(conn, client, r, out, max_attempts)
                for r in writes:
                    leave_note(conn, client, entity, r)
            if dry_run or request_ids is not None:
                break
            limit -= len(requests)
            if limit <= 0:
                break
        if not dry_run:
            confirm(conn)
    counts = out.as_dict()
    log.info("write-back: %s", {k: v for k, v in counts.items() if k != "would_send"})
    return counts


def write_order_batch(conn, client: StoreClient, batch: list[dict], out: Outcome, max_attempts: int) -> None:
    body = {"update": [{"id": r["record_id"], **r["change"], "meta_data": [{"key": MARKER, "value": str(r["request_id"])}]}
                       for r in batch]}
    try:
        answer = client.post("orders/batch", body)
        out.batch_calls += 1
    except (StoreAuthError, StoreNotFound):
        raise
    except StoreApiError as exc:
        # The store may or may not have applied it: the next attempt reads the marker before writing.
        for r in batch:
            out.bump(retry_later(conn, r, f"batch write failed: {exc}", max_attempts))
        return
    out.sent += len(batch)
    items = {int(i.get("id") or 0): i for i in (answer or {}).get("update") or [] if isinstance(i, dict)}
    for r in batch:
        item = items.get(r["record_id"])
        if item is None:
            out.bump(retry_later(conn, r, "the store's batch answer did not mention this record", max_attempts))
        elif item.get("error"):
            err = item["error"]
            finish(conn, r["request_id"], "rejected", error=f"{err.get('code')}: {err.get('message')}",
                   result={"error": err})
            out.rejected += 1
        else:
            finish(conn, r["request_id"], "applied", store_modified_at=gmt(item.get("date_modified_gmt")),
                   result={"status": item.get("status"), "date_modified_gmt": item.get("date_modified_gmt")})
            out.applied += 1


def write_subscription(conn, client: StoreClient, r: dict, out: Outcome, max_attempts: int) -> None:
    change = dict(r["change"])
    if r["action"] == "set_status":
        body = {"transition_status": change["status"]}
    else:
        body = {"next_payment_date": change["next_payment_date"]}
    body["meta_data"] = [{"key": MARKER, "value": str(r["request_id"])}]
    endpoint = f"subscriptions/{r['record_id']}"
    try:
        answer = client.put(endpoint, body)
        out.sent += 1
    except (StoreAuthError, StoreNotFound):
        raise
    except StoreApiError as exc:
        if exc.status and exc.status < 500:
            finish(conn, r["request_id"], "rejected", error=f"{exc.code}: {exc.message}")
            out.rejected += 1
            return
        # A refused transition is an uncaught exception at the store (HTTP 500): read back what happened.
        refusal = refusal_note(client, r)
        current = read_records(client, "subscriptions", [r["record_id"]]).get(r["record_id"]) or {}
        if marker(current) >= r["request_id"]:
            finish(conn, r["request_id"], "applied", store_modified_at=gmt(current.get("date_modified_gmt")),
                   result={"found": "marker after an error answer"})
            out.applied += 1
        elif refusal:
            finish(conn, r["request_id"], "rejected", error=f"the store refused: {refusal}",
                   result={"http_status": exc.status})
            out.rejected += 1
        else:
            out.bump(retry_later(conn, r, f"write failed: {exc}", max_attempts))
        return
    wanted = change.get("status")
    if wanted and answer.get("status") != wanted:
        finish(conn, r["request_id"], "rejected",
               error=f"the store answered with status {answer.get('status')!r}, not {wanted!r}")
        out.rejected += 1
        return
    finish(conn, r["request_id"], "applied", store_modified_at=gmt(answer.get("date_modified_gmt")),
           result={"status": answer.get("status"), "next_payment_date_gmt": answer.get("next_payment_date_gmt"),
                   "date_modified_gmt": answer.get("date_modified_gmt")})
    out.applied += 1


def refusal_note(client: StoreClient, r: dict) -> str | None:
    """The store's note 'Unable to change subscription status to "x".' left by this attempt, if any."""
    wanted = r["change"].get("status")
    try:
        notes = client.get(f"subscriptions/{r['record_id']}/notes")
    except StoreApiError:
        return None
    for note in notes or []:
        text = (note or {}).get("note", "")
        found = REFUSED.search(text)
        if found and found.group(1) == wanted:
            return text
    return None


def write_refund(conn, client: StoreClient, r: dict, out: Outcome, max_attempts: int) -> None:
    tag = f"[CRM request {r['request_id']}]"
    endpoint = f"orders/{r['record_id']}/refunds"
    try:
        existing = [x for x in client.get(endpoint) or [] if tag in (x.get("reason") or "") or marker(x) == r["request_id"]]
        if existing:
            finish(conn, r["request_id"], "applied", result={"refund_id": existing[0].get("id"), "found": "marker"})
            out.applied += 1
            return
        change = dict(r["change"])
        body = {**change, "reason": f"{change.get('reason') or 'Refund'} {tag}",
                "meta_data": [{"key": MARKER, "value": str(r["request_id"])}]}
        answer = client.post(endpoint, body, max_retries=0)  # the next attempt looks for the marker first
        out.sent += 1
    except (StoreAuthError, StoreNotFound):
        raise
    except StoreApiError as exc:
        if exc.code in ("woocommerce_rest_cannot_create_order_refund", "woocommerce_rest_invalid_order_refund") \
                or (exc.status and exc.status < 500):
            finish(conn, r["request_id"], "rejected", error=f"{exc.code}: {exc.message}")
            out.rejected += 1
        else:
            out.bump(retry_later(conn, r, f"refund failed: {exc}", max_attempts))
        return
    finish(conn, r["request_id"], "applied", result={"refund_id": answer.get("id"), "amount": answer.get("amount")},
           store_modified_at=gmt(answer.get("date_created_gmt")))
    out.applied += 1


def leave_note(conn, client: StoreClient, entity: str, r: dict) -> None:
    """The request's note on the record, once: notes carry the request id and are looked for first."""
    if not r.get("note"):
        return
    state = conn.execute("SELECT state FROM sync.outbox WHERE request_id=%s", (r["request_id"],)).fetchone()[0]
    if state != "applied":
        return
    tag = f"[CRM request {r['request_id']}]"
    endpoint = f"{entity}/{r['record_id']}/notes"
    try:
        if any(tag in (n.get("note") or "") for n in client.get(endpoint) or []):
            return
        client.post(endpoint, {"note": f"{r['note']} {tag}", "customer_note": False}, max_retries=0)
    except StoreApiError as exc:  # the change itself is applied; a missing note is reported, not retried
        log.warning("request %s: the note was not left on %s %s: %s", r["request_id"], entity, r["record_id"], exc)


def confirm(conn) -> int:
    """Applied requests whose change the sync has brought back into the CRM."""
    return conn.execute(
        "UPDATE sync.outbox o SET confirmed_at = now() WHERE o.state = 'applied' AND o.confirmed_at IS NULL AND ("
        " (o.entity = 'orders' AND EXISTS (SELECT 1 FROM crm.sales_order s WHERE s.id = o.record_id"
        "   AND s.source_modified_at >= COALESCE(o.store_modified_at, o.finished_at)))"
        " OR (o.entity = 'subscriptions' AND EXISTS (SELECT 1 FROM crm.subscription s WHERE s.id = o.record_id"
        "   AND s.source_modified_at >= COALESCE(o.store_modified_at, o.finished_at))))").rowcount


def pending(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM ({DUE}) d", due_args(1, None)).fetchone()[0]
