"""Writes to the sandbox store, with a real store's side effects.

Row builders (``*_rows``) return the rows one record needs in the generic tables; the generator
inserts them in bulk, the REST layer and the change simulator through the ``Store`` one at a time.
Every write goes through ``Changes.emit`` so webhooks fire exactly where WooCommerce fires them.
"""

from __future__ import annotations

import calendar
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from .catalog import ORDER_STATUS_LABELS, SUBSCRIPTION_STATUS_LABELS
from .storage import WP_FORMAT, Store, dumps

# Order properties stored as postmeta but not shown in meta_data (the data store's internal keys).
ORDER_INTERNAL_META = {
    "_order_key", "_order_currency", "_prices_include_tax", "_customer_ip_address", "_customer_user_agent",
    "_created_via", "_order_version", "_payment_method", "_payment_method_title", "_transaction_id",
    "_billing", "_shipping", "_cart_discount", "_cart_discount_tax", "_order_shipping", "_order_shipping_tax",
    "_order_tax", "_order_total", "_date_paid", "_date_completed", "_customer_note", "_cart_hash",
    "_order_number", "_billing_period", "_billing_interval", "_schedule_start", "_schedule_trial_end",
    "_schedule_next_payment", "_schedule_cancelled", "_schedule_end", "_schedule_last_payment",
    "_refund_amount", "_refund_reason", "_refunded_by", "_refunded_payment", "_wp_trash_meta_status",
    "_suspension_count", "_trial_period", "_requires_manual_renewal",
}
PRODUCT_INTERNAL_META = {
    "_sku", "_price", "_regular_price", "_sale_price", "_virtual", "_downloadable", "_tax_status", "_tax_class",
    "_manage_stock", "_stock", "_stock_status", "_weight", "_product_type", "_product_attributes",
    "_variation_attributes", "total_sales", "_subscription_period", "_subscription_period_interval",
    "_wp_trash_meta_status", "_description", "_short_description", "_thumbnail_id", "_product_image_gallery",
    "_sale_price_dates_from", "_sale_price_dates_to", "_downloadable_files", "_download_limit", "_download_expiry",
    "_length", "_width", "_height", "_backorders", "_low_stock_amount", "_global_unique_id", "_sold_individually",
    "_purchase_note", "_upsell_ids", "_crosssell_ids", "_wc_rating_count", "_wc_review_count", "_wc_average_rating",
    "_product_url", "_button_text", "_children", "_featured", "_reviews_allowed",
}
USER_INTERNAL_META = {"first_name", "last_name", "billing", "shipping", "last_update", "paying_customer"}
ITEM_INTERNAL_META = {
    "_product_id", "_variation_id", "_qty", "_tax_class", "_line_subtotal", "_line_subtotal_tax", "_line_total",
    "_line_tax", "_line_tax_data", "rate_id", "label", "compound", "tax_amount", "shipping_tax_amount",
    "rate_percent", "method_id", "instance_id", "cost", "total_tax", "taxes", "discount_amount",
    "discount_amount_tax", "_refunded_item_id", "_tax_status", "discount_type", "nominal_amount",
}


def money(x: float) -> str:
    return f"{x:.2f}"


