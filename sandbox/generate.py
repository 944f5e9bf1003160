"""Deterministic store generator: the same size and seed always give the same store.

Bulk inserts with ``executemany`` and indexes built at the end keep ``large`` (one million orders)
within minutes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from . import catalog
from .domain import POST_INSERT, add_period, build_order_lines, money, order_lines_rows, post_row
from .storage import LISTS, WP_FORMAT, Store, dumps


@dataclass(frozen=True)
class Size:
    customers: int
    products: int
    orders: int
    subscriptions: int
    days: int


SIZES = {
    "tiny": Size(customers=30, products=16, orders=60, subscriptions=8, days=30),
    "small": Size(customers=1_000, products=120, orders=5_000, subscriptions=300, days=180),
    "10k": Size(customers=2_000, products=150, orders=10_000, subscriptions=500, days=365),
    "medium": Size(customers=20_000, products=600, orders=100_000, subscriptions=5_000, days=720),
    "large": Size(customers=150_000, products=3_000, orders=1_000_000, subscriptions=40_000, days=1_460),
}

# A key's scope is read, write or read_write; a write-only key is legal and cannot read.
DEFAULT_KEYS = (("ck_sandbox", "cs_sandbox", "read_write"), ("ck_sandbox_ro", "cs_sandbox_ro", "read"),
                ("ck_sandbox_wo", "cs_sandbox_wo", "write"))


def generate(path: str | Path, size: str = "tiny", seed: int = 1, timezone: str = "Europe/Madrid",
             keys: tuple[tuple[str, str, str], ...] = DEFAULT_KEYS, now: datetime | None = None) -> Store:
    path = Path(path)
    if path.exists():
        path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(path)
    store.create_schema()
    db = store.db
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    store.set_option("timezone_string", timezone)
    store.set_option("size", size)
    store.set_option("seed", str(seed))
    store.set_option("woocommerce_version", "9.4.0")
    for ck, cs, perms in keys:
        db.execute("INSERT OR REPLACE INTO api_keys VALUES (?,?,?)", (ck, cs, perms))
    Generator(store, SIZES[size], random.Random(seed), now or store.now_gmt()).run()
    db.execute("COMMIT")
    store.create_indexes()
    db.execute("PRAGMA synchronous=NORMAL")
    return store


class Generator:
    def __init__(self, store: Store, size: Size, rng: random.Random, now: datetime):
        self.store, self.size, self.rng = store, size, rng
        self.now = now - timedelta(hours=1)
        self.start = self.now - timedelta(days=size.days)
        self.post_id = 100  # shared posts sequence (products, variations, orders, refunds, subscriptions)
        self.item_id = 1
        self.db = store.db

    # -- helpers ---------------------------------------------------------------------------
    def moment(self) -> datetime:
        span = int((self.now - self.start).total_seconds())
        return self.start + timedelta(seconds=self.rng.randrange(span))

    def next_post(self) -> int:
        self.post_id += self.rng.choice((1, 1, 1, 2))  # sparse, interleaved ids like WordPress
        return self.post_id

    def address(self, first: str, last: str, email: str | None, country: str | None = None) -> dict:
        country = country or self.rng.choice([c[0] for c in catalog.COUNTRIES])
        states = next(c[3] for c in catalog.COUNTRIES if c[0] == country)
        addr = {"first_name": first, "last_name": last, "company": "", "address_1": f"{self.rng.randint(1, 999)} Main St",
                "address_2": "", "city": self.rng.choice(catalog.CITIES[country]),
                "state": self.rng.choice(states)[0] if states else "",
                "postcode": f"{self.rng.randint(1000, 99999)}", "country": country}
        if email is not None:
            addr["email"] = email
            addr["phone"] = f"+{self.rng.randint(10, 99)} {self.rng.randint(100000000, 999999999)}"
        return addr

    # -- sections --------------------------------------------------------------------------
    def run(self) -> None:
        self.lookups()
        self.customers()
        self.products()
        self.orders()
        self.subscriptions()

    def lookups(self) -> None:
        db, lid = self.db, iter(range(1, 10_000_000))
        list_ids = {}
        for code in LISTS:
            i = next(lid)
            list_ids[code] = i
            db.execute("INSERT INTO lookup(id, list_id, code, name) VALUES (?,?,?,?)", (i, None, code, code.title()))
        rows = []
        for n, (code, label, paid) in enumerate(catalog.ORDER_STATUSES):
            rows.append((next(lid), list_ids["ORDER_STATUS"], code, label, None, n, 1, None, paid))
        for n, (code, label) in enumerate(catalog.SUBSCRIPTION_STATUSES):
            rows.append((next(lid), list_ids["SUBSCRIPTION_STATUS"], code, label, None, n, 1, None, None))
        for n, (code, title, method_title, enabled) in enumerate(catalog.PAYMENT_GATEWAYS):
            rows.append((next(lid), list_ids["PAYMENT_METHOD"], code, title, None, n, enabled, method_title, None))
        for n, (code, name) in enumerate(catalog.TAX_CLASSES):
            rows.append((next(lid), list_ids["TAX_CLASS"], code, name, None, n, 1, None, None))
        for n, (code, name, symbol) in enumerate(catalog.CURRENCIES):
            rows.append((next(lid), list_ids["CURRENCY"], code, name, None, n, 1, symbol, None))
        for n, (code, name, currency, states) in enumerate(catalog.COUNTRIES):
            cid = next(lid)
            rows.append((cid, list_ids["COUNTRY"], code, name, None, n, 1, currency, None))
            for m, (scode, sname) in enumerate(states):
                rows.append((next(lid), list_ids["STATE"], scode, sname, cid, m, 1, None, None))
        db.executemany("INSERT INTO lookup(id, list_id, code, name, parent_id, sort, active, v_text1, v_num1) "
                       "VALUES (?,?,?,?,?,?,?,?,?)", rows)
        # Terms draw ids from one sequence shared by categories, tags and attribute terms: sparse ids.
        term_id = 8
        self.categories: dict[str, int] = {}
        for n, (slug, name, parent) in enumerate(catalog.CATEGORIES):
            term_id += self.rng.choice((1, 2, 3))
            self.categories[slug] = term_id
            db.execute("INSERT INTO lookup(id, list_id, code, name, parent_id, sort, v_text1) VALUES (?,?,?,?,?,?,?)",
                       (term_id + 1000, list_ids["PRODUCT_CAT"], slug, name,
                        self.categories[parent] + 1000 if parent else None, n, ""))
        # Lookup ids for terms are offset so categories keep WordPress-like small term ids in the API.
        self.attributes: dict[str, list[tuple[int, str]]] = {}
        for n, (attr, terms) in enumerate(catalog.ATTRIBUTES.items()):
            aid = next(lid)
            db.execute("INSERT INTO lookup(id, list_id, code, name, sort) VALUES (?,?,?,?,?)",
                       (aid, list_ids["ATTRIBUTE"], "pa_" + attr.lower(), attr, n))
            self.attributes[attr] = []
            for m, term in enumerate(terms):
                term_id += 1
                db.execute("INSERT INTO lookup(id, list_id, code, name, parent_id, sort) VALUES (?,?,?,?,?,?)",
                           (term_id + 1000, list_ids["ATTRIBUTE_TERM"], term.lower(), term, aid, m))
                self.attributes[attr].append((term_id, term))

    def customers(self) -> None:
        rng, users, meta = self.rng, [], []
        self.customer_ids: list[int] = []
        for uid in range(2, self.size.customers + 2):  # user 1 is the shop admin
            first, last = rng.choice(catalog.FIRST_NAMES), rng.choice(catalog.LAST_NAMES)
            email = f"customer{uid}@example.{rng.choice(['com', 'es', 'pe'])}"
            registered = self.moment()
            users.append((uid, f"customer{uid}", email, registered.strftime(WP_FORMAT), f"{first} {last}", "customer"))
            billing = self.address(first, last, email)
            shipping = self.address(first, last, None, billing["country"])
            rows = {"first_name": first, "last_name": last, "billing": billing, "shipping": shipping,
                    "paying_customer": rng.random() < 0.6}
            if rng.random() < 0.85:  # some customers never had last_update set: date_modified null
                rows["last_update"] = int((registered + timedelta(minutes=rng.randint(0, 600))).timestamp())
            if rng.random() < 0.3:
                rows["preferred_language"] = rng.choice(["es_ES", "en_US", "pt_BR"])
            if rng.random() < 0.1:
                rows["_learndash_courses"] = {"enrolled": [rng.randint(1, 50)], "source": "import"}
            meta.extend((uid, k, dumps(v)) for k, v in rows.items())
            self.customer_ids.append(uid)
        users.append((1, "admin", "admin@example.com", self.start.strftime(WP_FORMAT), "Shop Admin", "administrator"))
        self.db.executemany("INSERT INTO users VALUES (?,?,?,?,?,?)", users)
        self.db.executemany("INSERT INTO usermeta(user_id, meta_key, meta_value) VALUES (?,?,?)", meta)
        self.emails = {u[0]: u[2] for u in users}

    def attachment(self, parent: int, name: str, when: datetime, posts: list, meta: list) -> int:
        """An image in the media library: an ``attachment`` post (shared id sequence) + its file meta."""
        aid = self.next_post()
        posts.append(post_row(self.store, aid, "attachment", "inherit", when, when, parent=parent, title=name,
                              slug=name))
        meta.append((aid, "_wp_attached_file", dumps(f"{when:%Y/%m}/{name}.jpg")))
        meta.append((aid, "_wp_attachment_image_alt", dumps(name.replace("-", " ") if self.rng.random() < 0.5 else "")))
        return aid

    def products(self) -> None:
        rng, posts, meta, rels = self.rng, [], [], []
        self.sellable: list[dict] = []
        self.subscription_products: list[dict] = []
        cat_slugs = list(self.categories)
        # Category thumbnails: term meta thumbnail_id -> an attachment (lookup_meta is the term meta).
        for slug in cat_slugs[1::3]:
            aid = self.attachment(0, f"category-{slug}", self.start, posts, meta)
            self.db.execute("INSERT INTO lookup_meta VALUES (?,?,?)", (self.categories[slug] + 1000, "thumbnail_id", str(aid)))
        product_ids: list[int] = []
        for n in range(self.size.products):
            pid = self.next_post()
            kind = rng.random()
            if kind < 0.45:
                ptype, title, virtual = "simple", rng.choice(catalog.COURSE_TITLES), True
            elif kind < 0.75:
                ptype, title, virtual = "simple", rng.choice(catalog.MERCH_TITLES), False
            elif kind < 0.9:
                ptype, title, virtual = "variable", rng.choice(catalog.MERCH_TITLES[:2]), False
            else:
                ptype, title, virtual = "subscription", "Membership &ndash; " + rng.choice(["Monthly", "Yearly"]), True
            title = f"{title} #{n + 1}"
            created = self.moment()
            modified = min(self.now, created + timedelta(days=rng.randint(0, 30)))
            status = rng.choices(["publish", "draft", "private", "trash"], [90, 5, 3, 2])[0]
            posts.append(post_row(self.store, pid, "product", status, created, modified, title=title,
                                  slug=f"product-{pid}", menu_order=n))
            price = round(rng.uniform(5, 300), 2) if ptype != "subscription" else rng.choice([9.99, 19.0, 99.0])
            on_sale = rng.random() < 0.15
            sale = round(price * 0.8, 2) if on_sale else None
            rows = {"_product_type": ptype, "_sku": f"SKU-{pid}" if rng.random() < 0.8 else "",
                    "_regular_price": money(price), "_sale_price": money(sale) if sale else "",
                    "_price": money(sale or price), "_virtual": virtual, "_downloadable": virtual and rng.random() < 0.5,
                    "_tax_status": "taxable", "_tax_class": rng.choice(["", "", "reduced-rate", "zero-rate"]),
                    "_manage_stock": not virtual, "_stock": None if virtual else rng.randint(0, 500),
                    "_stock_status": rng.choices(["instock", "outofstock", "onbackorder"], [85, 10, 5])[0],
                    "_weight": "" if virtual else f"{rng.uniform(0.1, 2):.2f}", "total_sales": 0,
                    "_description": f"<p>About {title}</p>", "_short_description": ""}
            if virtual and rng.random() < 0.7:
                rows["_course_id"] = rng.randint(1000, 9999)  # LMS plugins link the course by product meta
            # The rest of a product's postmeta (WC_Product_Data_Store_CPT keys), sparse as on a real shop.
            if rng.random() < 0.6:
                rows["_thumbnail_id"] = self.attachment(pid, f"product-{pid}", created, posts, meta)
                if rng.random() < 0.3:
                    rows["_product_image_gallery"] = str(self.attachment(pid, f"product-{pid}-2", created, posts, meta))
            if sale and rng.random() < 0.5:
                rows["_sale_price_dates_from"] = int(created.timestamp()) // 86400 * 86400
                rows["_sale_price_dates_to"] = rows["_sale_price_dates_from"] + 86400 * rng.choice([7, 30, 90])
            if rows["_downloadable"]:
                fid = f"{rng.getrandbits(128):032x}"
                rows["_downloadable_files"] = {fid: {"id": f"{fid[:8]}-{fid[8:12]}-{fid[12:16]}-{fid[16:20]}-{fid[20:]}",
                                                     "name": f"{title} (PDF)",
                                                     "file": f"https://cdn.example.com/files/{pid}.pdf"}}
                rows["_download_limit"], rows["_download_expiry"] = rng.choice([(-1, -1), (5, 365), (-1, 30)])
            if not virtual:
                rows["_length"], rows["_width"], rows["_height"] = (f"{rng.randint(5, 60)}" for _ in range(3))
                rows["_backorders"] = rng.choices(["no", "notify", "yes"], [80, 10, 10])[0]
                if rng.random() < 0.4:
                    rows["_low_stock_amount"] = rng.choice([2, 5, 10])
                if rng.random() < 0.3:
                    rows["_global_unique_id"] = f"{rng.randint(10**12, 10**13 - 1)}"
            elif rng.random() < 0.5:
                rows["_sold_individually"] = True
                rows["_purchase_note"] = "Your course is in My account &rarr; Courses."
            if product_ids and rng.random() < 0.2:
                rows["_upsell_ids"] = rng.sample(product_ids, min(2, len(product_ids)))
            if product_ids and rng.random() < 0.2:
                rows["_crosssell_ids"] = rng.sample(product_ids, 1)
            if rng.random() < 0.4:
                count = rng.randint(1, 40)
                rows["_wc_rating_count"], rows["_wc_review_count"] = count, count
                rows["_wc_average_rating"] = f"{rng.uniform(3, 5):.2f}"
            product_ids.append(pid)
            if ptype == "subscription":
                rows["_subscription_period"] = "month" if "Monthly" in title else "year"
                rows["_subscription_period_interval"] = rng.choice([1, 1, 2])
            if rng.random() < 0.1:
                rows["_yoast_wpseo_focuskw"] = title.lower()
            meta.extend((pid, k, dumps(v)) for k, v in rows.items())
            slug = rng.choice(cat_slugs[1:]) if rng.random() < 0.95 else "uncategorized"
            rels.append((pid, self.categories[slug]))
            if rng.random() < 0.3:
                rels.append((pid, self.categories[rng.choice(cat_slugs[1:])]))
            base = {"id": pid, "parent_id": 0, "name": title, "price": sale or price, "tax_class": rows["_tax_class"]}
            if status == "trash":
                continue
            if ptype == "variable":
                attrs = {"Color": self.attributes["Color"], "Size": self.attributes["Size"][:3]}
                meta.append((pid, "_product_attributes", dumps([
                    {"name": a, "options": [t for _, t in terms], "variation": True} for a, terms in attrs.items()])))
                for color in attrs["Color"][:2]:
                    for sz in attrs["Size"][:2]:
                        vid = self.next_post()
                        vname = f"{title} &ndash; {color[1]}, {sz[1]}"
                        posts.append(post_row(self.store, vid, "product_variation", "publish", created, modified,
                                              parent=pid, title=vname, slug=f"product-{vid}"))
                        vprice = round(price + rng.choice([0, 5, 10]), 2)
                        vrows = {"_sku": f"SKU-{vid}", "_regular_price": money(vprice), "_sale_price": "",
                                 "_price": money(vprice), "_virtual": False, "_downloadable": False,
                                 "_tax_status": "taxable", "_tax_class": "", "_manage_stock": True,
                                 "_stock": rng.randint(0, 50), "_stock_status": "instock", "_weight": "0.30",
                                 "_variation_attributes": {"attribute_pa_color": color[1].lower(),
                                                           "attribute_pa_size": sz[1].lower()}}
                        meta.extend((vid, k, dumps(v)) for k, v in vrows.items())
                        self.sellable.append({"id": vid, "parent_id": pid, "name": vname, "price": vprice,
                                              "item_meta": {"pa_color": color[1].lower(), "pa_size": sz[1]}})
            elif ptype == "subscription":
                self.subscription_products.append(base | {"period": rows["_subscription_period"],
                                                          "interval": rows["_subscription_period_interval"]})
                self.sellable.append(base)
            else:
                self.sellable.append(base)
        self.db.executemany(POST_INSERT, posts)
        self.db.executemany("INSERT INTO postmeta(post_id, meta_key, meta_value) VALUES (?,?,?)", meta)
        self.db.executemany("INSERT INTO term_relationships VALUES (?,?)", rels)

    def order_rows(self, oid: int, post_type: str, status: str, created: datetime, modified: datetime,
                   customer: int, parent: int, products: list[dict], qtys: list[int],
                   extra_meta: dict, sink: dict, fee_rate: float = 0.05) -> dict:
        rng = self.rng
        first_last = (rng.choice(catalog.FIRST_NAMES), rng.choice(catalog.LAST_NAMES))
        email = self.emails.get(customer) or f"guest{oid}@{rng.choice(['mail.com', 'correo.es'])}"
        if customer == 0 and rng.random() < 0.2:
            email = email.upper().replace("@", "@ ").replace(" ", "")  # guests type emails in odd cases
        billing = self.address(*first_last, email)
        physical = any(not p.get("virtual", True) for p in products) or rng.random() < 0.3
        shipping = round(rng.choice([4.95, 9.9, 0.0]), 2) if physical else None
        fee = 1.5 if rng.random() < fee_rate else None
        coupon = ("welcome10", 10.0) if rng.random() < 0.1 else None
        lines, totals = build_order_lines(products, qtys, rng.choice([0.21, 0.10, 0.0]), shipping, fee, coupon,
                                          rate_id=rng.choice([1, 2, 3]), rate_code="ES-IVA-1")
        items, item_meta = order_lines_rows(oid, self.item_id, lines)
        self.item_id += len(items)
        sink["posts"].append(post_row(self.store, oid, post_type, status, created, modified, parent=parent,
                                      customer_id=customer))
        sink["items"].extend(items)
        sink["item_meta"].extend(item_meta)
        gw = rng.choice(catalog.PAYMENT_GATEWAYS[:1] + catalog.PAYMENT_GATEWAYS[2:])
        meta = {"_order_key": f"wc_order_{rng.getrandbits(48):x}",
                "_order_currency": rng.choice(["EUR", "EUR", "USD", "PEN"]), "_prices_include_tax": "no",
                "_customer_ip_address": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                "_customer_user_agent": "Mozilla/5.0", "_created_via": "checkout", "_order_version": "9.4.0",
                "_payment_method": gw[0], "_payment_method_title": gw[1],
                "_transaction_id": f"txn_{rng.getrandbits(32):x}" if status in ("processing", "completed") else "",
                "_billing": billing, "_shipping": self.address(*first_last, None, billing["country"]) if physical else {},
                "_customer_note": "" if rng.random() < 0.9 else "Please invoice my company", **totals}
        if status in ("processing", "completed", "refunded", "active", "on-hold") and post_type:
            meta["_date_paid"] = (created + timedelta(minutes=2)).strftime(WP_FORMAT)
        if status == "completed":
            meta["_date_completed"] = min(modified, created + timedelta(days=2)).strftime(WP_FORMAT)
        if rng.random() < 0.5:
            meta["_download_permissions_granted"] = "yes"
        if rng.random() < 0.3:
            meta["_wc_order_attribution_source_type"] = rng.choice(["organic", "utm", "typein"])
        if rng.random() < 0.05:
            meta["_tracking"] = {"carrier": "DHL", "number": f"JD{rng.randint(10**9, 10**10)}"}
        if rng.random() < 0.05:
            meta["is_vat_exempt"] = "no"
        meta.update(extra_meta)
        sink["meta"].extend((oid, k, dumps(v)) for k, v in meta.items())
        return {"lines": lines, "totals": totals}

    def _flush(self, sink: dict) -> None:
        db = self.db
        db.executemany(POST_INSERT, sink["posts"])
        db.executemany("INSERT INTO postmeta(post_id, meta_key, meta_value) VALUES (?,?,?)", sink["meta"])
        db.executemany("INSERT INTO order_items VALUES (?,?,?,?)", sink["items"])
        db.executemany("INSERT INTO order_itemmeta(order_item_id, meta_key, meta_value) VALUES (?,?,?)",
                       sink["item_meta"])
        db.executemany("INSERT INTO comments(post_id, comment_date, comment_date_gmt, content, author, customer_note) "
                       "VALUES (?,?,?,?,?,?)", sink["notes"])
        for key in sink:
            sink[key].clear()

    @staticmethod
    def _sink() -> dict:
        return {"posts": [], "meta": [], "items": [], "item_meta": [], "notes": []}

    def orders(self) -> None:
        rng, sink = self.rng, self._sink()
        statuses = ["completed", "processing", "on-hold", "pending", "cancelled", "failed", "refunded"]
        weights = [55, 15, 5, 8, 7, 4, 6]
        self.order_ids: list[int] = []
        created_list = sorted(self.moment() for _ in range(self.size.orders))
        for n, created in enumerate(created_list):
            oid = self.next_post()
            customer = rng.choice(self.customer_ids) if rng.random() < 0.75 else 0
            status = rng.choices(statuses, weights)[0]
            trashed = n % 40 == 13  # about 2.5% of orders sit in the trash
            n_lines = rng.choices([1, 2, 3, 4, 6], [45, 30, 15, 7, 3])[0]
            products = [rng.choice(self.sellable) for _ in range(n_lines)]
            qtys = [rng.choice([1, 1, 1, 2, 3]) for _ in products]
            modified = min(self.now, created + timedelta(seconds=rng.choice([5, 60, 3600, 86400 * 3])))
            order = self.order_rows(oid, "shop_order", "trash" if trashed else status, created, modified, customer, 0,
                                    products, qtys, {"_wp_trash_meta_status": status} if trashed else {}, sink)
            c_local, c_gmt = self.store.stamp(created)
            sink["notes"].append((oid, c_local, c_gmt, "Order status changed from Pending payment to Processing.",
                                  "system", 0))
            self.order_ids.append(oid)
            if status == "refunded" or (status == "completed" and rng.random() < 0.04):
                total = float(order["totals"]["_order_total"])
                amount = total if status == "refunded" else round(total * 0.3, 2)
                rid = self.next_post()
                sink["posts"].append(post_row(self.store, rid, "shop_order_refund", "completed", modified, modified,
                                              parent=oid))
                sink["meta"].extend((rid, k, dumps(v)) for k, v in {
                    "_refund_amount": money(amount), "_refund_reason": rng.choice(["Customer request", "Damaged", ""]),
                    "_refunded_by": 1, "_refunded_payment": True, "_order_currency": "EUR",
                    "_order_total": money(-amount)}.items())
                first = order["lines"][0]
                refund_line = {"type": "line_item", "name": first["name"], "meta": {
                    "_product_id": first["meta"]["_product_id"], "_variation_id": first["meta"]["_variation_id"],
                    "_qty": -1, "_tax_class": "", "_line_subtotal": money(-amount), "_line_subtotal_tax": "0.00",
                    "_line_total": money(-amount), "_line_tax": "0.00", "_refunded_item_id": first["id"],
                    "_line_tax_data": {"total": {}, "subtotal": {}}}}
                items, item_meta = order_lines_rows(rid, self.item_id, [refund_line])
                self.item_id += 1
                sink["items"].extend(items)
                sink["item_meta"].extend(item_meta)
            if len(sink["posts"]) >= 20_000:
                self._flush(sink)
        self._flush(sink)

    def subscriptions(self) -> None:
        rng, sink = self.rng, self._sink()
        if not self.subscription_products:
            return
        statuses = ["active", "active", "active", "on-hold", "cancelled", "expired", "pending-cancel"]
        for _ in range(self.size.subscriptions):
            customer = rng.choice(self.customer_ids)
            product = rng.choice(self.subscription_products)
            created = self.moment()
            parent = self.next_post()
            self.order_rows(parent, "shop_order", "completed", created, created + timedelta(minutes=5), customer, 0,
                            [product], [1], {}, sink)
            sid = self.next_post()
            status = rng.choice(statuses)
            period, interval = product["period"], product["interval"]
            offset = self.store.tz.utcoffset(created) or timedelta(0)

            def step(d: datetime, interval=interval, period=period, offset=offset) -> datetime:
                # Renewals follow the billing interval, in calendar periods (wcs_add_time).
                return add_period(d, interval, period, offset)

            renewals, last_paid = [], created
            while step(last_paid) < self.now and len(renewals) < 24:
                last_paid = step(last_paid)
                renewals.append(last_paid)
            modified = max([created, *renewals]) + timedelta(minutes=1)
            fmt = lambda d: d.strftime(WP_FORMAT) if d else ""  # noqa: E731 - GMT-only, "" when unset
            sched = {"_billing_period": period, "_billing_interval": str(interval), "_schedule_start": fmt(created),
                     "_schedule_trial_end": "", "_schedule_last_payment": fmt(last_paid),
                     "_schedule_next_payment": fmt(step(last_paid)) if status == "active" else "",
                     "_schedule_cancelled": fmt(modified) if status in ("cancelled", "pending-cancel") else "",
                     "_schedule_end": fmt(modified) if status in ("cancelled", "expired") else ""}
            if rng.random() < 0.5:
                sched["_stripe_customer_id"] = f"cus_{rng.getrandbits(40):x}"
            # Recurring fees (a sign-up kit, a payment surcharge) are copied onto the subscription.
            self.order_rows(sid, "shop_subscription", status, created, min(self.now, modified), customer, parent,
                            [product], [1], sched, sink, fee_rate=0.5)
            for when in renewals:
                oid = self.next_post()
                self.order_rows(oid, "shop_order", rng.choices(["completed", "processing", "failed"], [85, 10, 5])[0],
                                when, when + timedelta(minutes=3), customer, 0, [product], [1],
                                {"_subscription_renewal": str(sid)}, sink)
            if len(sink["posts"]) >= 20_000:
                self._flush(sink)
        self._flush(sink)


def main_generate(path: str, size: str, seed: int, timezone: str) -> None:
    t0 = time.monotonic()
    store = generate(path, size, seed, timezone)
    counts = {t: store.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
              for t in ("posts", "postmeta", "order_items", "order_itemmeta", "users", "lookup")}
    print(f"generated {size} store (seed {seed}) in {time.monotonic() - t0:.1f}s at {path}: {counts}")
