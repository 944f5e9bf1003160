"""The store client: a polite, streaming WooCommerce REST v3 client.

* Auth as the store demands: HTTP Basic over HTTPS; one-legged OAuth 1.0a (HMAC-SHA256) over
  plain HTTP, as the official WooCommerce clients send it.
* Pages are streamed (a generator of pages, ``per_page=100``) over one keep-alive, gzip session.
* Retries 429, 5xx, timeouts, connection errors and non-JSON bodies with exponential backoff and
  jitter, honouring ``Retry-After``; never retries 400/401/403/404/410/413/501, which fail at once with
  the store's own code and message.
* Every request spends its store's budget (requests per second + in-flight cap): the hook gives one
  shared by every process through the CRM database (``budget.py``); without one (tests, scripts) it
  is ``RequestBudget``, this process's own. 429s and 5xx halve the rate, successes win it back slowly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests

log = logging.getLogger(__name__)

_QUERY = re.compile(r"\?[^\s'\")]*")
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504, 508, 520, 521, 522, 523, 524}
DEFAULT_API_PATH = "/wp-json/wc/v3"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class StoreApiError(Exception):
    """The store answered with an error; ``code`` and ``message`` are the store's own."""

    def __init__(self, status: int, code: str, message: str, url: str):
        self.status, self.code, self.message, self.url = status, code, message, url
        super().__init__(f"store answered {status} {code}: {message} ({url})")


class StoreAuthError(StoreApiError):
    """401/403: wrong key or secret, missing scope, or a WAF refusing us. Never retried."""


class StoreNotFound(StoreApiError):
    """404: the record or route does not exist (or was deleted for good)."""


class StoreUnavailable(StoreApiError):
    """Retries exhausted on 429/5xx/timeouts/garbled bodies, or the store cannot be reached."""


# ---------------------------------------------------------------------------------------------
# Budget shared by every client of one store in this process (budget.py shares one across processes)
# ---------------------------------------------------------------------------------------------
class LatencyWatch:
    """Rising latency means a busy store: slow down before it starts refusing. The baseline is this
    process's own (latency is a local view), whichever budget it feeds; ``_latency_lock`` guards it."""

    latency: float | None = None
    latency_slowdowns: int = 0

    def observe(self, seconds: float) -> None:
        with self._latency_lock:
            baseline = self.latency
            self.latency = seconds if baseline is None else 0.9 * baseline + 0.1 * seconds
        if baseline is not None and seconds > max(1.0, 3 * baseline):
            self.slow_down()
            self.latency_slowdowns += 1


class RequestBudget(LatencyWatch):
    """Token bucket (requests per second) + semaphore (requests in flight), with AIMD on trouble."""

    def __init__(self, requests_per_second: float, max_in_flight: int):
        self.max_rate = float(requests_per_second)
        self.rate = float(requests_per_second)
        self.in_flight = threading.BoundedSemaphore(max(1, int(max_in_flight)))
        self.max_in_flight = max(1, int(max_in_flight))
        self._lock = self._latency_lock = threading.Lock()
        self._next_slot = time.monotonic()
        self.waited = 0.0

    def acquire(self) -> None:
        self.in_flight.acquire()
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 1.0 / self.rate
        delay = slot - time.monotonic()
        if delay > 0:
            self.waited += delay
            time.sleep(delay)

    def release(self) -> None:
        self.in_flight.release()

    def slow_down(self) -> None:
        with self._lock:
            self.rate = max(0.2, self.rate / 2)

    def recover(self) -> None:
        with self._lock:
            self.rate = min(self.max_rate, self.rate + self.max_rate * 0.05)


