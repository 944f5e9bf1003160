"""The store webhooks the package needs: registered on the store itself, kept enabled, and pruned.

Webhooks are a latency shortcut for customers (the API has no date filter for them, so without
webhooks a changed customer waits for the periodic scan). The store delivers them to the receiver the
Airflow api-server mounts (``webhook_receiver.py``) at ``<webhook_url>/store-webhooks/receive``.

Configuration, on the ``store_api`` connection (extras) or in the environment:

* ``webhook_url``: the public URL of the Airflow api-server as the store can reach it (a real store
  refuses loopback and private addresses: ``wp_safe_remote_request``). Without it webhooks are off
  and the customer scan is relied on, which the log says plainly;
* ``webhook_secret`` (or ``STORE_WEBHOOK_SECRET``, which wins): signs every delivery; never logged.

Command line: ``python -m store_sync.store.webhooks register`` (what the ``store_register_webhooks`` DAG
runs, hourly, and ``make demo`` at start).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)
RECEIVER_PATH = "/store-webhooks/receive"
TOPICS = ("customer.created", "customer.updated", "customer.deleted")
NAME_PREFIX = "CRM sync"


def delivery_url(webhook_url: str) -> str:
    """``webhook_url`` may be the api-server's base URL or already the receiver's full URL."""
    base = webhook_url.strip().rstrip("/")
    return base if base.endswith(RECEIVER_PATH) else base + RECEIVER_PATH


def webhook_secret(store_conn_id: str = "store_api") -> str | None:
    if secret := os.environ.get("STORE_WEBHOOK_SECRET"):
        return secret
    from store_sync.store.hooks import StoreApiHook

    return StoreApiHook(store_conn_id).extra_text("webhook_secret")


def ensure_webhooks(client, url: str, secret: str, topics=TOPICS, *, push_secret: bool = False) -> dict[str, list]:
    """Make the store hold exactly one active webhook per topic delivering to ``url``.

    Creates the missing ones; re-enables ``paused`` and ``disabled`` ones (the store disables a webhook
    after repeated failed deliveries and never re-enables it: class-wc-webhook.php, failed_delivery);
    removes extra copies pointing at ``url`` (two runs racing, or an older tool), keeping the oldest.
    The secret is write-only in the API (``context: edit``, class-wc-rest-webhooks-v1-controller.php), so
    it cannot be compared: it is sent on create and re-enable, and on every webhook with
    ``push_secret`` (after rotating it). Returns ids by what was done; never the secret."""
    from store_sync.store.client import StoreNotFound

    done: dict[str, list] = {"created": [], "enabled": [], "kept": [], "removed": []}
    # GET /webhooks is paged (10 by default) and lists every status unless told (status=all).
    mine = [w for w in client.iter_records("webhooks", {"status": "all", "orderby": "id", "order": "asc"})
            if delivery_url(w.get("delivery_url") or "") == url]
    for topic in topics:
        same = sorted((w for w in mine if w.get("topic") == topic), key=lambda w: int(w["id"]))
        if not same:
            made = client.post("webhooks", {"name": f"{NAME_PREFIX} {topic}", "topic": topic, "delivery_url": url,
                                            "secret": secret, "status": "active"})
            done["created"].append(made["id"])
            continue
        keep, extra = same[0], same[1:]
        if keep.get("status") != "active" or push_secret:
            # failure_count is not reset by re-enabling (set_status only): one failed delivery more
            # disables it again, one success clears it. That is the store's rule, not ours.
            client.put(f"webhooks/{keep['id']}", {"status": "active", "secret": secret})
            done["enabled" if keep.get("status") != "active" else "kept"].append(keep["id"])
        else:
            done["kept"].append(keep["id"])
        for dup in extra:
            try:
                client.request("DELETE", f"webhooks/{dup['id']}", {"force": True})
            except StoreNotFound:
                pass  # a racing run removed it first
            done["removed"].append(dup["id"])
    return done


def register_webhooks(store_conn_id: str = "store_api", *, push_secret: bool = False) -> dict:
    """Register the package's webhooks as the store connection says; ``{"status": "off"}`` without a URL."""
    from store_sync.store.config import ConfigError
    from store_sync.store.hooks import StoreApiHook

    hook = StoreApiHook(store_conn_id)
    base = hook.extra_text("webhook_url") or os.environ.get("STORE_WEBHOOK_URL")
    if not base:
        log.warning("Store webhooks are OFF: the store connection %r has no 'webhook_url' extra (the public URL of "
                    "the Airflow api-server, as the store can reach it). Changed customers are found by the "
                    "periodic customer scan instead, minutes later rather than seconds.", store_conn_id)
        return {"status": "off"}
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"store connection {store_conn_id!r}: 'webhook_url' must start with http:// or https://, "
                          f"got {base!r}")
    secret = webhook_secret(store_conn_id)
    if not secret:
        raise ConfigError(f"store connection {store_conn_id!r} has a 'webhook_url' but no 'webhook_secret' extra (nor "
                          f"STORE_WEBHOOK_SECRET): without it the store signs with a secret nobody here knows and "
                          f"every delivery would be refused")
    url = delivery_url(base)
    done = ensure_webhooks(hook.get_client(), url, secret, push_secret=push_secret)
    log.info("Store webhooks %s → %s: created %s, re-enabled %s, kept %s, removed duplicates %s",
             ", ".join(TOPICS), url, done["created"], done["enabled"], done["kept"], done["removed"])
    return {"status": "on", "delivery_url": url, **done}


def prune_events(dsn: str, keep_days: float = 7) -> int:
    """Delete webhook events older than ``keep_days`` that were consumed (or that nothing consumes).

    An entity's cycle records the last event it read in its watermark state (``webhook_event_id``);
    events of entities without such a mark are read by no one (their polling finds the changes)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "DELETE FROM sync.webhook_event e WHERE e.received_at < clock_timestamp() - make_interval(secs => %s) "
            "AND e.event_id <= coalesce((SELECT (w.state->>'webhook_event_id')::bigint FROM sync.watermark w "
            "WHERE w.entity = e.entity AND w.state ? 'webhook_event_id'), 9223372036854775807)",
            (float(keep_days) * 86400,)).rowcount


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] != "register":
        print(__doc__)
        return 2
    result = register_webhooks(push_secret="--push-secret" in argv)
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