class Changes:
    """Listeners told of every create/update/delete/restore (webhooks subscribe here)."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[str, str, int], None]] = []

    def emit(self, resource: str, event: str, record_id: int) -> None:
        for listener in self.listeners:
            listener(resource, event, record_id)


class StoreError(Exception):
    """A WooCommerce-shaped error: code, message, HTTP status."""

    def __init__(self, code: str, message: str, status: int, **data):
        super().__init__(message)
        self.code, self.message, self.status, self.data = code, message, status, data


class UncaughtException(StoreError):
    """A PHP exception nobody catches: WordPress's fatal-error handler answers HTTP 500 (JSON
    ``internal_server_error`` for a JSON request) and the whole request dies, a batch included."""

    def __init__(self, message: str):
        super().__init__("internal_server_error", message, 500)


def wp_list(values) -> str:
    """``wp_sprintf_l``: 'a', 'a and b', 'a, b, and c' (wp-includes/formatting.php)."""
    values = [str(v) for v in values]
    if len(values) <= 1:
        return "".join(values)
    if len(values) == 2:
        return f"{values[0]} and {values[1]}"
    return ", ".join(values[:-1]) + ", and " + values[-1]


def enum_error(param: str, allowed) -> tuple[str, str, None]:
    """``rest_validate_enum`` (wp-includes/rest-api.php): code rest_not_in_enum, no error data."""
    allowed = list(allowed)
    if len(allowed) == 1:
        return "rest_not_in_enum", f"{param} is not {allowed[0]}.", None
    return "rest_not_in_enum", f"{param} is not one of {wp_list(allowed)}.", None


def invalid_params(errors: dict[str, tuple[str, str, object]]) -> StoreError:
    """``WP_REST_Request::has_valid_params``: every bad parameter at once, each with its reason in
    ``params`` and the whole ``rest_convert_error_to_response`` body ({code, message, data}) in ``details``
    (wp-includes/rest-api/class-wp-rest-request.php)."""
    return StoreError("rest_invalid_param", f"Invalid parameter(s): {', '.join(errors)}", 400,
                      params={k: msg for k, (_, msg, _) in errors.items()},
                      details={k: {"code": code, "message": msg, "data": data}
                               for k, (code, msg, data) in errors.items()})


# --------------------------------------------------------------------------------------------
# Subscription calendar (includes/core/wcs-time-functions.php, WCS 9)
# --------------------------------------------------------------------------------------------
def add_period(when: datetime, interval: int, period: str, offset: timedelta = timedelta(0)) -> datetime:
    """``wcs_add_time(interval, period, when, 'offset_site_time')`` on naive GMT datetimes.

    Months are calendar months counted in site time (``wcs_add_months``): the same day of the month,
    or the last day of the month when the start is a month's last day or the target month is too
    short (31 January -> 28/29 February -> 31 March). Days, weeks and years are PHP ``strtotime``
    steps (29 February + 1 year = 1 March).
    """
    if interval <= 0:
        return when
    if period == "month":
        local = when + offset
        last_day = calendar.monthrange(local.year, local.month)[1]
        y, m = divmod(local.month - 1 + interval, 12)
        target_days = calendar.monthrange(local.year + y, m + 1)[1]
        if local.day == last_day or local.day > target_days:
            for _ in range(interval):  # hop to the last day of each next month
                y2, m2 = divmod(local.month, 12)
                local = local.replace(day=1, year=local.year + y2, month=m2 + 1)
                local = local.replace(day=calendar.monthrange(local.year, local.month)[1])
        else:
            local = local.replace(year=local.year + y, month=m + 1)
        return local - offset
    if period == "year":
        try:
            return when.replace(year=when.year + interval)
        except ValueError:  # 29 February: strtotime rolls over to 1 March
            return when.replace(year=when.year + interval, month=3, day=1)
    return when + timedelta(days={"day": 1, "week": 7}[period] * interval)


def product_flags(store: Store, product_ids: set[int]) -> dict[int, tuple[bool, bool]]:
    """(virtual, downloadable) per existing product or variation; deleted products are absent."""
    if not product_ids:
        return {}
    ids = list(product_ids)
    out: dict[int, tuple[bool, bool]] = {i: (False, False) for i in ids
                                         if store.db.execute("SELECT 1 FROM posts WHERE id=?", (i,)).fetchone()}
    marks = ",".join("?" * len(ids))
    flags: dict[int, dict[str, bool]] = {}
    for r in store.db.execute(f"SELECT post_id, meta_key, meta_value FROM postmeta WHERE post_id IN ({marks}) "
                              f"AND meta_key IN ('_virtual', '_downloadable')", ids):
        flags.setdefault(r[0], {})[r[1]] = r[2] in ("true", '"yes"', "1")
    for pid in out:
        f = flags.get(pid, {})
        out[pid] = (f.get("_virtual", False), f.get("_downloadable", False))
    return out


def needs_processing(line_products: list[int], flags: dict[int, tuple[bool, bool]]) -> bool:
    """``WC_Order::needs_processing`` (class-wc-order.php): some line item's product is not both
    virtual and downloadable; items whose product is gone are skipped; no items, no processing."""
    return any(pid in flags and not all(flags[pid]) for pid in line_products)


# --------------------------------------------------------------------------------------------
# Row builders
# --------------------------------------------------------------------------------------------
def post_row(store: Store, post_id: int, post_type: str, status: str, created: datetime, modified: datetime,
             parent: int = 0, customer_id: int = 0, title: str = "", slug: str = "", menu_order: int = 0) -> tuple:
    c_local, c_gmt = store.stamp(created)
    m_local, m_gmt = store.stamp(modified)
    return (post_id, post_type, status, parent, customer_id, title, slug, c_local, c_gmt, m_local, m_gmt, menu_order)


POST_INSERT = (
    "INSERT INTO posts(id, post_type, post_status, post_parent, customer_id, post_title, post_name, post_date, "
    "post_date_gmt, post_modified, post_modified_gmt, menu_order) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


def order_lines_rows(order_id: int, first_item_id: int, lines: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """Rows for order_items + order_itemmeta. ``lines`` carry 'type', 'name' and their meta dict."""
    items, metas = [], []
    item_id = first_item_id
    for line in lines:
        items.append((item_id, order_id, line["type"], line["name"]))
        for key, value in line["meta"].items():
            metas.append((item_id, key, dumps(value)))
        line["id"] = item_id
        item_id += 1
    return items, metas


def build_order_lines(products: list[dict], qtys: list[int], tax_rate: float, shipping: float | None,
                      fee: float | None, coupon: tuple[str, float] | None, rate_id: int, rate_code: str) -> tuple[list[dict], dict]:
    """Compute lines and totals the way WooCommerce would (prices exclusive of tax)."""
    lines, cart_total, cart_tax = [], 0.0, 0.0
    discount = 0.0
    for product, qty in zip(products, qtys, strict=True):
        subtotal = round(product["price"] * qty, 2)
        total = subtotal
        if coupon:
            d = round(subtotal * coupon[1] / 100, 2)
            total = round(subtotal - d, 2)
            discount += d
        sub_tax, tax = round(subtotal * tax_rate, 2), round(total * tax_rate, 2)
        cart_total += total
        cart_tax += tax
        meta = {
            "_product_id": product["parent_id"] or product["id"],
            "_variation_id": product["id"] if product["parent_id"] else 0,
            "_qty": qty, "_tax_class": product.get("tax_class", ""),
            "_line_subtotal": money(subtotal), "_line_subtotal_tax": money(sub_tax),
            "_line_total": money(total), "_line_tax": money(tax),
            "_line_tax_data": {"total": {str(rate_id): money(tax)}, "subtotal": {str(rate_id): money(sub_tax)}},
        }
        meta.update(product.get("item_meta", {}))
        lines.append({"type": "line_item", "name": product["name"], "meta": meta})
    ship_tax = 0.0
    if shipping is not None:
        ship_tax = round(shipping * tax_rate, 2)
        lines.append({"type": "shipping", "name": "Flat rate", "meta": {
            "method_id": "flat_rate", "instance_id": "1", "cost": money(shipping), "total_tax": money(ship_tax),
            "taxes": {"total": {str(rate_id): money(ship_tax)}}}})
    fee_tax = 0.0
    if fee is not None:
        fee_tax = round(fee * tax_rate, 2)
        lines.append({"type": "fee", "name": "Payment fee", "meta": {
            "_line_total": money(fee), "_line_tax": money(fee_tax), "_tax_class": "", "_tax_status": "taxable",
            "_line_tax_data": {"total": {str(rate_id): money(fee_tax)}}}})
    if coupon:
        lines.append({"type": "coupon", "name": coupon[0], "meta": {
            "discount_amount": money(discount), "discount_amount_tax": money(round(discount * tax_rate, 2)),
            "discount_type": "percent", "nominal_amount": coupon[1]}})
    total_tax = round(cart_tax + ship_tax + fee_tax, 2)
    lines.append({"type": "tax", "name": rate_code, "meta": {
        "rate_id": rate_id, "label": "VAT" if tax_rate else "Tax", "compound": False,
        "tax_amount": money(round(cart_tax + fee_tax, 2)), "shipping_tax_amount": money(ship_tax),
        "rate_percent": round(tax_rate * 100, 2)}})
    totals = {
        "_cart_discount": money(discount), "_cart_discount_tax": money(round(discount * tax_rate, 2)),
        "_order_shipping": money(shipping or 0), "_order_shipping_tax": money(ship_tax),
        "_order_tax": money(total_tax),
        "_order_total": money(round(cart_total + (shipping or 0) + (fee or 0) + total_tax, 2)),
    }
    return lines, totals


# --------------------------------------------------------------------------------------------
# Single-record writes (REST layer and change simulator)
# --------------------------------------------------------------------------------------------
class Domain:
    def __init__(self, store: Store, changes: Changes | None = None):
        self.store = store
        self.changes = changes or Changes()

    @property
    def db(self):
        return self.store.db

    # -- generic ---------------------------------------------------------------------------
    def post(self, post_id: int, types: tuple[str, ...]):
        row = self.db.execute("SELECT * FROM posts WHERE id=?", (post_id,)).fetchone()
        if row is None or row["post_type"] not in types:
            return None
        return row

    def add_note(self, post_id: int, note: str, customer_note: bool = False, author: str = "system") -> int:
        local, gmt = self.store.stamp()
        cur = self.db.execute(
            "INSERT INTO comments(post_id, comment_date, comment_date_gmt, content, author, customer_note) "
            "VALUES (?,?,?,?,?,?)", (post_id, local, gmt, note, author, int(customer_note)))
        return cur.lastrowid

    def _set_post_meta(self, post_id: int, key: str, value, meta_id: int | None = None) -> None:
        self.store.set_meta("postmeta", "post_id", post_id, key, value, meta_id)

    def trash(self, post_id: int, resource: str) -> None:
        row = self.db.execute("SELECT post_status FROM posts WHERE id=?", (post_id,)).fetchone()
        self._set_post_meta(post_id, "_wp_trash_meta_status", row["post_status"])
        self.db.execute("UPDATE posts SET post_status='trash' WHERE id=?", (post_id,))
        self.store.touch_post(post_id)
        self.changes.emit(resource, "deleted", post_id)

    def untrash(self, post_id: int, resource: str) -> None:
        previous = self.store.post_meta(post_id).get("_wp_trash_meta_status", "pending")
        self.db.execute("UPDATE posts SET post_status=? WHERE id=?", (previous, post_id))
        self.store.delete_meta("postmeta", "post_id", post_id, "_wp_trash_meta_status")
        self.store.touch_post(post_id)
        self.changes.emit(resource, "restored", post_id)

    def delete_post(self, post_id: int) -> None:
        """Permanent delete: no hook fires for orders (``order.deleted`` is sent on trash only)."""
        item_ids = [r[0] for r in self.db.execute("SELECT order_item_id FROM order_items WHERE order_id=?", (post_id,))]
        for chunk_start in range(0, len(item_ids), 500):
            chunk = item_ids[chunk_start:chunk_start + 500]
            self.db.execute(f"DELETE FROM order_itemmeta WHERE order_item_id IN ({','.join('?' * len(chunk))})", chunk)
        self.db.execute("DELETE FROM order_items WHERE order_id=?", (post_id,))
        self.db.execute("DELETE FROM postmeta WHERE post_id=?", (post_id,))
        self.db.execute("DELETE FROM comments WHERE post_id=?", (post_id,))
        self.db.execute("DELETE FROM term_relationships WHERE object_id=?", (post_id,))
        self.db.execute("DELETE FROM posts WHERE id=?", (post_id,))

    # -- customers -------------------------------------------------------------------------
    def create_customer(self, data: dict) -> int:
        email = (data.get("email") or "").strip()
        if not email or "@" not in email:
            raise invalid_params({"email": ("rest_invalid_email", "Invalid email address.", None)})
        if self.db.execute("SELECT 1 FROM users WHERE user_email=?", (email,)).fetchone():
            raise StoreError("registration-error-email-exists",
                             "An account is already registered with your email address.", 400)
        gmt = self.store.now_gmt()
        username = data.get("username") or email.split("@")[0]
        first, last = data.get("first_name", ""), data.get("last_name", "")
        cur = self.db.execute(
            "INSERT INTO users(user_login, user_email, user_registered, display_name, role) VALUES (?,?,?,?,?)",
            (username, email, gmt.strftime(WP_FORMAT), f"{first} {last}".strip() or username, "customer"))
        user_id = cur.lastrowid
        meta = {"first_name": first, "last_name": last, "billing": data.get("billing") or {},
                "shipping": data.get("shipping") or {}, "last_update": int(gmt.timestamp()) + 0,
                "paying_customer": False}
        for m in data.get("meta_data") or []:
            meta[m["key"]] = m["value"]
        for key, value in meta.items():
            self.store.set_meta("usermeta", "user_id", user_id, key, value)
        self.changes.emit("customer", "created", user_id)
        return user_id

    def update_customer(self, user_id: int, data: dict) -> None:
        if not self.db.execute("SELECT 1 FROM users WHERE id=?", (user_id,)).fetchone():
            raise StoreError("woocommerce_rest_invalid_id", "Invalid resource ID.", 400)
        if "email" in data:
            self.db.execute("UPDATE users SET user_email=? WHERE id=?", (data["email"], user_id))
        for key in ("first_name", "last_name"):
            if key in data:
                self.store.set_meta("usermeta", "user_id", user_id, key, data[key])
        for block in ("billing", "shipping"):
            if block in data:
                current = {k: v for _, k, v in self.store.meta_for("usermeta", "user_id", [user_id])[user_id]}.get(block) or {}
                current.update(data[block])
                self.store.set_meta("usermeta", "user_id", user_id, block, current)
        for m in data.get("meta_data") or []:
            self.store.set_meta("usermeta", "user_id", user_id, m["key"], m["value"], m.get("id"))
        self.store.set_meta("usermeta", "user_id", user_id, "last_update", int(self.store.now_gmt().timestamp()))
        self.changes.emit("customer", "updated", user_id)

    def delete_customer(self, user_id: int) -> None:
        self.db.execute("DELETE FROM usermeta WHERE user_id=?", (user_id,))
        self.db.execute("DELETE FROM users WHERE id=?", (user_id,))
        self.changes.emit("customer", "deleted", user_id)

    # -- products --------------------------------------------------------------------------
    def update_product(self, post_id: int, data: dict) -> None:
        for key, meta_key in (("regular_price", "_regular_price"), ("sale_price", "_sale_price"), ("sku", "_sku"),
                              ("stock_status", "_stock_status"), ("stock_quantity", "_stock")):
            if key in data:
                self._set_post_meta(post_id, meta_key, data[key])
        if "regular_price" in data or "sale_price" in data:
            meta = self.store.post_meta(post_id)
            self._set_post_meta(post_id, "_price", meta.get("_sale_price") or meta.get("_regular_price") or "")
        if "name" in data:
            self.db.execute("UPDATE posts SET post_title=? WHERE id=?", (data["name"], post_id))
        if "status" in data:
            self.db.execute("UPDATE posts SET post_status=? WHERE id=?", (data["status"], post_id))
        for m in data.get("meta_data") or []:
            self._set_post_meta(post_id, m["key"], m["value"], m.get("id"))
        self.store.touch_post(post_id)
        self.changes.emit("product", "updated", post_id)

    # -- orders and subscriptions ----------------------------------------------------------
    def create_order(self, data: dict, post_type: str = "shop_order", parent: int = 0,
                     created: datetime | None = None) -> int:
        customer_id = int(data.get("customer_id") or 0)
        if customer_id and not self.db.execute("SELECT 1 FROM users WHERE id=?", (customer_id,)).fetchone():
            raise StoreError("woocommerce_rest_invalid_customer_id", "Customer ID is invalid.", 400)
        status = data.get("status", "pending")
        valid = SUBSCRIPTION_STATUS_LABELS if post_type == "shop_subscription" else ORDER_STATUS_LABELS
        if status not in valid:
            raise invalid_params({"status": enum_error("status", valid)})
        products = []
        for li in data.get("line_items") or []:
            pid = int(li.get("variation_id") or li.get("product_id") or 0)
            prow = self.post(pid, ("product", "product_variation"))
            if prow is None:
                raise StoreError("woocommerce_rest_invalid_product_id", "Invalid product ID.", 400)
            meta = self.store.post_meta(pid)
            products.append({"id": pid, "parent_id": prow["post_parent"], "name": prow["post_title"],
                             "price": float(meta.get("_price") or 0), "qty": int(li.get("quantity", 1))})
        created = created or self.store.now_gmt()
        with self.store.write_lock:
            post_id = self.store.next_post_id()
            self.db.execute(POST_INSERT, post_row(self.store, post_id, post_type, status, created, created,
                                                  parent=parent, customer_id=customer_id))
            lines, totals = build_order_lines(products, [p["qty"] for p in products], 0.21,
                                              float(data["shipping_total"]) if data.get("shipping_total") else None,
                                              None, None, 1, "ES-VAT-1")
            first_item = self.db.execute("SELECT COALESCE(MAX(order_item_id),0)+1 FROM order_items").fetchone()[0]
            items, item_meta = order_lines_rows(post_id, first_item, lines)
            self.db.executemany("INSERT INTO order_items VALUES (?,?,?,?)", items)
            self.db.executemany("INSERT INTO order_itemmeta(order_item_id, meta_key, meta_value) VALUES (?,?,?)",
                                item_meta)
            meta = {
                "_order_key": "wc_order_" + secrets.token_hex(6), "_order_currency": data.get("currency", "EUR"),
                "_prices_include_tax": "no", "_created_via": data.get("created_via", "rest-api"),
                "_order_version": "9.4.0", "_payment_method": data.get("payment_method", ""),
                "_payment_method_title": data.get("payment_method_title", ""),
                "_transaction_id": data.get("transaction_id", ""),
                "_billing": data.get("billing") or {}, "_shipping": data.get("shipping") or {},
                "_customer_note": data.get("customer_note", ""), **totals,
            }
            for key in ("_billing_period", "_billing_interval", "_schedule_start", "_schedule_next_payment",
                        "_schedule_trial_end", "_schedule_end", "_schedule_cancelled", "_schedule_last_payment"):
                if key in data:
                    meta[key] = data[key]
            for m in data.get("meta_data") or []:
                meta[m["key"]] = m["value"]
            self.db.executemany("INSERT INTO postmeta(post_id, meta_key, meta_value) VALUES (?,?,?)",
                                [(post_id, k, dumps(v)) for k, v in meta.items()])
            # On create, set_paid always calls payment_complete (``$creating || needs_payment()``).
            if data.get("set_paid") is True and post_type == "shop_order":
                self._payment_complete(post_id, data.get("transaction_id") or "")
        resource = "subscription" if post_type == "shop_subscription" else "order"
        self.changes.emit(resource, "created", post_id)
        return post_id

    # -- order rules (class-wc-order.php, abstract-wc-order.php) --------------------------
    def _line_products(self, post_id: int) -> list[int]:
        """The product each line item loads (``get_product``: the variation when there is one)."""
        items: dict[int, dict[str, int]] = {}
        for r in self.db.execute(
            "SELECT i.order_item_id, im.meta_key, im.meta_value FROM order_items i JOIN order_itemmeta im "
            "ON im.order_item_id=i.order_item_id WHERE i.order_id=? AND i.order_item_type='line_item' "
            "AND im.meta_key IN ('_product_id', '_variation_id')", (post_id,)):
            items.setdefault(r[0], {})[r[1]] = int(str(r[2] or 0).strip('"') or 0)
        return [m.get("_variation_id") or m.get("_product_id") or 0 for _, m in sorted(items.items())]

    def needs_processing(self, post_id: int) -> bool:
        products = self._line_products(post_id)
        return needs_processing(products, product_flags(self.store, set(products)))

    def needs_payment(self, post_id: int) -> bool:
        """``WC_Abstract_Order::needs_payment``: pending or failed, and a total above zero."""
        row = self.db.execute("SELECT post_status FROM posts WHERE id=?", (post_id,)).fetchone()
        total = float(self.store.post_meta(post_id).get("_order_total") or 0)
        return row is not None and row["post_status"] in ("pending", "failed") and total > 0

    def _payment_complete(self, post_id: int, transaction_id: str = "") -> None:
        """``WC_Order::payment_complete``: acts only from on-hold, pending, failed or cancelled; keeps
        an existing ``date_paid``; moves to processing, or completed when nothing needs processing."""
        row = self.db.execute("SELECT post_status FROM posts WHERE id=?", (post_id,)).fetchone()
        if row["post_status"] not in ("on-hold", "pending", "failed", "cancelled"):
            return
        if transaction_id:
            self._set_post_meta(post_id, "_transaction_id", transaction_id)
        if not self.store.post_meta(post_id).get("_date_paid"):
            self._set_post_meta(post_id, "_date_paid", self.store.now_gmt().strftime(WP_FORMAT))
        self._change_status(post_id, "processing" if self.needs_processing(post_id) else "completed", "shop_order")

    def _change_status(self, post_id: int, new: str, post_type: str, note_suffix: str = "") -> str | None:
        row = self.db.execute("SELECT post_status FROM posts WHERE id=?", (post_id,)).fetchone()
        old = row["post_status"]
        if old == new:
            return None
        self.db.execute("UPDATE posts SET post_status=? WHERE id=?", (new, post_id))
        now = self.store.now_gmt().strftime(WP_FORMAT)
        if post_type == "shop_order":
            labels = ORDER_STATUS_LABELS
            meta = self.store.post_meta(post_id)
            # maybe_set_date_paid: set once, on reaching the payment-complete status (processing, or
            # completed when nothing needs processing), or completed having skipped processing.
            if not meta.get("_date_paid"):
                paid_status = "processing" if self.needs_processing(post_id) else "completed"
                if new == paid_status or (paid_status == "processing" and new == "completed"):
                    self._set_post_meta(post_id, "_date_paid", now)
            # maybe_set_date_completed: on every entry to completed.
            if new == "completed":
                self._set_post_meta(post_id, "_date_completed", now)
            self.add_note(post_id, f"Order status changed from {labels.get(old, old)} to {labels.get(new, new)}.{note_suffix}")
        else:
            labels = SUBSCRIPTION_STATUS_LABELS
            self.add_note(post_id, f"Status changed from {labels.get(old, old)} to {labels.get(new, new)}.")
        return old

    def update_order(self, post_id: int, data: dict, post_type: str = "shop_order") -> None:
        """PUT /orders/{id} or /subscriptions/{id}: fields first, status last, then save
        (``save_object`` in class-wc-rest-orders-controller.php; ``prepare_object_for_database`` in
        WCS's includes/api/class-wc-rest-subscriptions-controller.php)."""
        resource = "subscription" if post_type == "shop_subscription" else "order"
        row = self.post(post_id, (post_type,))
        if row is None:
            code = "woocommerce_rest_shop_subscription_invalid_id" if resource == "subscription" else "woocommerce_rest_shop_order_invalid_id"
            raise StoreError(code, "Invalid ID.", 400)
        valid = SUBSCRIPTION_STATUS_LABELS if post_type == "shop_subscription" else ORDER_STATUS_LABELS
        errors = {key: enum_error(key, valid) for key in ("status", "transition_status")
                  if key in data and data[key] not in valid}
        if errors:
            raise invalid_params(errors)
        if "customer_id" in data and int(data["customer_id"] or 0):
            if not self.db.execute("SELECT 1 FROM users WHERE id=?", (int(data["customer_id"]),)).fetchone():
                raise StoreError("woocommerce_rest_invalid_customer_id", "Customer ID is invalid.", 400)
        with self.store.write_lock:
            if post_type == "shop_subscription":
                # update_dates() saves the dates at once (save_dates), before the status is looked at.
                for key, meta_key in (("start_date", "_schedule_start"), ("trial_end_date", "_schedule_trial_end"),
                                      ("next_payment_date", "_schedule_next_payment"),
                                      ("cancelled_date", "_schedule_cancelled"), ("end_date", "_schedule_end")):
                    if key in data:
                        self._set_post_meta(post_id, meta_key, (data[key] or "").replace("T", " "))
                if "transition_status" in data:
                    # update_status() throws before save(): nothing else of the request is stored.
                    self._check_subscription_transition(post_id, data["transition_status"])
            if "customer_id" in data:
                self.db.execute("UPDATE posts SET customer_id=? WHERE id=?", (int(data["customer_id"] or 0), post_id))
            for key in ("payment_method", "payment_method_title", "customer_note") + (
                    ("transaction_id",) if post_type == "shop_order" else ()):
                if key in data:
                    self._set_post_meta(post_id, "_" + key, data[key])
            for block in ("billing", "shipping"):
                if block in data:
                    current = self.store.post_meta(post_id).get("_" + block) or {}
                    current.update(data[block])
                    self._set_post_meta(post_id, "_" + block, current)
            for m in data.get("meta_data") or []:
                self._set_post_meta(post_id, m["key"], m["value"], m.get("id"))
            if post_type == "shop_subscription":
                if "transition_status" in data:
                    self._subscription_transition(post_id, data["transition_status"])
                elif "status" in data:
                    self._change_status(post_id, data["status"], post_type)  # set_status(): no rule check
            else:
                if "status" in data:
                    self._change_status(post_id, data["status"], post_type)
                # After the save, and only when the order still needs payment (so not when the same
                # request moved it to on-hold or processing).
                if data.get("set_paid") is True and self.needs_payment(post_id):
                    self._payment_complete(post_id, data.get("transaction_id") or "")
            self.store.touch_post(post_id)
        self.changes.emit(resource, "updated", post_id)

    # -- subscription rules (includes/core/class-wc-subscription.php, WCS 9) -------------------
    def subscription_needs_payment(self, post_id: int) -> bool:
        """``WC_Subscription::needs_payment``: itself pending/failed with a total, or an unpaid (or
        on-hold/cancelled) parent order, or an unpaid/on-hold/failed/cancelled last renewal."""
        if self.needs_payment(post_id):
            return True
        sub = self.db.execute("SELECT post_parent FROM posts WHERE id=?", (post_id,)).fetchone()
        if sub and sub["post_parent"]:
            parent = self.db.execute("SELECT post_status FROM posts WHERE id=?", (sub["post_parent"],)).fetchone()
            if parent and (self.needs_payment(sub["post_parent"]) or parent["post_status"] in ("on-hold", "cancelled")):
                return True
        last = self.db.execute(
            "SELECT p.id, p.post_status FROM postmeta m JOIN posts p ON p.id=m.post_id WHERE "
            "m.meta_key='_subscription_renewal' AND m.meta_value=? ORDER BY p.id DESC LIMIT 1",
            (dumps(str(post_id)),)).fetchone()
        return bool(last and (self.needs_payment(last["id"]) or last["post_status"] in ("on-hold", "failed", "cancelled")))

    def _sub_time(self, meta: dict, key: str) -> datetime | None:
        value = meta.get(f"_schedule_{key}")
        return datetime.strptime(value, WP_FORMAT) if value else None

    def can_be_updated_to(self, post_id: int, new: str) -> bool:
        """``WC_Subscription::can_be_updated_to``. Every sandbox gateway supports every subscription
        feature (or the subscription renews manually, which ``payment_method_supports`` treats alike)."""
        old = self.db.execute("SELECT post_status FROM posts WHERE id=?", (post_id,)).fetchone()["post_status"]
        meta = self.store.post_meta(post_id)
        now = self.store.now_gmt()
        end = self._sub_time(meta, "end")
        ended = ("cancelled", "trash", "expired", "switched", "pending-cancel")  # wcs_get_subscription_ended_statuses
        if new == "pending":
            return old in ("auto-draft", "draft")
        if new in ("active", "completed"):
            if old == "on-hold":
                return end is None or end >= now
            if old == "pending":
                return True
            return old == "pending-cancel" and end is not None and end > now
        if new in ("on-hold", "failed"):
            return old in ("active", "pending")
        if new == "cancelled":
            return old == "pending-cancel" or old not in ended
        if new == "pending-cancel":
            return old == "active" or (old in ("cancelled", "on-hold") and not self.subscription_needs_payment(post_id))
        if new == "expired":
            return old not in ("cancelled", "trash", "switched")
        return False  # 'switched' and the rest: the woocommerce_can_subscription_be_updated_to filter says no

    def _check_subscription_transition(self, post_id: int, new: str) -> None:
        old = self.db.execute("SELECT post_status FROM posts WHERE id=?", (post_id,)).fetchone()["post_status"]
        if new != old and not self.can_be_updated_to(post_id, new):
            message = f'Unable to change subscription status to "{new}".'
            self.add_note(post_id, message)
            # A plain Exception the REST controller does not catch.
            raise UncaughtException(message)

    def calculate_next_payment(self, post_id: int) -> datetime | None:
        """``calculate_next_payment_date``: from the last payment (else the start), by whole billing
        periods in calendar terms, until more than 2 hours ahead; none past the end date."""
        meta = self.store.post_meta(post_id)
        now = self.store.now_gmt()
        start, nxt = self._sub_time(meta, "start"), self._sub_time(meta, "next_payment")
        trial_end, last, end = (self._sub_time(meta, k) for k in ("trial_end", "last_payment", "end"))
        if trial_end and trial_end > now:
            when = trial_end
        else:
            if last and start and last >= start:
                when = last
            elif nxt and start and nxt > start:
                when = nxt
            else:
                when = start or now
            interval, period = int(meta.get("_billing_interval") or 1), meta.get("_billing_period") or "month"
            offset = self.store.tz.utcoffset(now.replace(tzinfo=None)) or timedelta(0)
            when = add_period(when, interval, period, offset)
            for _ in range(3000):
                if when >= now + timedelta(hours=2):
                    break
                when = add_period(when, interval, period, offset)
        if end and when + timedelta(hours=23) > end:
            return None
        return when

    def _subscription_transition(self, post_id: int, new: str) -> None:
        """``update_status``: the store-UI path, with the date side effects ``set_status`` skips."""
        meta = self.store.post_meta(post_id)
        old = self._change_status(post_id, new, "shop_subscription")
        if old is None:
            return
        now = self.store.now_gmt()
        fmt = now.strftime(WP_FORMAT)
        if new == "pending-cancel":
            self._set_post_meta(post_id, "end_date_pre_cancellation", meta.get("_schedule_end") or 0)
            self._set_post_meta(post_id, "trial_end_pre_cancellation", meta.get("_schedule_trial_end") or 0)
            nxt, end = self._sub_time(meta, "next_payment"), self._sub_time(meta, "end")
            # end_of_prepaid_term: the next payment if still ahead, else now (or the end date)
            if nxt and nxt >= now:
                end_of_term = nxt
            elif not nxt or not end or end <= now:
                end_of_term = now
            else:
                end_of_term = end
            self._set_post_meta(post_id, "_schedule_trial_end", "")
            self._set_post_meta(post_id, "_schedule_next_payment", "")
            self._set_post_meta(post_id, "_schedule_cancelled", fmt)
            self._set_post_meta(post_id, "_schedule_end", max(end_of_term, now).strftime(WP_FORMAT))
        elif new in ("active", "completed"):
            if old == "pending-cancel":
                pre_end, pre_trial = meta.get("end_date_pre_cancellation"), meta.get("trial_end_pre_cancellation")
                self._set_post_meta(post_id, "_schedule_cancelled", "")
                self._set_post_meta(post_id, "_schedule_next_payment", meta.get("_schedule_end") or "")
                self._set_post_meta(post_id, "_schedule_end", pre_end or "")
                self._set_post_meta(post_id, "_schedule_trial_end", pre_trial or "")
            else:
                stored = self._sub_time(meta, "next_payment")
                # A stored next payment more than 2 hours ahead is kept as it is.
                if stored is None or stored < now + timedelta(hours=2):
                    calculated = self.calculate_next_payment(post_id)
                    if calculated is not None:
                        self._set_post_meta(post_id, "_schedule_next_payment", calculated.strftime(WP_FORMAT))
                    elif stored is not None and stored < now:
                        self._set_post_meta(post_id, "_schedule_next_payment", "")
        elif new in ("on-hold", "failed"):
            self._set_post_meta(post_id, "_suspension_count", int(meta.get("_suspension_count") or 0) + 1)
        elif new in ("cancelled", "switched", "expired"):
            self._set_post_meta(post_id, "_schedule_trial_end", "")
            self._set_post_meta(post_id, "_schedule_next_payment", "")
            self._set_post_meta(post_id, "_schedule_end", fmt)
            # The cancelled date only if unset (pending-cancel set it already).
            if new == "cancelled" and not meta.get("_schedule_cancelled"):
                self._set_post_meta(post_id, "_schedule_cancelled", fmt)

    def create_renewal(self, subscription_id: int, paid: bool = True) -> int:
        """A renewal order for an active subscription, carrying ``_subscription_renewal``."""
        sub = self.db.execute("SELECT * FROM posts WHERE id=?", (subscription_id,)).fetchone()
        meta = self.store.post_meta(subscription_id)
        lines = self.db.execute(
            "SELECT i.order_item_id FROM order_items i WHERE i.order_id=? AND i.order_item_type='line_item'",
            (subscription_id,)).fetchall()
        line_items = []
        item_meta = self.store.meta_for("order_itemmeta", "order_item_id", [r[0] for r in lines])
        for r in lines:
            m = {k: v for _, k, v in item_meta[r[0]]}
            line_items.append({"product_id": m.get("_product_id"), "variation_id": m.get("_variation_id"),
                               "quantity": m.get("_qty", 1)})
        order_id = self.create_order({
            "customer_id": sub["customer_id"], "status": "pending", "line_items": line_items,
            "billing": meta.get("_billing"), "shipping": meta.get("_shipping"),
            "payment_method": meta.get("_payment_method", ""),
            "payment_method_title": meta.get("_payment_method_title", ""), "created_via": "subscription",
            "currency": meta.get("_order_currency", "EUR"),
            "meta_data": [{"key": "_subscription_renewal", "value": str(subscription_id)}],
        })
        if paid:
            self.update_order(order_id, {"status": "processing"})
            with self.store.write_lock:
                now = self.store.now_gmt()
                self._set_post_meta(subscription_id, "_schedule_last_payment", now.strftime(WP_FORMAT))
                # The next payment follows the billing interval, in calendar periods.
                nxt = self.calculate_next_payment(subscription_id)
                self._set_post_meta(subscription_id, "_schedule_next_payment",
                                    nxt.strftime(WP_FORMAT) if nxt else "")
                self.store.touch_post(subscription_id)
            self.changes.emit("subscription", "updated", subscription_id)
        return order_id

    def create_refund_as_api(self, order_id: int, amount: float, reason: str, api_refund: bool,
                             line_items: list, meta_data: list) -> int:
        """POST /orders/{id}/refunds: wc_create_refund's checks, then the refund and its meta."""
        meta = self.store.post_meta(order_id)
        total = float(meta.get("_order_total") or 0)
        refunded = sum(float(r[0] or 0) for r in self.db.execute(
            "SELECT json_extract(m.meta_value, '$') FROM posts p JOIN postmeta m ON m.post_id=p.id "
            "AND m.meta_key='_refund_amount' WHERE p.post_parent=? AND p.post_type='shop_order_refund'", (order_id,)))
        if amount <= 0 or amount > total - refunded + 0.001:
            raise StoreError("woocommerce_rest_cannot_create_order_refund", "Invalid refund amount.", 500)
        if api_refund:
            # The sandbox's gateways (bacs, cod, cheque, the test card) cannot refund through an API.
            raise StoreError("woocommerce_rest_cannot_create_order_refund",
                             "The payment gateway for this order does not support automatic refunds.", 500)
        rid = self.create_refund(order_id, amount, reason)
        for m in meta_data:
            if isinstance(m, dict) and m.get("key"):
                self._set_post_meta(rid, m["key"], m.get("value"))
        return rid

    def create_refund(self, order_id: int, amount: float, reason: str, line: dict | None = None) -> int:
        meta = self.store.post_meta(order_id)
        with self.store.write_lock:
            refund_id = self.store.next_post_id()
            now = self.store.now_gmt()
            self.db.execute(POST_INSERT, post_row(self.store, refund_id, "shop_order_refund", "completed", now, now,
                                                  parent=order_id))
            rows = {"_refund_amount": money(amount), "_refund_reason": reason, "_refunded_by": 1,
                    "_refunded_payment": False, "_order_currency": meta.get("_order_currency", "EUR"),
                    "_order_total": money(-amount)}
            self.db.executemany("INSERT INTO postmeta(post_id, meta_key, meta_value) VALUES (?,?,?)",
                                [(refund_id, k, dumps(v)) for k, v in rows.items()])
            if line:
                first = self.db.execute("SELECT COALESCE(MAX(order_item_id),0)+1 FROM order_items").fetchone()[0]
                items, item_meta = order_lines_rows(refund_id, first, [line])
                self.db.executemany("INSERT INTO order_items VALUES (?,?,?,?)", items)
                self.db.executemany(
                    "INSERT INTO order_itemmeta(order_item_id, meta_key, meta_value) VALUES (?,?,?)", item_meta)
            total = float(meta.get("_order_total") or 0)
            refunded = sum(float(r[0] or 0) for r in self.db.execute(
                "SELECT json_extract(m.meta_value, '$') FROM posts p JOIN postmeta m ON m.post_id=p.id "
                "AND m.meta_key='_refund_amount' WHERE p.post_parent=? AND p.post_type='shop_order_refund'",
                (order_id,)))
            self.add_note(order_id, f"Refunded {money(amount)} &ndash; {reason}")
            if refunded >= total - 0.001:
                self._change_status(order_id, "refunded", "shop_order")
            self.store.touch_post(order_id)
        self.changes.emit("order", "updated", order_id)
        return refund_id
