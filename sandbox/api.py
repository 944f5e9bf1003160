"""The sandbox store's REST layer: ``/wp-json/wc/v3/`` with a real store's rules and quirks."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from . import project
from .auth import WWW_AUTH, authenticate, check_permissions
from .catalog import ORDER_STATUS_LABELS, SUBSCRIPTION_STATUS_LABELS
from .domain import Domain, StoreError, UncaughtException, enum_error, invalid_params
from .faults import GATEWAY, PHP_FATAL, PHP_NOTICE, Faults
from .shop import Shop
from .storage import WP_FORMAT, Store
from .webhooks import WebhookDeliverer, default_secret

NS = "/wp-json/wc/v3"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?$")
BATCH_LIMIT = 100

POST_RESOURCES = {
    # REST base: (post_type, item label for errors, webhook resource)
    "orders": ("shop_order", "shop_order", "order"),
    "subscriptions": ("shop_subscription", "shop_subscription", "subscription"),
    "products": ("product", "product", "product"),
}
ORDERBY = {
    "posts": ("date", "id", "include", "title", "slug", "modified"),
    "products": ("date", "id", "include", "title", "slug", "modified", "price", "popularity", "rating"),
    "customers": ("id", "include", "name", "registered_date"),
    "categories": ("id", "include", "name", "slug", "term_group", "description", "count"),
}


def error(code: str, message: str, status: int, headers: dict | None = None, **data) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "data": {"status": status, **data}},
                        status_code=status, headers=headers)


def fatal(request: Request) -> Response:
    """An uncaught PHP exception: WP_Fatal_Error_Handler's wp_die() answers 500, as JSON
    (``_json_wp_die_handler``) when the request is JSON, else the HTML page. The exception's own
    message is only logged, never shown."""
    wants_json = "json" in request.headers.get("content-type", "") or "json" in request.headers.get("accept", "")
    if not wants_json:
        return Response(PHP_FATAL, status_code=500, media_type="text/html")
    return JSONResponse({"code": "internal_server_error",
                         "message": "<p>There has been a critical error on this website.</p><p><a href=\""
                                    "https://wordpress.org/documentation/article/faq-troubleshooting/\">Learn more "
                                    "about troubleshooting WordPress.</a></p>",
                         "data": {"status": 500}, "additional_errors": []}, status_code=500)


# Registration order of the CRUD controllers' collection params (get_collection_params in
# class-wc-rest-crud-controller.php / class-wc-rest-orders-v2-controller.php): WordPress validates
# them in this order, so the message names them in this order too.
PARAM_ORDER = ("context", "page", "per_page", "search", "after", "before", "modified_after", "modified_before",
               "dates_are_gmt", "exclude", "include", "offset", "order", "orderby", "parent", "parent_exclude",
               "status", "customer", "product", "dp", "type", "sku", "category", "role", "email", "force")


class Query:
    """Read and validate query parameters the way WP_REST_Request + the controller schema do.

    A bad value is recorded, not raised: ``WP_REST_Request::has_valid_params`` checks every
    registered arg and answers one ``rest_invalid_param`` naming all of them (``check()``).
    """

    def __init__(self, request: Request):
        self.items = list(parse_qsl(request.url.query, keep_blank_values=True))
        self.raw = dict(self.items)
        self.errors: dict[str, tuple[str, str, object]] = {}

    def bad(self, name: str, code: str, message: str, data: object = None) -> None:
        self.errors.setdefault(name, (code, message, data))

    def check(self) -> None:
        if self.errors:
            rank = {p: n for n, p in enumerate(PARAM_ORDER)}
            ordered = dict(sorted(self.errors.items(), key=lambda kv: rank.get(kv[0], len(rank))))
            raise invalid_params(ordered)

    def get(self, name: str, default=None):
        return self.raw.get(name, default)

    def list(self, name: str) -> list[str] | None:
        values = [v for k, v in self.items if k in (name, f"{name}[]")]
        if not values:
            return None
        out = []
        for v in values:
            out.extend(x for x in v.split(",") if x != "")
        return out

    def int(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        # rest_validate_value_from_schema / rest_validate_number_value_from_schema (wp-includes/rest-api.php)
        value = self.raw.get(name)
        if value is None:
            return default
        try:
            n = int(value)
        except ValueError:
            self.bad(name, "rest_invalid_type", f"{name} is not of type integer.", {"param": name})
            return default
        if lo is not None and hi is not None and not lo <= n <= hi:
            self.bad(name, "rest_out_of_bounds", f"{name} must be between {lo} (inclusive) and {hi} (inclusive)")
            return default
        if lo is not None and n < lo:
            self.bad(name, "rest_out_of_bounds", f"{name} must be greater than or equal to {lo}")
            return default
        return n

    def ints(self, name: str) -> list[int] | None:
        values = self.list(name)
        if values is None:
            return None
        out = []
        for n, v in enumerate(values):
            try:
                out.append(int(v))
            except ValueError:
                self.bad(name, "rest_invalid_type", f"{name}[{n}] is not of type integer.", {"param": f"{name}[{n}]"})
                return None
        return out

    def bool(self, name: str) -> bool:
        return str(self.raw.get(name, "")).lower() in ("1", "true", "yes")

    def enum(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.raw.get(name, default)
        if value not in allowed:
            self.bad(name, *enum_error(name, allowed))
            return default
        return value

    def enum_list(self, name: str, allowed: tuple[str, ...], default: str) -> list[str]:
        """An array arg with an item enum (orders' ``status``): the bad item is named ``status[i]``."""
        wanted = self.list(name) or [default]
        for n, value in enumerate(wanted):
            if value not in allowed:
                self.bad(name, *enum_error(f"{name}[{n}]", allowed))
                return [default]
        return wanted

    def date(self, name: str, tz: ZoneInfo) -> str | None:
        """WP's date filters: parse in the site timezone, compare as site-local wall-clock text."""
        value = self.raw.get(name)
        if value is None:
            return None
        if not RFC3339.match(value):
            self.bad(name, "rest_invalid_date", "Invalid date.")
            return None
        text = value.replace("t", "T").replace(" ", "T")
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(tz).replace(tzinfo=None)
        return parsed.replace(microsecond=0).strftime(WP_FORMAT)


def page_params(q: Query) -> tuple[int, int, int | None]:
    page = q.int("page", 1, lo=1)
    per_page = q.int("per_page", 10, lo=1, hi=100)
    offset = q.int("offset", None, lo=0)
    return page, per_page, offset


def fields_filter(q: Query):
    wanted = q.get("_fields")
    if not wanted:
        return lambda doc: doc
    top: dict[str, set[str] | None] = {}
    for f in (x.strip() for x in wanted.split(",") if x.strip()):
        head, _, rest = f.partition(".")
        if rest:
            current = top.setdefault(head, set())
            if current is not None:
                current.add(rest)
        else:
            top[head] = None
    top.setdefault("id", None)

    def apply(doc: dict) -> dict:
        out = {}
        for k, sub in top.items():
            if k not in doc:
                continue
            out[k] = doc[k] if sub is None or not isinstance(doc[k], dict) else {
                s: doc[k][s] for s in sub if s in doc[k]}
        return out

    return apply


def paged_response(request: Request, q: Query, docs: list[dict] | None, total: int, page: int, per_page: int,
                   raw: str | None = None) -> Response:
    """A list page: the records (or ``raw``, the page's JSON as pre-rendered) and the paging headers."""
    pages = math.ceil(total / per_page) if total else 0
    base = f"{request.url.scheme}://{request.url.netloc}{request.url.path}"
    params = [(k, v) for k, v in q.items if k != "page"]
    links = []
    if page > 1:
        links.append(f'<{base}?{urlencode(params + [("page", min(page - 1, max(pages, 1)))])}>; rel="prev"')
    if pages > page:
        links.append(f'<{base}?{urlencode(params + [("page", page + 1)])}>; rel="next"')
    headers = {"X-WP-Total": str(total), "X-WP-TotalPages": str(pages)}
    if links:
        headers["Link"] = ", ".join(links)
    faults = request.app.state.faults
    if raw is not None:
        rates = faults.rates
        if not q.get("_fields") and not rates.get("garbage") and not rates.get("junk"):
            return Response(raw.encode(), media_type="application/json", headers=headers)
        docs = json.loads(raw)  # the same records as a live rendering: shaped and faulted below
    shape = fields_filter(q)
    docs = [shape(d) for d in docs]
    garbled = [d for d in docs if "total" in d]
    if garbled and faults.roll("garbage"):
        random.choice(garbled)["total"] = "N/A"
    if docs and faults.roll("junk"):
        # A plugin's filter on the REST response left an element that is no record.
        docs[random.randrange(len(docs))] = random.choice([False, None, "", {"id": None}, {"name": "no id"}])
    return JSONResponse(docs, headers=headers)


def create_app(store: Store, faults: Faults | None = None, stable_sort: bool = False,
               webhook_delay: float = 0.5, shop: Shop | None = None, public_url: str | None = None,
               prerender: bool = False, shuffle_related: bool = True) -> FastAPI:
    app = FastAPI(title="Sandbox store (WooCommerce REST API v3)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.faults = faults or Faults()
    app.state.stable_sort = stable_sort
    app.state.shop = shop or Shop()
    # A real store shuffles related_ids on every read (wc_get_related_products); --fixed-related is kinder.
    related_rng = random.Random() if shuffle_related else None
    app.state.related_rng = related_rng
    pages = None
    if prerender:
        from .prerender import Pages

        pages = Pages(store, related_rng)
    app.state.pages = pages
    domain = Domain(store)
    app.state.domain = domain
    # Links and webhook sources follow the URL of the last request; a worker that has served none yet
    # (several workers) starts from the URL it serves at.
    base_holder = {"base": (public_url or "http://sandbox.local") + NS}

    def render(resource: str, record_id: int):
        base = base_holder["base"]
        fn = {"order": lambda ids: project.orders(store, ids, base),
              "subscription": lambda ids: project.orders(store, ids, base, "shop_subscription"),
              "product": lambda ids: project.products(store, ids, base, related_rng),
              "customer": lambda ids: project.customers(store, ids, base)}[resource]
        docs = fn([record_id])
        return docs[0] if docs else None

    hooks = WebhookDeliverer(store, render, delay=webhook_delay)
    if public_url:
        hooks.source_url = public_url + "/"
    domain.changes.listeners.append(hooks.on_change)
    app.state.webhooks = hooks

    @app.on_event("startup")
    def _start() -> None:  # noqa: ANN202
        hooks.start()

    @app.on_event("shutdown")
    def _stop() -> None:
        hooks.stop()

    # -- middleware: faults, auth, errors ------------------------------------------------------
    @app.middleware("http")
    async def host(request: Request, call_next):
        """The host in front of PHP: its limit on requests in flight, and the shop's own slowness."""
        if not request.url.path.startswith("/wp-json"):
            return await call_next(request)
        limits = app.state.shop
        if not limits.enter():
            return limits.refusal()
        try:
            started = time.monotonic()
            response = await gate(request, call_next)
            if limits.page_latency:
                per_page = None
                if "x-wp-total" in response.headers or "x-wp-totalpages" in response.headers:
                    try:
                        per_page = int(request.query_params.get("per_page") or 10)
                    except ValueError:
                        per_page = 10
                delay = limits.seconds(per_page) - (time.monotonic() - started)
                if delay > 0:
                    await asyncio.sleep(delay)
            return response
        finally:
            limits.leave()

    async def gate(request: Request, call_next):
        path = request.url.path
        base_holder["base"] = f"{request.url.scheme}://{request.url.netloc}{NS}"
        hooks.source_url = f"{request.url.scheme}://{request.url.netloc}/"
        f = app.state.faults
        kind = f.pick_request_fault()
        if kind == "429":
            return Response("Too Many Requests", status_code=429, headers={"Retry-After": "1"}, media_type="text/plain")
        if kind == "429nr":
            return Response("Too Many Requests", status_code=429, media_type="text/plain")
        if kind == "500":
            return Response(PHP_FATAL, status_code=500, media_type="text/html")
        if kind in ("502", "504"):
            await asyncio.sleep(f.slow_seconds)
            reason = "Bad Gateway" if kind == "502" else "Gateway Time-out"
            return Response(GATEWAY.format(code=kind, reason=reason), status_code=int(kind), media_type="text/html")
        if kind == "slow":
            await asyncio.sleep(f.slow_seconds)
        if f.roll("skew"):
            store.clock_offset = timedelta(seconds=random.choice([-3, -2, 2, 3]))
        if path.rstrip("/") in (NS, "/wp-json") or path == f"{NS}/subscriptions/statuses":
            request.state.key = None
        else:
            form = ""
            if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                form = (await request.body()).decode()
            url = f"{request.url.scheme}://{request.url.netloc}{path}"
            try:
                key = await asyncio.to_thread(
                    authenticate, store, scheme=request.url.scheme, method=request.method, url=url,
                    query=request.url.query, headers={k.lower(): v for k, v in request.headers.items()}, form=form)
            except StoreError as exc:
                return error(exc.code, exc.message, exc.status)
            method = request.headers.get("x-http-method-override", request.method).upper()
            if key is None:
                return error(*denied(method, path))
            try:
                check_permissions(key, method)  # rest_pre_dispatch: read scope for GET, write for the rest
            except StoreError as exc:
                return error(exc.code, exc.message, exc.status)
            request.state.key = key
        try:
            response = await call_next(request)
        except UncaughtException:
            return fatal(request)
        except StoreError as exc:
            return error(exc.code, exc.message, exc.status, **exc.data)
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and response.status_code < 300 and f.roll("late"):
            await asyncio.sleep(f.slow_seconds)
        body_fault = f.pick_body_fault() if request.method == "GET" and response.status_code == 200 else None
        if body_fault:
            body = b"".join([chunk async for chunk in response.body_iterator])
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            if body_fault == "truncated":
                body = body[: max(1, len(body) // 2)]
            elif body_fault == "notice":
                body = PHP_NOTICE.encode() + body
            elif body_fault == "empty" and body.lstrip().startswith(b"["):
                body = b"[]"
            elif body_fault == "nopaging":
                headers = {k: v for k, v in headers.items() if k.lower() not in ("x-wp-total", "x-wp-totalpages", "link")}
            return Response(body, status_code=200, headers=headers)
        return response

    def denied(method: str, path: str) -> tuple[str, str, int]:
        is_item = bool(re.search(r"/\d+$", path))
        if path.endswith("/batch"):
            return "woocommerce_rest_cannot_batch", "Sorry, you are not allowed to batch manipulate this resource.", 401
        if method in ("GET", "HEAD"):
            if is_item:
                return "woocommerce_rest_cannot_view", "Sorry, you cannot view this resource.", 401
            return "woocommerce_rest_cannot_view", "Sorry, you cannot list resources.", 401
        if method == "DELETE":
            return "woocommerce_rest_cannot_delete", "Sorry, you are not allowed to delete this resource.", 401
        if method == "POST" and not is_item:
            return "woocommerce_rest_cannot_create", "Sorry, you are not allowed to create resources.", 401
        return "woocommerce_rest_cannot_edit", "Sorry, you are not allowed to edit this resource.", 401

    @app.exception_handler(RequestValidationError)
    async def no_such_route(_request: Request, _exc):
        # WordPress matches routes by regex: a non-numeric id simply matches no route.
        return error("rest_no_route", "No route was found matching the URL and request method.", 404)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError):
        if isinstance(exc, UncaughtException):
            return fatal(request)
        return error(exc.code, exc.message, exc.status, **exc.data)

    def base(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}{NS}"

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise StoreError("rest_invalid_json", "Invalid JSON body passed.", 400) from None
        if not isinstance(body, dict):
            raise StoreError("rest_invalid_json", "Invalid JSON body passed.", 400)
        return body

    # -- index and lookups ---------------------------------------------------------------------
    @app.get("/wp-json")
    @app.get("/wp-json/")
    def wp_index(request: Request):
        # WordPress's own index (WP_REST_Server::get_index, wp-includes/rest-api/class-wp-rest-server.php):
        # public, with the site's timezone_string and gmt_offset among its fields.
        offset = store.tz.utcoffset(datetime.now())
        body = {"name": "Sandbox store", "description": "", "url": f"{request.url.scheme}://{request.url.netloc}",
                "home": f"{request.url.scheme}://{request.url.netloc}",
                "gmt_offset": offset.total_seconds() / 3600 if offset is not None else 0,
                "timezone_string": store.option("timezone_string", ""), "namespaces": ["wp/v2", "wc/v3"],
                "routes": {}}
        fields = [f for f in request.query_params.get("_fields", "").split(",") if f]  # rest_filter_response_fields
        return {k: v for k, v in body.items() if k in fields} if fields else body

    @app.get(NS)
    @app.get(NS + "/")
    def index(request: Request):
        return {"namespace": "wc/v3", "routes": {}, "_links": {"up": [{"href": f"{request.url.scheme}://{request.url.netloc}/wp-json/"}]}}

    @app.get(NS + "/system_status")
    def system_status(request: Request):
        return {"environment": {"home_url": f"{request.url.scheme}://{request.url.netloc}",
                                "site_url": f"{request.url.scheme}://{request.url.netloc}",
                                "version": store.option("woocommerce_version", "9.4.0"), "wp_version": "6.7",
                                "default_timezone": "UTC"},
                "settings": {"currency": "EUR", "timezone": store.option("timezone_string")}}

    @app.get(NS + "/data/countries")
    def countries(request: Request):
        return project.countries(store, base(request))

    @app.get(NS + "/data/countries/{code}")
    def country(request: Request, code: str):
        docs = project.countries(store, base(request), code)
        if not docs:
            raise StoreError("woocommerce_rest_data_invalid_location", "There are no locations matching these parameters.", 404)
        return docs[0]

    @app.get(NS + "/payment_gateways")
    def gateways(request: Request):
        return project.payment_gateways(store, base(request))

    @app.get(NS + "/taxes/classes")
    def taxes():
        return project.tax_classes(store)

    @app.get(NS + "/subscriptions/statuses")
    def sub_statuses():
        return project.subscription_statuses(store)

    @app.get(NS + "/reports/orders/totals")
    def order_totals():
        counts = dict(store.db.execute(
            "SELECT post_status, COUNT(*) FROM posts WHERE post_type='shop_order' GROUP BY post_status").fetchall())
        return [{"slug": s["slug"], "name": s["name"], "total": counts.get(s["slug"], 0)}
                for s in project.order_statuses(store)]

    # -- categories ----------------------------------------------------------------------------
    @app.get(NS + "/products/categories")
    def list_categories(request: Request):
        q = Query(request)
        page, per_page, offset = page_params(q)
        orderby = q.enum("orderby", ORDERBY["categories"], "name")
        order = q.enum("order", ("asc", "desc"), "asc")
        where, args = ["list_id=?"], [store.list_id("PRODUCT_CAT")]
        if (parent := q.int("parent", None)) is not None:
            where.append("COALESCE(parent_id - 1000, 0)=?")
            args.append(parent)
        if include := q.ints("include"):
            where.append(f"id - 1000 IN ({','.join('?' * len(include))})")
            args.extend(include)
        q.check()
        col = {"id": "id", "name": "name", "slug": "code", "include": "id", "term_group": "id",
               "description": "v_text1", "count": "id"}[orderby]
        sql_where = " AND ".join(where)
        total = store.db.execute(f"SELECT COUNT(*) FROM lookup WHERE {sql_where}", args).fetchone()[0]
        start = offset if offset is not None else (page - 1) * per_page
        ids = [r[0] - 1000 for r in store.db.execute(
            f"SELECT id FROM lookup WHERE {sql_where} ORDER BY {col} {order}, id {order} LIMIT ? OFFSET ?",
            [*args, per_page, start])]
        return paged_response(request, q, project.categories(store, ids, base(request)), total, page, per_page)

    @app.get(NS + "/products/categories/{cid}")
    def get_category(request: Request, cid: int):
        docs = project.categories(store, [cid], base(request))
        if not docs:
            raise StoreError("woocommerce_rest_term_invalid", "Resource does not exist.", 404)
        return docs[0]

    # -- customers -----------------------------------------------------------------------------
    @app.get(NS + "/customers")
    def list_customers(request: Request):
        q = Query(request)
        page, per_page, offset = page_params(q)
        orderby = q.enum("orderby", ORDERBY["customers"], "name")
        order = q.enum("order", ("asc", "desc"), "asc")
        role = q.get("role", "customer")
        where, args = [], []
        if role != "all":
            where.append("role=?")
            args.append(role)
        if email := q.get("email"):
            where.append("user_email=?")
            args.append(email)
        include = q.ints("include")
        if include:
            where.append(f"id IN ({','.join('?' * len(include))})")
            args.extend(include)
        if exclude := q.ints("exclude"):
            where.append(f"id NOT IN ({','.join('?' * len(exclude))})")
            args.extend(exclude)
        if search := q.get("search"):
            where.append("(user_email LIKE ? OR user_login LIKE ? OR display_name LIKE ?)")
            args.extend([f"%{search}%"] * 3)
        q.check()
        sql_where = " AND ".join(where) or "1=1"
        total = store.db.execute(f"SELECT COUNT(*) FROM users WHERE {sql_where}", args).fetchone()[0]
        order_sql = {"id": f"id {order}", "name": f"display_name {order}, id {order}",
                     "registered_date": f"user_registered {order}, id {order}", "include": "id"}[orderby]
        if orderby == "include" and include:
            order_sql = "CASE id " + " ".join(f"WHEN {int(i)} THEN {n}" for n, i in enumerate(include)) + " END"
        start = offset if offset is not None else (page - 1) * per_page
        ids = [r[0] for r in store.db.execute(
            f"SELECT id FROM users WHERE {sql_where} ORDER BY {order_sql} LIMIT ? OFFSET ?", [*args, per_page, start])]
        return list_answer(request, q, "customers", ids, total, page, per_page)

    def customer_or_404(request: Request, uid: int) -> dict:
        docs = project.customers(store, [uid], base(request))
        if not docs:
            raise StoreError("woocommerce_rest_invalid_id", "Invalid resource ID.", 404)
        return docs[0]

    @app.get(NS + "/customers/{uid}")
    def get_customer(request: Request, uid: int):
        return customer_or_404(request, uid)

    @app.post(NS + "/customers", status_code=201)
    async def create_customer(request: Request):
        body = await json_body(request)
        if body.get("id"):
            raise StoreError("woocommerce_rest_customer_exists", "Cannot create existing resource.", 400)
        uid = await asyncio.to_thread(locked, domain.create_customer, body)
        return JSONResponse(customer_or_404(request, uid), status_code=201,
                            headers={"Location": f"{base(request)}/customers/{uid}"})

    @app.api_route(NS + "/customers/{uid}", methods=["PUT", "PATCH"])
    async def update_customer(request: Request, uid: int):
        body = await json_body(request)
        await asyncio.to_thread(locked, domain.update_customer, uid, body)
        return customer_or_404(request, uid)

    @app.delete(NS + "/customers/{uid}")
    def delete_customer(request: Request, uid: int):
        q = Query(request)
        if not q.bool("force"):
            raise StoreError("woocommerce_rest_trash_not_supported", "Customers do not support trashing.", 501)
        doc = customer_or_404(request, uid)
        locked(domain.delete_customer, uid)
        return doc

    @app.post(NS + "/customers/batch")
    async def batch_customers(request: Request):
        body = await json_body(request)

        def one_create(item):
            return customer_or_404(request, domain.create_customer(item))

        def one_update(item):
            domain.update_customer(int(item.get("id") or 0), item)
            return customer_or_404(request, int(item["id"]))

        def one_delete(uid):
            doc = customer_or_404(request, uid)
            domain.delete_customer(uid)
            return doc

        return await asyncio.to_thread(run_batch, body, one_create, one_update, one_delete)

    # -- posts: products, orders, subscriptions, refunds ---------------------------------------
    def list_posts(request: Request, post_type: str | tuple[str, ...], *, statuses: tuple[str, ...] | None,
                   orderby_allowed: tuple[str, ...], parent_in: list[int] | None = None, extra=None):
        q = Query(request)
        page, per_page, offset = page_params(q)
        orderby = q.enum("orderby", orderby_allowed, "date")
        order = q.enum("order", ("asc", "desc"), "desc")
        types = (post_type,) if isinstance(post_type, str) else post_type
        where = [f"p.post_type IN ({','.join('?' * len(types))})"]
        args: list[Any] = list(types)
        if statuses is not None:
            # The item enum is array_merge(['any', 'trash'], statuses) (class-wc-rest-orders-controller.php).
            wanted = q.enum_list("status", ("any", "trash", *statuses), "any")
            if "any" in wanted:
                where.append("p.post_status NOT IN ('trash', 'auto-draft')")
            else:
                where.append(f"p.post_status IN ({','.join('?' * len(wanted))})")
                args.extend(wanted)
        gmt = q.bool("dates_are_gmt")
        for name, col, op in (("after", "post_date", ">"), ("before", "post_date", "<"),
                              ("modified_after", "post_modified", ">"), ("modified_before", "post_modified", "<")):
            value = q.date(name, store.tz)
            if value is not None:
                where.append(f"p.{col}{'_gmt' if gmt else ''} {op} ?")
                args.append(value)
        include = q.ints("include")
        if include:
            where.append(f"p.id IN ({','.join('?' * len(include))})")
            args.extend(include)
        if exclude := q.ints("exclude"):
            where.append(f"p.id NOT IN ({','.join('?' * len(exclude))})")
            args.extend(exclude)
        parents = q.ints("parent") or parent_in
        if parents:
            where.append(f"p.post_parent IN ({','.join('?' * len(parents))})")
            args.extend(parents)
        if (customer := q.int("customer", None)) is not None:
            where.append("p.customer_id=?")
            args.append(customer)
        if search := q.get("search"):
            where.append("(p.post_title LIKE ? OR EXISTS (SELECT 1 FROM postmeta m WHERE m.post_id=p.id AND "
                         "m.meta_key='_billing' AND m.meta_value LIKE ?))")
            args.extend([f"%{search}%"] * 2)
        if extra:
            extra(q, where, args)
        q.check()
        sql_where = " AND ".join(where)
        total = store.db.execute(f"SELECT COUNT(*) FROM posts p WHERE {sql_where}", args).fetchone()[0]
        col = {"date": "p.post_date", "modified": "p.post_modified", "id": "p.id", "title": "p.post_title",
               "slug": "p.post_name", "include": "p.id", "price": "p.id", "popularity": "p.id", "rating": "p.id"}[orderby]
        if orderby == "include" and include:
            order_sql = "CASE p.id " + " ".join(f"WHEN {int(i)} THEN {n}" for n, i in enumerate(include)) + " END"
        elif col == "p.id":
            order_sql = f"p.id {order}"
        elif orderby == "date" or app.state.stable_sort:
            # WooCommerce adds an id tie-break for `date` only: WC_REST_CRUD_Controller::prepare_objects_query
            # turns orderby=date into "date ID" (plugins/woocommerce/includes/rest-api/Controllers/Version3/
            # class-wc-rest-crud-controller.php). `stable_sort` is the kinder, opt-in mode for tests.
            order_sql = f"{col} {order}, p.id {order}"
        else:
            # `modified`, `title` and `slug` get no tie-break (WordPress WP_Query::parse_orderby; WooCommerce's
            # HPOS OrdersTableQuery likewise), and MySQL may return tied rows in a different order for every
            # LIMIT/OFFSET: each request draws its own order among rows that tie.
            salt = random.randrange(1, 1_000_003)
            order_sql = f"{col} {order}, (p.id * {salt}) % 1000003"
        start = offset if offset is not None else (page - 1) * per_page
        hint = ""
        if orderby == "modified" and not (include or parents or search or customer is not None) \
                and store.has_index("posts_type_mod_local_cover"):
            # SQLite's planner cannot tell a first load's window from a live poll's: a large one is read
            # in post_modified order (OFFSET + LIMIT entries), a small one by its GMT range, then sorted.
            hint = " INDEXED BY posts_type_mod_local_cover" if total > 2000 else " INDEXED BY posts_type_modgmt_cover"
        ids = [r[0] for r in store.db.execute(
            f"SELECT p.id FROM posts p{hint} WHERE {sql_where} ORDER BY {order_sql} LIMIT ? OFFSET ?",
            [*args, per_page, start])]
        if ids and app.state.faults.roll("shift"):
            # A shopper or admin changes one of the records in the window while the client pages.
            victim = random.choice(ids)
            with store.write_lock:
                store.touch_post(victim)
        return q, ids, total, page, per_page

    def list_answer(request: Request, q: Query, rest: str, ids: list[int], total: int, page: int, per_page: int):
        """The page of ``ids``: from the pre-rendered bodies with ``--prerender``, else rendered now."""
        if pages is not None:
            raw = pages.page(rest, ids, base(request), lambda missing: project_posts(request, rest, missing))
            return paged_response(request, q, None, total, page, per_page, raw=raw)
        return paged_response(request, q, project_posts(request, rest, ids), total, page, per_page)

    def project_posts(request: Request, rest: str, ids: list[int]) -> list[dict]:
        b = base(request)
        if rest == "customers":
            return project.customers(store, ids, b)
        if rest == "orders":
            return project.orders(store, ids, b)
        if rest == "subscriptions":
            return project.orders(store, ids, b, "shop_subscription")
        if rest == "refunds":
            return project.refunds(store, ids, b)
        return project.products(store, ids, b, related_rng)

    def product_filters(q: Query, where: list[str], args: list) -> None:
        if ptype := q.get("type"):
            where.append("EXISTS (SELECT 1 FROM postmeta m WHERE m.post_id=p.id AND m.meta_key='_product_type' AND m.meta_value=?)")
            args.append(json.dumps(ptype))
        if sku := q.get("sku"):
            where.append("EXISTS (SELECT 1 FROM postmeta m WHERE m.post_id=p.id AND m.meta_key='_sku' AND m.meta_value=?)")
            args.append(json.dumps(sku))
        if category := q.get("category"):
            where.append("EXISTS (SELECT 1 FROM term_relationships t WHERE t.object_id=p.id AND t.term_id=?)")
            args.append(int(category))

    def order_filters(q: Query, where: list[str], args: list) -> None:
        if (product := q.int("product", None)) is not None:
            where.append("EXISTS (SELECT 1 FROM order_items i JOIN order_itemmeta im ON im.order_item_id=i.order_item_id "
                         "WHERE i.order_id=p.id AND im.meta_key IN ('_product_id','_variation_id') AND im.meta_value=?)")
            args.append(str(product))

    @app.get(NS + "/products")
    def list_products(request: Request):
        q, ids, total, page, per_page = list_posts(
            request, "product", statuses=("draft", "pending", "private", "publish", "future"),
            orderby_allowed=ORDERBY["products"], extra=product_filters)
        return list_answer(request, q, "products", ids, total, page, per_page)

    @app.get(NS + "/products/{pid}/variations")
    def list_variations(request: Request, pid: int):
        if domain.post(pid, ("product",)) is None:
            raise StoreError("woocommerce_rest_product_invalid_id", "Invalid ID.", 404)
        q, ids, total, page, per_page = list_posts(
            request, "product_variation", statuses=("draft", "pending", "private", "publish", "future"),
            orderby_allowed=ORDERBY["posts"], parent_in=[pid])
        return list_answer(request, q, "products", ids, total, page, per_page)

    @app.get(NS + "/products/{pid}/variations/{vid}")
    def get_variation(request: Request, pid: int, vid: int):
        row = domain.post(vid, ("product_variation",))
        if row is None or row["post_parent"] != pid:
            raise StoreError("woocommerce_rest_product_variation_invalid_id", "Invalid ID.", 404)
        return project_posts(request, "products", [vid])[0]

    @app.get(NS + "/orders")
    def list_orders(request: Request):
        q, ids, total, page, per_page = list_posts(
            request, "shop_order", statuses=tuple(ORDER_STATUS_LABELS), orderby_allowed=ORDERBY["posts"],
            extra=order_filters)
        return list_answer(request, q, "orders", ids, total, page, per_page)

    @app.get(NS + "/subscriptions")
    def list_subscriptions(request: Request):
        q, ids, total, page, per_page = list_posts(
            request, "shop_subscription", statuses=tuple(SUBSCRIPTION_STATUS_LABELS), orderby_allowed=ORDERBY["posts"])
        return list_answer(request, q, "subscriptions", ids, total, page, per_page)

    @app.get(NS + "/refunds")
    def list_refunds(request: Request):
        q, ids, total, page, per_page = list_posts(
            request, "shop_order_refund", statuses=None, orderby_allowed=ORDERBY["posts"])
        return list_answer(request, q, "refunds", ids, total, page, per_page)

    @app.get(NS + "/orders/{oid}/refunds")
    def list_order_refunds(request: Request, oid: int):
        if domain.post(oid, ("shop_order",)) is None:
            raise StoreError("woocommerce_rest_order_invalid_id", "Invalid order ID.", 404)
        q, ids, total, page, per_page = list_posts(
            request, "shop_order_refund", statuses=None, orderby_allowed=ORDERBY["posts"], parent_in=[oid])
        return list_answer(request, q, "refunds", ids, total, page, per_page)

    @app.post(NS + "/orders/{oid}/refunds", status_code=201)
    async def create_order_refund(request: Request, oid: int):
        # WC_REST_Order_Refunds_V2_Controller::prepare_object_for_database (plugins/woocommerce/includes/
        # rest-api/Controllers/Version2/class-wc-rest-order-refunds-v2-controller.php): a missing order is
        # 404, a negative amount 400, anything wc_create_refund refuses (more than is left to refund, a
        # gateway that cannot refund when api_refund is true, its default) 500; meta_data saved after.
        body = await json_body(request)
        if domain.post(oid, ("shop_order",)) is None:
            raise StoreError("woocommerce_rest_invalid_order_id", "Invalid order ID.", 404)
        try:
            amount = float(body.get("amount") or 0)
        except (TypeError, ValueError):
            raise StoreError("rest_invalid_param", "Invalid parameter(s): amount", 400,
                             params={"amount": "amount is not of type string."}) from None
        if amount < 0:
            raise StoreError("woocommerce_rest_invalid_order_refund", "Refund amount must be greater than zero.", 400)
        rid = await asyncio.to_thread(locked, domain.create_refund_as_api, oid, amount, body.get("reason") or "",
                                      body.get("api_refund", True) is not False, body.get("line_items") or [],
                                      body.get("meta_data") or [])
        return JSONResponse(project_posts(request, "refunds", [rid])[0], status_code=201)

    @app.get(NS + "/orders/{oid}/refunds/{rid}")
    def get_order_refund(request: Request, oid: int, rid: int):
        row = domain.post(rid, ("shop_order_refund",))
        if row is None or row["post_parent"] != oid:
            raise StoreError("woocommerce_rest_invalid_id", "Invalid resource ID.", 404)
        return project_posts(request, "refunds", [rid])[0]

    @app.get(NS + "/subscriptions/{sid}/orders")
    def subscription_orders(request: Request, sid: int):
        sub = domain.post(sid, ("shop_subscription",))
        if sub is None:
            raise StoreError("woocommerce_rest_invalid_shop_subscription_id", "Invalid subscription ID.", 404)
        related = [(sub["post_parent"], "parent_order")] if sub["post_parent"] else []
        # get_related_orders() per type, parent then renewal then switch; within a type the
        # related-order store answers newest id first (WCS get_subscription_orders).
        related += [(r[0], "renewal_order") for r in store.db.execute(
            "SELECT post_id FROM postmeta WHERE meta_key='_subscription_renewal' AND meta_value=? ORDER BY post_id DESC",
            (json.dumps(str(sid)),))]
        related += [(r[0], "switch_order") for r in store.db.execute(
            "SELECT post_id FROM postmeta WHERE meta_key='_subscription_switch' AND meta_value=? ORDER BY post_id DESC",
            (json.dumps(str(sid)),))]
        kinds = dict(related)
        docs = project.orders(store, [i for i, _ in related], base(request))
        for d in docs:
            d["order_type"] = kinds[d["id"]]
        return JSONResponse(docs, headers={"X-WP-Total": str(len(docs)), "X-WP-TotalPages": "1"})

    def get_post_doc(request: Request, rest: str, pid: int, status_404: int = 404):
        post_type, label, _ = POST_RESOURCES[rest]
        types = (post_type,) if rest != "products" else ("product", "product_variation")
        if domain.post(pid, types) is None:
            raise StoreError(f"woocommerce_rest_{label}_invalid_id", "Invalid ID.", status_404)
        return project_posts(request, rest, [pid])[0]

    for rest in POST_RESOURCES:
        def make(rest=rest):
            post_type, label, resource = POST_RESOURCES[rest]

            @app.post(f"{NS}/{rest}/batch", name=f"batch_{rest}")
            async def batch(request: Request):
                body = await json_body(request)

                def one_create(item):
                    if rest == "products":
                        raise StoreError("woocommerce_rest_cannot_create", "Sorry, you are not allowed to create resources.", 403)
                    return get_post_doc(request, rest, domain.create_order(item, post_type))

                def one_update(item):
                    pid = int(item.get("id") or 0)
                    get_post_doc(request, rest, pid, status_404=400)
                    if rest == "products":
                        domain.update_product(pid, item)
                    else:
                        domain.update_order(pid, item, post_type)
                    return get_post_doc(request, rest, pid)

                def one_delete(pid):
                    doc = get_post_doc(request, rest, pid)
                    domain.delete_post(pid)  # batch deletes are always permanent
                    return doc

                return await asyncio.to_thread(run_batch, body, one_create, one_update, one_delete)

            @app.get(f"{NS}/{rest}/{{pid}}", name=f"get_{rest}")
            def get_one(request: Request, pid: int):
                return get_post_doc(request, rest, pid)

            @app.api_route(f"{NS}/{rest}/{{pid}}", methods=["PUT", "PATCH", "POST"], name=f"update_{rest}")
            async def update_one(request: Request, pid: int):
                body = await json_body(request)
                get_post_doc(request, rest, pid, status_404=400)
                if rest == "products":
                    await asyncio.to_thread(locked, domain.update_product, pid, body)
                else:
                    await asyncio.to_thread(locked, domain.update_order, pid, body, post_type)
                return get_post_doc(request, rest, pid)

            @app.delete(f"{NS}/{rest}/{{pid}}", name=f"delete_{rest}")
            def delete_one(request: Request, pid: int):
                doc = get_post_doc(request, rest, pid)
                force = Query(request).bool("force")
                if not force and doc["status"] == "trash":
                    raise StoreError("woocommerce_rest_already_trashed", f"The {label} has already been deleted.", 410)
                with store.write_lock:
                    if force:
                        domain.delete_post(pid)
                    else:
                        domain.trash(pid, resource)
                return doc

            @app.post(f"{NS}/{rest}", status_code=201, name=f"create_{rest}")
            async def create_one(request: Request):
                body = await json_body(request)
                if body.get("id"):
                    raise StoreError(f"woocommerce_rest_{label}_exists", f"Cannot create existing {label}.", 400)
                if rest == "products":
                    raise StoreError("woocommerce_rest_cannot_create", "Sorry, you are not allowed to create resources.", 403)
                pid = await asyncio.to_thread(locked, domain.create_order, body, post_type)
                return JSONResponse(get_post_doc(request, rest, pid), status_code=201,
                                    headers={"Location": f"{base(request)}/{rest}/{pid}"})

        make()

    # -- notes ---------------------------------------------------------------------------------
    for rest in ("orders", "subscriptions"):
        def make_notes(rest=rest):
            post_type, label, _ = POST_RESOURCES[rest]

            def owner(pid: int):
                if domain.post(pid, (post_type,)) is None:
                    raise StoreError(f"woocommerce_rest_{label}_invalid_id", "Invalid order ID.", 404)

            @app.get(f"{NS}/{rest}/{{pid}}/notes", name=f"notes_{rest}")
            def list_notes(request: Request, pid: int):
                owner(pid)
                q = Query(request)
                note_type = q.enum("type", ("any", "customer", "internal"), "any")
                q.check()
                return project.notes(store, pid, note_type)

            @app.post(f"{NS}/{rest}/{{pid}}/notes", status_code=201, name=f"add_note_{rest}")
            async def add_note(request: Request, pid: int):
                owner(pid)
                body = await json_body(request)
                if not body.get("note"):
                    raise StoreError("rest_missing_callback_param", "Missing parameter(s): note", 400,
                                     params=["note"])
                author = "system" if not body.get("added_by_user") else "shop_manager"
                nid = await asyncio.to_thread(locked, domain.add_note, pid, body["note"],
                                              bool(body.get("customer_note")), author)
                return JSONResponse(project.notes(store, pid, note_id=nid)[0], status_code=201)

            @app.get(f"{NS}/{rest}/{{pid}}/notes/{{nid}}", name=f"note_{rest}")
            def get_note(pid: int, nid: int):
                owner(pid)
                docs = project.notes(store, pid, note_id=nid)
                if not docs:
                    raise StoreError("woocommerce_rest_invalid_id", "Invalid resource ID.", 404)
                return docs[0]

            @app.delete(f"{NS}/{rest}/{{pid}}/notes/{{nid}}", name=f"delete_note_{rest}")
            def delete_note(request: Request, pid: int, nid: int):
                owner(pid)
                if not Query(request).bool("force"):
                    raise StoreError("woocommerce_rest_trash_not_supported", "Webhooks do not support trashing.", 501)
                docs = project.notes(store, pid, note_id=nid)
                if not docs:
                    raise StoreError("woocommerce_rest_invalid_id", "Invalid resource ID.", 404)
                with store.write_lock:
                    store.db.execute("DELETE FROM comments WHERE comment_id=?", (nid,))
                return docs[0]

        make_notes()

    # -- webhooks ------------------------------------------------------------------------------
    def webhook_doc(row) -> dict:
        created, modified = project.pair(store, row["date_created_gmt"]), project.pair(store, row["date_modified_gmt"])
        resource, event = row["topic"].split(".", 1)
        return {"id": row["id"], "name": row["name"], "status": row["status"], "topic": row["topic"],
                "resource": resource, "event": event, "hooks": [], "delivery_url": row["delivery_url"],
                "date_created": created[0], "date_created_gmt": created[1],
                "date_modified": modified[0], "date_modified_gmt": modified[1]}

    @app.get(NS + "/webhooks")
    def list_webhooks():
        return [webhook_doc(r) for r in store.db.execute("SELECT * FROM webhooks ORDER BY id")]

    @app.post(NS + "/webhooks", status_code=201)
    async def create_webhook(request: Request):
        body = await json_body(request)
        for field in ("topic", "delivery_url"):
            if not body.get(field):
                raise StoreError("rest_missing_callback_param", f"Missing parameter(s): {field}", 400, params=[field])
        _, now = store.stamp()
        with store.write_lock:
            cur = store.db.execute(
                "INSERT INTO webhooks(name, status, topic, delivery_url, secret, date_created_gmt, date_modified_gmt) "
                "VALUES (?,?,?,?,?,?,?)",
                (body.get("name", body["topic"]), body.get("status", "active"), body["topic"], body["delivery_url"],
                 body.get("secret") or default_secret(), now, now))
        wid = cur.lastrowid
        await asyncio.to_thread(hooks.ping, wid)
        row = store.db.execute("SELECT * FROM webhooks WHERE id=?", (wid,)).fetchone()
        return JSONResponse(webhook_doc(row), status_code=201)

    @app.api_route(NS + "/webhooks/{wid}", methods=["PUT", "PATCH"])
    async def update_webhook(request: Request, wid: int):
        body = await json_body(request)
        _, now = store.stamp()
        with store.write_lock:
            for key in ("name", "status", "topic", "delivery_url", "secret"):
                if key in body:
                    store.db.execute(f"UPDATE webhooks SET {key}=?, date_modified_gmt=? WHERE id=?", (body[key], now, wid))
            if body.get("status") == "active":
                store.db.execute("UPDATE webhooks SET failure_count=0 WHERE id=?", (wid,))
        row = store.db.execute("SELECT * FROM webhooks WHERE id=?", (wid,)).fetchone()
        if row is None:
            raise StoreError("woocommerce_rest_webhook_invalid_id", "Invalid ID.", 400)
        return webhook_doc(row)

    @app.get(NS + "/webhooks/{wid}")
    def get_webhook(wid: int):
        row = store.db.execute("SELECT * FROM webhooks WHERE id=?", (wid,)).fetchone()
        if row is None:
            raise StoreError("woocommerce_rest_webhook_invalid_id", "Invalid ID.", 404)
        return webhook_doc(row)

    @app.delete(NS + "/webhooks/{wid}")
    def delete_webhook(request: Request, wid: int):
        if not Query(request).bool("force"):
            raise StoreError("woocommerce_rest_trash_not_supported", "Webhooks do not support trashing.", 501)
        doc = get_webhook(wid)
        with store.write_lock:
            store.db.execute("DELETE FROM webhooks WHERE id=?", (wid,))
        return doc

    @app.api_route("/wp-json/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def no_route():
        return error("rest_no_route", "No route was found matching the URL and request method.", 404)

    def locked(fn, *args):
        with store.write_lock:
            return fn(*args)

    def run_batch(body: dict, one_create, one_update, one_delete) -> dict:
        creates, updates, deletes = body.get("create") or [], body.get("update") or [], body.get("delete") or []
        if len(creates) + len(updates) + len(deletes) > BATCH_LIMIT:
            raise StoreError("woocommerce_rest_request_entity_too_large",
                             f"Unable to accept more than {BATCH_LIMIT} items for this request.", 413)
        out: dict[str, list] = {}

        def attempt(fn, arg, fallback_id):
            try:
                with store.write_lock:
                    return fn(arg)
            except UncaughtException:
                raise  # kills the whole batch request, as the PHP exception would
            except StoreError as exc:
                return {"id": fallback_id, "error": {"code": exc.code, "message": exc.message,
                                                     "data": {"status": exc.status, **exc.data}}}

        if creates:
            out["create"] = [attempt(one_create, item, 0) for item in creates]
        if updates:
            out["update"] = [attempt(one_update, item, int(item.get("id") or 0)) for item in updates]
        if deletes:
            out["delete"] = [attempt(one_delete, int(i), int(i)) for i in deletes]
        return out

    app.state.started = time.time()
    return app


__all__ = ["create_app", "WWW_AUTH"]
