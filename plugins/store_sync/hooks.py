"""Airflow hook for the store: owns the ``store_api`` connection and nothing else.

Connection (``AIRFLOW_CONN_STORE_API`` or the UI, type HTTP):

* host: the shop URL, ``https://shop.example.com`` (``http://`` switches to OAuth 1.0a signing);
* login / password: the REST API consumer key and secret (``ck_…`` / ``cs_…``);
* extra (all optional): ``requests_per_second`` (5), ``max_in_flight`` (3), ``timeout`` (30),
  ``max_retries`` (6), ``verify`` (true, or a CA bundle path), ``query_string_auth`` (false),
  ``api_path`` (``/wp-json/wc/v3``).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from store_sync.client import DEFAULT_API_PATH, StoreClient


class StoreApiHook(BaseHook):
    conn_name_attr = "store_conn_id"
    default_conn_name = "store_api"
    conn_type = "http"
    hook_name = "WooCommerce store (REST API v3)"

    def __init__(self, store_conn_id: str = default_conn_name, **overrides: Any):
        super().__init__()
        self.store_conn_id = store_conn_id
        self.overrides = overrides
        self._client: StoreClient | None = None

    def get_conn(self) -> StoreClient:
        return self.get_client()

    def get_client(self) -> StoreClient:
        if self._client is None:
            conn = self.get_connection(self.store_conn_id)
            extra = conn.extra_dejson
            host = store_url(conn.host or "", conn.port, conn.schema)
            options = {
                "api_path": extra.get("api_path", DEFAULT_API_PATH),
                "timeout": float(extra.get("timeout", 30)),
                "verify": extra.get("verify", True),
                "requests_per_second": float(extra.get("requests_per_second", 5)),
                "max_in_flight": int(extra.get("max_in_flight", 3)),
                "max_retries": int(extra.get("max_retries", 6)),
                "query_string_auth": bool(extra.get("query_string_auth", False)),
                **self.overrides,
            }
            self._client = StoreClient(host, conn.login or "", conn.password or "", **options)
        return self._client

    def test_connection(self) -> tuple[bool, str]:
        try:
            env = self.get_client().check()
        except Exception as exc:
            return False, str(exc)
        return True, f"WooCommerce {env.get('version', '?')} answered with our key"


def store_url(host: str, port: int | None, schema: str | None) -> str:
    """The shop URL from a connection's parts: ``host`` may carry the scheme; HTTPS unless told."""
    scheme, _, rest = host.rpartition("://")
    scheme = scheme or (schema if schema in ("http", "https") else "https")
    netloc, _, path = rest.partition("/")
    if port and ":" not in netloc:
        netloc = f"{netloc}:{port}"
    return f"{scheme}://{netloc}" + (f"/{path}" if path else "")