_BUDGETS: dict[str, RequestBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def shared_budget(store_url: str, requests_per_second: float, max_in_flight: int) -> RequestBudget:
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(store_url)
        if budget is None:
            budget = _BUDGETS[store_url] = RequestBudget(requests_per_second, max_in_flight)
        return budget


# ---------------------------------------------------------------------------------------------
# OAuth 1.0a one-legged signing (what WC_REST_Authentication verifies over plain HTTP)
# ---------------------------------------------------------------------------------------------
def _enc(value: str) -> str:
    return quote(str(value), safe="~-._")


def oauth_params(method: str, url: str, params: dict[str, Any], key: str, secret: str) -> dict[str, str]:
    """Return ``params`` plus the oauth_* parameters, signed with HMAC-SHA256."""
    signed = {k: _php_value(v) for k, v in params.items()}
    signed.update({"oauth_consumer_key": key, "oauth_nonce": secrets.token_hex(16),
                   "oauth_signature_method": "HMAC-SHA256", "oauth_timestamp": str(int(time.time()))})
    query = "%26".join(_enc(f"{_enc(k)}={_enc(v)}") for k, v in sorted(signed.items()))
    base = f"{method.upper()}&{_enc(url)}&{query}"
    digest = hmac.new(f"{secret}&".encode(), base.encode(), hashlib.sha256).digest()
    signed["oauth_signature"] = base64.b64encode(digest).decode()
    return signed


def _php_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------
@dataclass
class Page:
    number: int
    records: list[dict]
    total: int | None  # X-WP-Total; None when the answer did not say
    total_pages: int
    elapsed: float = 0.0


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    errors_by_status: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "retries": self.retries, "throttled": self.throttled,
                "errors_by_status": dict(self.errors_by_status)}


