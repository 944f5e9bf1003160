"""Airflow hook for the store: owns the ``store_api`` connection and nothing else.

Connection (``AIRFLOW_CONN_STORE_API``, a secrets backend or the UI; type HTTP):

* host: the shop URL with its scheme, ``https://shop.example.com`` (``http://`` means plain HTTP, where
  requests are OAuth 1.0a signed). A host without a scheme follows Airflow's HTTP connection: the
  Schema field (``http``/``https``), else the URI's own scheme (``http://ck:cs@shop:8080`` is plain
  HTTP), else HTTPS. Any other Schema is the shop's sub-folder (WordPress installed under ``/shop``);
* login / password: the REST API consumer key and secret (``ck_…`` / ``cs_…``);
* extra (all optional; strings such as ``"false"`` or ``"5"`` are understood):
  ``requests_per_second`` (5), ``max_in_flight`` (3), ``timeout`` (30), ``max_retries`` (6),
  ``verify`` (true, false, or a CA bundle path), ``query_string_auth`` (false), ``api_path``
  (``/wp-json/wc/v3``), ``backfill_requests_per_second`` (2), ``backfill_max_in_flight`` (1),
  ``fetch_requests_per_second`` (1), ``fetch_max_in_flight`` (1), ``reconcile_requests_per_second`` (2),
  ``reconcile_max_in_flight`` (1), ``first_load_requests_per_second`` (10),
  ``first_load_max_in_flight`` (4), ``store_requests_per_second`` and
  ``store_max_in_flight`` (all lanes together; by default the largest lane's), and for webhooks
  ``webhook_url`` (the public URL of the Airflow api-server) and ``webhook_secret``.

The request budget is one per store, shared by every process through the CRM database
(``store/budget.py``); with no CRM configured at all (a bare script) it is this process's own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airflow.sdk import BaseHook

from store_sync.store.client import DEFAULT_API_PATH, StoreClient
from store_sync.store.config import FALSE, TRUE, ConfigError, as_bool, as_number

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# The request budget's lanes: a name and its default limits (requests per second, in flight), read from
# the extras ``<lane>_requests_per_second`` / ``<lane>_max_in_flight`` (live: without the prefix).
# A new lane is a line here; ``budget.py`` says how the lanes share the store.
# first_load: a new shop's whole history, which a user waits for (live sync stays polite meanwhile).
# reconcile: the hourly listing of every id (deletes that leave no trace): a safety net that must not
# take the live lane's requests (a listing of 5k orders is 55 pages, and live cycles waited behind it).
LANES: dict[str, tuple[float, int]] = {"live": (5, 3), "backfill": (2, 1), "fetch": (1, 1), "first_load": (10, 4),
                                       "reconcile": (2, 1)}


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
        self._conn = None

    @property
    def connection(self):
        if self._conn is None:
            self._conn = self.get_connection(self.store_conn_id)
        return self._conn

    def extra_bool(self, name: str, default: bool) -> bool:
        return as_bool(self.connection.extra_dejson.get(name, default), f"extra {name!r}",
                       f"store connection {self.store_conn_id!r}")

    def extra_number(self, name: str, default: float, *, kind: type = float, minimum: float | None = None):
        return as_number(self.connection.extra_dejson.get(name, default), f"extra {name!r}",
                         f"store connection {self.store_conn_id!r}", kind=kind, minimum=minimum)

    def extra_text(self, name: str) -> str | None:
        value = self.connection.extra_dejson.get(name)
        return str(value).strip() or None if value is not None else None

    def client_options(self) -> dict[str, Any]:
        """The client's settings from the extras, parsed and checked (a clear error names a bad one)."""
        return {
            "api_path": self.extra_text("api_path") or DEFAULT_API_PATH,
            "timeout": self.extra_number("timeout", 30, minimum=0.1),
            "verify": self._verify(),
            "requests_per_second": self.extra_number("requests_per_second", 5, minimum=0.01),
            "max_in_flight": self.extra_number("max_in_flight", 3, kind=int, minimum=1),
            "max_retries": self.extra_number("max_retries", 6, kind=int, minimum=0),
            "query_string_auth": self.extra_bool("query_string_auth", False),
        }

    def backfill_budget(self) -> dict[str, Any]:
        """Backfills spend a smaller budget than live sync: the shoppers come first."""
        return self.lane_budget("backfill")

    def lane_budget(self, lane: str) -> dict[str, Any]:
        """Overrides that put this hook's client in ``lane`` (a name of ``LANES``) with its limits."""
        limits = self.lane_limits(lane)
        return {"lane": lane, "requests_per_second": limits.requests_per_second, "max_in_flight": limits.max_in_flight}

    def lane_limits(self, lane: str):
        from store_sync.store.budget import Lane

        if lane not in LANES:
            raise ConfigError(f"unknown request budget lane {lane!r}; the lanes are {', '.join(LANES)}")
        rps, in_flight = LANES[lane]
        prefix = "" if lane == "live" else f"{lane}_"
        return Lane(lane, self.extra_number(f"{prefix}requests_per_second", rps, minimum=0.01),
                    self.extra_number(f"{prefix}max_in_flight", in_flight, kind=int, minimum=1))

    def store_limits(self):
        """All lanes together: the extras ``store_*``, by default the largest lane's own limits."""
        from store_sync.store.budget import Lane

        lanes = [self.lane_limits(name) for name in LANES]
        return Lane("*", self.extra_number("store_requests_per_second", max(x.requests_per_second for x in lanes),
                                           minimum=0.01),
                    self.extra_number("store_max_in_flight", max(x.max_in_flight for x in lanes), kind=int, minimum=1))

    def request_budget(self, url: str, lane: str, requests_per_second: float, max_in_flight: int, timeout: float):
        """The store's shared budget for ``lane``, kept in the CRM database; this process's own when no
        CRM is configured at all (a bare script, said in the log)."""
        from store_sync.crm.database import CrmNotConfigured, crm_dsn
        from store_sync.store.budget import Lane, store_budget
        from store_sync.store.client import shared_budget

        try:
            dsn = crm_dsn()
        except CrmNotConfigured:
            log.warning("store %s: no CRM database configured, so the request budget is this process's own; "
                        "other processes and workers do not share it", url)
            return shared_budget(f"{url}#{lane}", requests_per_second, max_in_flight)
        return store_budget(dsn, url, Lane(lane, requests_per_second, max_in_flight), self.store_limits(),
                            timeout=timeout)

    def first_load_budget(self) -> dict[str, Any]:
        """A first load (a new shop's whole history) spends a larger budget of its own lane: the user
        waits for it; live sync keeps its polite one."""
        return self.lane_budget("first_load")

    def _verify(self) -> bool | str:
        value = self.connection.extra_dejson.get("verify", True)
        if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in TRUE | FALSE):
            return as_bool(value, "extra 'verify'", f"store connection {self.store_conn_id!r}")
        path = str(value)
        if not Path(path).exists():
            raise ConfigError(f"store connection {self.store_conn_id!r}: extra 'verify' is neither true/false nor an "
                              f"existing CA bundle file: {path!r}")
        return path

    def base_url(self) -> str:
        conn = self.connection
        return store_url(conn.host or "", conn.port, conn.schema, conn.conn_type)

    def get_conn(self) -> StoreClient:
        return self.get_client()

    def get_client(self) -> StoreClient:
        if self._client is None:
            conn = self.connection
            url = self.base_url()
            host = urlsplit(url).hostname or ""
            if url.startswith("http://") and host not in LOOPBACK:
                log.warning("store connection %r says plain HTTP (%s): requests are signed but travel unencrypted; "
                            "write https:// in the host for a shop on the internet", self.store_conn_id, url)
            options = {**self.client_options(), **self.overrides}
            lane = options.pop("lane", "live")
            if lane != "live" and "requests_per_second" not in self.overrides:
                options.update({k: v for k, v in self.lane_budget(lane).items() if k != "lane"})
            if options.get("budget") is None:
                options["budget"] = self.request_budget(url, lane, options["requests_per_second"],
                                                        options["max_in_flight"], options["timeout"])
            self._client = StoreClient(url, conn.login or "", conn.password or "", **options)
        return self._client

    def test_connection(self) -> tuple[bool, str]:
        try:
            # one request from the UI's Test button: a budget of its own, so it works before the CRM does
            from store_sync.store.client import RequestBudget

            self.overrides = {**self.overrides, "budget": RequestBudget(1, 1)}
            env = self.get_client().check()
        except Exception as exc:  # the client's messages carry no key, secret or signed query
            return False, str(exc)
        return True, f"WooCommerce {env.get('version', '?')} answered with our key"


def store_url(host: str, port: int | None, schema: str | None, conn_type: str | None = None) -> str:
    """The shop URL from a connection's parts (see the module docstring for the rules)."""
    scheme, sep, rest = host.strip().partition("://")
    if not sep:
        scheme, rest = "", host.strip()
    schema = (schema or "").strip().strip("/")
    if not scheme:
        if schema.lower() in ("http", "https"):
            scheme = schema.lower()
        elif (conn_type or "").lower() in ("http", "https"):
            scheme = conn_type.lower()  # Airflow's URI form puts the URI's scheme here
        else:
            scheme = "https"
    netloc, _, path = rest.partition("/")
    if not path and schema and schema.lower() not in ("http", "https"):
        path = schema  # a URI's path lands in `schema`: WordPress in a sub-folder
    if port and ":" not in netloc:
        netloc = f"{netloc}:{port}"
    return f"{scheme}://{netloc}" + (f"/{path.strip('/')}" if path.strip("/") else "")