class StoreClient:
    def __init__(self, store_url: str, consumer_key: str, consumer_secret: str, *,
                 api_path: str = DEFAULT_API_PATH, timeout: float = 30.0, verify: bool | str = True,
                 requests_per_second: float = 5.0, max_in_flight: int = 3, max_retries: int = 6,
                 backoff_base: float = 0.5, backoff_max: float = 30.0, query_string_auth: bool = False,
                 budget: RequestBudget | None = None):
        if not store_url:
            raise ValueError("the store connection has no host: set it to the shop's URL, e.g. https://shop.example.com")
        if "://" not in store_url:
            store_url = "https://" + store_url
        self.store_url = store_url.rstrip("/")
        self.api_url = self.store_url + "/" + api_path.strip("/")
        self.tls = urlsplit(self.store_url).scheme == "https"
        if not consumer_key or not consumer_secret:
            raise ValueError("the store connection needs the consumer key as login and the consumer secret as password")
        self._key, self._secret = consumer_key, consumer_secret
        self.timeout, self.verify = timeout, verify
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        self.query_string_auth = query_string_auth
        self.budget = budget or shared_budget(self.store_url, requests_per_second, max_in_flight)
        self.stats = ClientStats()
        self._local = threading.local()

    def __repr__(self) -> str:  # never shows the secret
        return f"StoreClient({self.api_url!r}, key={self._key[:6]}…)"

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers.update({"Accept": "application/json", "Accept-Encoding": "gzip, deflate",
                              "User-Agent": "crm-store-sync/1.0 (+airflow)"})
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max(4, self.budget.max_in_flight))
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.verify = self.verify
            self._local.session = s
        return s

    # -- one request ------------------------------------------------------------------------
    def request(self, method: str, endpoint: str, params: dict | None = None, json_body: Any = None,
                max_retries: int | None = None, url: str | None = None
                ) -> tuple[Any, requests.structures.CaseInsensitiveDict]:
        url = url or f"{self.api_url}/{endpoint.lstrip('/')}"
        params = {k: v for k, v in (params or {}).items() if v is not None}
        retries = self.max_retries if max_retries is None else max_retries
        attempt = 0
        store_error = None
        while True:
            wait = None
            self.budget.acquire()
            try:
                self.stats.requests += 1
                sent = time.monotonic()
                response = self._send(method, url, params, json_body)
                self.budget.observe(time.monotonic() - sent)
            # requests puts the whole URL in its messages, and the query carries the consumer key and secret
            # (query-string auth) or the OAuth signature: only redacted text leaves this method.
            except requests.exceptions.SSLError as exc:
                raise StoreUnavailable(0, "store_tls_error", f"the store's TLS certificate was refused "
                                       f"({self._redact(exc)}); set 'verify' in the connection extras to the CA "
                                       f"bundle that signs it", url) from None
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                problem, status = f"{type(exc).__name__}: {self._redact(exc)}", 0
            except requests.RequestException as exc:  # a bad URL, too many redirects…: not worth a retry
                raise StoreApiError(0, "store_request_error", f"{type(exc).__name__}: {self._redact(exc)}",
                                    url) from None
            else:
                status = response.status_code
                if status < 300:
                    try:
                        data = response.json()
                    except ValueError:
                        problem = f"HTTP {status} with a body that is not JSON ({response.text[:80]!r}…)"
                    else:
                        self.budget.recover()
                        return data, response.headers
                elif status in RETRYABLE_STATUS:
                    problem = f"HTTP {status} {response.reason}"
                    store_error = _json_error(response)  # the store's own code, when it sent one
                    wait = _retry_after(response.headers.get("Retry-After"))
                    if status in (429, 503):
                        self.stats.throttled += 1
                else:
                    raise _error_from(response, url)
            finally:
                self.budget.release()
            self.stats.errors_by_status[status] = self.stats.errors_by_status.get(status, 0) + 1
            if status in (0, 429) or status >= 500:
                self.budget.slow_down()
            if attempt >= retries:
                if status == 0:
                    raise StoreUnavailable(0, "store_unreachable",
                                           f"cannot reach the store at {self.store_url} after {attempt + 1} tries: {problem}",
                                           url)
                if store_error:  # e.g. a refused subscription transition or refund: HTTP 500 with a code
                    raise StoreUnavailable(status, store_error[0], f"gave up after {attempt + 1} tries: "
                                           f"HTTP {status} {store_error[1]}", url)
                raise StoreUnavailable(status, "store_unavailable", f"gave up after {attempt + 1} tries: {problem}", url)
            delay = wait if wait is not None else min(self.backoff_max, self.backoff_base * 2 ** attempt)
            delay = delay * random.uniform(1.0, 1.25) if wait is not None else delay * random.uniform(0.5, 1.0)
            log.warning("store %s %s: %s; retry %d/%d in %.1fs", method, endpoint, problem, attempt + 1, retries, delay)
            self.stats.retries += 1
            attempt += 1
            time.sleep(delay)

    def _redact(self, exc: BaseException | str) -> str:
        """An exception's text without any query string, key or secret."""
        text = _QUERY.sub("", str(exc))
        for secret in (self._secret, self._key, quote(self._secret, safe=""), quote(self._key, safe="")):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _send(self, method: str, url: str, params: dict, json_body: Any) -> requests.Response:
        auth = None
        if self.tls:
            if self.query_string_auth:
                params = {**params, "consumer_key": self._key, "consumer_secret": self._secret}
            else:
                auth = (self._key, self._secret)
            query = {k: _php_value(v) for k, v in params.items()}
        else:
            query = oauth_params(method, url, params, self._key, self._secret)
        body = json.dumps(json_body).encode() if json_body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else None
        return self.session.request(method, url, params=urlencode(query, quote_via=quote, safe="~-._"),
                                    data=body, headers=headers, auth=auth, timeout=self.timeout,
                                    verify=self.verify)  # explicit: REQUESTS_CA_BUNDLE must not override it

    # -- conveniences -----------------------------------------------------------------------
    def get(self, endpoint: str, params: dict | None = None) -> Any:
        return self.request("GET", endpoint, params)[0]

    def site_timezone(self):
        """The shop's timezone as WordPress's REST index gives it (``timezone_string``), once per client;
        None for a fixed UTC offset (no daylight saving) or when the index cannot be read.

        ``orderby=modified`` sorts on the local ``post_modified`` (WP_Query::parse_orderby), while the
        GMT filters compare ``post_modified_gmt``: in the hour a clock goes back, the two orders differ
        (``keyset_pages`` needs to know when)."""
        if not hasattr(self, "_site_tz"):
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            self._site_tz = None
            root = self.api_url.rsplit("/wc/", 1)[0] + "/" if "/wc/" in self.api_url else None
            try:
                # (_fields: a real index lists every route of the site, hundreds of kB)
                name = (self.request("GET", "", {"_fields": "timezone_string,gmt_offset"}, max_retries=1,
                                     url=root)[0] or {}).get("timezone_string") if root else None
                self._site_tz = ZoneInfo(name) if name else None
            except (StoreApiError, ZoneInfoNotFoundError, ValueError, AttributeError) as exc:
                log.warning("the store's timezone is unknown (%s): pages in a clock's fall-back hour are "
                            "checked by their own records only", exc)
        return self._site_tz

    def put(self, endpoint: str, body: dict) -> Any:
        return self.request("PUT", endpoint, json_body=body)[0]

    def post(self, endpoint: str, body: dict, max_retries: int | None = None) -> Any:
        """``max_retries=0`` for writes that are not idempotent (a refund, a note): a retry after a lost
        answer could make a second one; the caller checks what the store did before trying again."""
        return self.request("POST", endpoint, json_body=body, max_retries=max_retries)[0]

    def check(self) -> dict:
        """Fail fast on bad configuration: one authenticated call, few retries, a plain message."""
        try:
            status = self.request("GET", "system_status", {"_fields": "environment"}, max_retries=1)[0]
        except StoreAuthError as exc:
            raise StoreAuthError(exc.status, exc.code,
                                 f"the store refused our key ({exc.message}); check the consumer key and secret "
                                 f"of the store connection and that the key has read (or read/write) rights",
                                 exc.url) from None
        except StoreNotFound as exc:
            raise StoreNotFound(exc.status, exc.code, f"{self.api_url} is not a WooCommerce REST API v3 "
                                f"(check the store URL and that pretty permalinks are on): {exc.message}",
                                exc.url) from None
        return (status or {}).get("environment", {})

    def get_page(self, endpoint: str, params: dict | None, page: int, per_page: int = 100) -> Page:
        started = time.monotonic()
        data, headers = self.request("GET", endpoint, {**(params or {}), "page": page, "per_page": per_page})
        if not isinstance(data, list):
            raise StoreApiError(200, "unexpected_body", f"expected a JSON list from {endpoint}", endpoint)
        total_header, pages_header = headers.get("X-WP-Total"), headers.get("X-WP-TotalPages")
        total = int(total_header) if total_header not in (None, "") else None
        # A proxy may strip the paging headers: then a full page means "there may be more".
        pages = int(pages_header) if pages_header not in (None, "") else page + (1 if len(data) >= per_page else 0)
        return Page(page, data, total, pages, time.monotonic() - started)

    def count(self, endpoint: str, params: dict | None = None) -> int:
        """The cheapest question a store can answer: how many records match (``per_page=1``, ids only)."""
        data, headers = self.request("GET", endpoint, {**(params or {}), "per_page": 1, "_fields": "id"})
        return int(headers.get("X-WP-Total", len(data)) or 0)

    def iter_pages(self, endpoint: str, params: dict | None = None, per_page: int = 100,
                   start_page: int = 1) -> Iterator[Page]:
        """Stream pages one after another; the page count is re-read from each answer."""
        page = start_page
        while True:
            current = self.get_page(endpoint, params, page, per_page)
            if current.records or page == start_page:
                yield current
            if page >= current.total_pages or not current.records:
                return
            page += 1

    def fetch_pages(self, endpoint: str, params: dict | None, pages: Iterable[int], per_page: int = 100,
                    concurrency: int | None = None) -> Iterator[Page]:
        """Fetch known page numbers concurrently (within the budget), yielded in page order."""
        workers = max(1, min(concurrency or self.budget.max_in_flight, self.budget.max_in_flight))
        pages = list(pages)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-page") as pool:
            window = workers * 2
            futures = {}
            for i, n in enumerate(pages[:window]):
                futures[i] = pool.submit(self.get_page, endpoint, params, n, per_page)
            for i in range(len(pages)):
                page = futures.pop(i).result()
                nxt = i + window
                if nxt < len(pages):
                    futures[nxt] = pool.submit(self.get_page, endpoint, params, pages[nxt], per_page)
                yield page

    def iter_records(self, endpoint: str, params: dict | None = None, per_page: int = 100) -> Iterator[dict]:
        for page in self.iter_pages(endpoint, params, per_page):
            yield from page.records


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _json_error(response: requests.Response) -> tuple[str, str] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return (str(body["code"]), str(body.get("message", ""))) if isinstance(body, dict) and body.get("code") else None


def _error_from(response: requests.Response, url: str) -> StoreApiError:
    status = response.status_code
    try:
        body = response.json()
        code, message = body.get("code", f"http_{status}"), body.get("message", response.reason)
    except ValueError:
        code = f"http_{status}"
        message = response.reason or "error"
        if "html" in response.headers.get("Content-Type", ""):
            message += " (an HTML page, not the API: a firewall, proxy or maintenance page may be in the way)"
    cls = StoreAuthError if status in (401, 403) else StoreNotFound if status == 404 else StoreApiError
    return cls(status, code, message, url.split("?")[0])
