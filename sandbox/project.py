"""Project the generic tables into WooCommerce REST v3 JSON shapes.

Every projection works on a batch of ids (one query per table, not per record) so list pages stay
cheap on a large store.
"""

from __future__ import annotations

from datetime import UTC, datetime

from .domain import (
    ITEM_INTERNAL_META,
    ORDER_INTERNAL_META,
    PRODUCT_INTERNAL_META,
    USER_INTERNAL_META,
    Domain,
    needs_processing,
    product_flags,
)
from .storage import WP_FORMAT, Store

ADDRESS_BILLING = ("first_name", "last_name", "company", "address_1", "address_2", "city", "state", "postcode",
                   "country", "email", "phone")
ADDRESS_SHIPPING = ADDRESS_BILLING[:9] + ("phone",)


def iso(wp: str | None) -> str | None:
    """'2024-05-01 10:00:00' -> '2024-05-01T10:00:00' (no offset, as the API returns)."""
    return wp.replace(" ", "T") if wp else None


def pair(store: Store, gmt_wp: str | None) -> tuple[str | None, str | None]:
    if not gmt_wp:
        return None, None
    gmt = datetime.strptime(gmt_wp, WP_FORMAT)
    return iso(store.local(gmt).strftime(WP_FORMAT)), iso(gmt_wp)


def links(base: str, collection: str, record_id: int, **extra: str) -> dict:
    out = {"self": [{"href": f"{base}/{collection}/{record_id}"}], "collection": [{"href": f"{base}/{collection}"}]}
    for rel, href in extra.items():
        out[rel] = [{"href": href}]
    return out


def visible_meta(rows, internal: set[str], item: bool = False) -> list[dict]:
    out = []
    for meta_id, key, value in rows:
        if key in internal:
            continue
        entry = {"id": meta_id, "key": key, "value": value}
        if item:
            entry["display_key"] = key
            entry["display_value"] = value if isinstance(value, str) else str(value)
        out.append(entry)
    return out


def address(block: dict | None, fields: tuple[str, ...]) -> dict:
    block = block or {}
    return {f: block.get(f, "") for f in fields}


# -- customers ---------------------------------------------------------------------------------
def customers(store: Store, ids: list[int], base: str) -> list[dict]:
    if not ids:
        return []
    rows = {r["id"]: r for r in store.db.execute(
        f"SELECT * FROM users WHERE id IN ({','.join('?' * len(ids))})", ids)}
    metas = store.meta_for("usermeta", "user_id", ids)
    out = []
    for uid in ids:
        u = rows.get(uid)
        if u is None:
            continue
        m = {k: v for _, k, v in metas[uid]}
        created = pair(store, u["user_registered"])
        modified = (None, None)
        if m.get("last_update"):
            modified = pair(store, datetime.fromtimestamp(int(m["last_update"]), UTC).strftime(WP_FORMAT))
        out.append({
            "id": uid, "date_created": created[0], "date_created_gmt": created[1],
            "date_modified": modified[0], "date_modified_gmt": modified[1],
            "email": u["user_email"], "first_name": m.get("first_name", ""), "last_name": m.get("last_name", ""),
            "role": u["role"], "username": u["user_login"],
            "billing": address(m.get("billing"), ADDRESS_BILLING),
            "shipping": address(m.get("shipping"), ADDRESS_SHIPPING),
            "is_paying_customer": bool(m.get("paying_customer")),
            "avatar_url": f"https://secure.gravatar.com/avatar/{uid:032x}?s=96&d=mm&r=g",
            "meta_data": visible_meta(metas[uid], USER_INTERNAL_META),
            "_links": links(base, "customers", uid),
        })
    return out


# -- products ----------------------------------------------------------------------------------
def _categories_of(store: Store, ids: list[int]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {i: [] for i in ids}
    marks = ",".join("?" * len(ids))
    for r in store.db.execute(
        f"SELECT t.object_id, l.id - 1000 AS id, l.name, l.code FROM term_relationships t "
        f"JOIN lookup l ON l.id = t.term_id + 1000 WHERE t.object_id IN ({marks}) ORDER BY l.name", ids):
        out[r["object_id"]].append({"id": r["id"], "name": r["name"], "slug": r["code"]})
    return out


def _price_html(price: str, regular: str, sale: str) -> str:
    """``get_price_html`` for a EUR store with the symbol on the left (wc_price, wc_format_sale_price)."""
    def amount(x: str) -> str:
        return (f'<span class="woocommerce-Price-amount amount"><bdi><span class="woocommerce-Price-currencySymbol">'
                f'&euro;</span>{float(x):.2f}</bdi></span>')
    if price == "":
        return ""
    if sale and regular and sale != regular:
        return (f'<del aria-hidden="true">{amount(regular)}</del> <span class="screen-reader-text">Original price was: '
                f'&euro;{float(regular):.2f}.</span><ins aria-hidden="true">{amount(sale)}</ins><span '
                f'class="screen-reader-text">Current price is: &euro;{float(sale):.2f}.</span>')
    return amount(price)


def _sale_date(store: Store, value) -> tuple[str | None, str | None]:
    """``_sale_price_dates_from/_to`` hold unix timestamps; the API shows them site-local and GMT."""
    if not value:
        return None, None
    return pair(store, datetime.fromtimestamp(int(value), UTC).strftime(WP_FORMAT))


def _ids(value) -> list[int]:
    return [int(x) for x in (value or [])]


def _related(store: Store, pid: int, rng=None) -> list[int]:
    """``wc_get_related_products( $product->get_id() )`` as the REST API calls it (``api_get_related_ids``,
    plugins/woocommerce/includes/rest-api/Controllers/Version2/class-wc-rest-products-v2-controller.php):
    limit 5, no exclusions but the product itself (up-sells are not excluded there). The data store
    query fetches ``$limit + 10`` published products sharing a category, then the function **shuffles**
    them on every call and keeps the first 5 (``shuffle( $related_posts ); return array_slice(...)``,
    plugins/woocommerce/includes/wc-product-functions.php): both the order and the five change per read.
    ``upsell_ids`` / ``cross_sell_ids`` are the stored meta in stored order (``get_upsell_ids`` /
    ``get_cross_sell_ids``, no shuffle). Without ``rng`` (export, ``--fixed-related``): a fixed order."""
    rows = store.db.execute(
        "SELECT DISTINCT p.id FROM term_relationships a JOIN term_relationships b ON b.term_id=a.term_id "
        "JOIN posts p ON p.id=b.object_id AND p.post_type='product' AND p.post_status='publish' "
        "WHERE a.object_id=? AND p.id<>? ORDER BY (p.id * 7919) % 1009, p.id LIMIT 15", (pid, pid)).fetchall()
    pool = [r[0] for r in rows]
    if rng is not None:
        rng.shuffle(pool)
    return pool[:5]


# The fields of a variation (class-wc-rest-product-variations-controller.php prepare_object_for_response).
VARIATION_FIELDS = (
    "id", "date_created", "date_created_gmt", "date_modified", "date_modified_gmt", "description", "permalink",
    "sku", "global_unique_id", "price", "regular_price", "sale_price", "date_on_sale_from", "date_on_sale_from_gmt",
    "date_on_sale_to", "date_on_sale_to_gmt", "on_sale", "status", "purchasable", "virtual", "downloadable",
    "downloads", "download_limit", "download_expiry", "tax_status", "tax_class", "manage_stock", "stock_quantity",
    "stock_status", "backorders", "backorders_allowed", "backordered", "low_stock_amount", "weight", "dimensions",
    "shipping_class", "shipping_class_id", "image", "attributes", "menu_order", "meta_data", "name", "type",
    "parent_id",
)


RELATED_MARK = "\x00related_ids"  # prerender: where a read puts its own related_ids (see prerender.py)


def products(store: Store, ids: list[int], base: str, related_rng=None, related=None) -> list[dict]:
    """Products and variations with every field of ``get_product_data`` (Version3 products controller).

    ``related_rng`` shuffles related_ids as a real store does; ``related(pid)`` replaces them (prerender)."""
    if not ids:
        return []
    site = base.split("/wp-json")[0]
    marks = ",".join("?" * len(ids))
    rows = {r["id"]: r for r in store.db.execute(f"SELECT * FROM posts WHERE id IN ({marks})", ids)}
    metas = store.meta_for("postmeta", "post_id", ids)
    cats = _categories_of(store, ids)
    variations: dict[int, list[int]] = {i: [] for i in ids}
    for r in store.db.execute(
        f"SELECT post_parent, id FROM posts WHERE post_type='product_variation' AND post_parent IN ({marks}) ORDER BY menu_order, id",
        ids,
    ):
        variations[r[0]].append(r[1])
    image_ids: set[int] = set()
    for pid in ids:
        for _, k, v in metas.get(pid, []):
            if k == "_thumbnail_id" and v:
                image_ids.add(int(v))
            elif k == "_product_image_gallery" and v:
                image_ids.update(int(x) for x in str(v).split(",") if x)
    images = attachments(store, sorted(image_ids), site)
    out = []
    for pid in ids:
        p = rows.get(pid)
        if p is None:
            continue
        m = {k: v for _, k, v in metas[pid]}
        created, modified = pair(store, p["post_date_gmt"]), pair(store, p["post_modified_gmt"])
        is_variation = p["post_type"] == "product_variation"
        ptype = "variation" if is_variation else m.get("_product_type", "simple")
        price, regular, sale = m.get("_price", ""), m.get("_regular_price", ""), m.get("_sale_price", "")
        virtual, manage = bool(m.get("_virtual")), bool(m.get("_manage_stock"))
        stock, stock_status = m.get("_stock"), m.get("_stock_status", "instock")
        backorders = m.get("_backorders") or "no"
        backorders_allowed = backorders in ("yes", "notify")
        on_sale_from, on_sale_to = _sale_date(store, m.get("_sale_price_dates_from")), _sale_date(store, m.get("_sale_price_dates_to"))
        tax_status = m.get("_tax_status", "taxable")
        upsells = _ids(m.get("_upsell_ids"))
        thumb = int(m.get("_thumbnail_id") or 0)
        gallery = [int(x) for x in str(m.get("_product_image_gallery") or "").split(",") if x]
        product_images = [images[i] for i in [thumb, *gallery] if i in images]
        low = m.get("_low_stock_amount")
        doc = {
            "id": pid, "name": p["post_title"], "slug": p["post_name"],
            "permalink": f"{site}/product/{p['post_name']}/",
            "date_created": created[0], "date_created_gmt": created[1],
            "date_modified": modified[0], "date_modified_gmt": modified[1],
            "type": ptype, "status": p["post_status"], "featured": bool(m.get("_featured")),
            "catalog_visibility": "visible",
            "description": m.get("_description", ""), "short_description": m.get("_short_description", ""),
            "sku": m.get("_sku", ""), "global_unique_id": m.get("_global_unique_id", ""),
            "price": price, "regular_price": regular, "sale_price": sale,
            "date_on_sale_from": on_sale_from[0], "date_on_sale_from_gmt": on_sale_from[1],
            "date_on_sale_to": on_sale_to[0], "date_on_sale_to_gmt": on_sale_to[1],
            "on_sale": bool(sale), "purchasable": price != "", "total_sales": int(m.get("total_sales") or 0),
            "virtual": virtual, "downloadable": bool(m.get("_downloadable")),
            "downloads": [{"id": f["id"], "name": f["name"], "file": f["file"]}
                          for f in (m.get("_downloadable_files") or {}).values()],
            "download_limit": int(m.get("_download_limit", -1)), "download_expiry": int(m.get("_download_expiry", -1)),
            "external_url": m.get("_product_url", ""), "button_text": m.get("_button_text", ""),
            "tax_status": tax_status, "tax_class": m.get("_tax_class", ""),
            "manage_stock": manage, "stock_quantity": stock if manage else None,
            "backorders": backorders, "backorders_allowed": backorders_allowed,
            # is_on_backorder(): the status says so, or stock managed, backorders allowed and below zero
            "backordered": stock_status == "onbackorder" or (manage and backorders_allowed and int(stock or 0) < 0),
            "low_stock_amount": int(low) if low not in (None, "") else None,
            "sold_individually": bool(m.get("_sold_individually")),
            "weight": m.get("_weight", ""),
            "dimensions": {"length": m.get("_length", ""), "width": m.get("_width", ""), "height": m.get("_height", "")},
            "shipping_required": not virtual, "shipping_taxable": not virtual and tax_status in ("taxable", "shipping"),
            "shipping_class": "", "shipping_class_id": 0,
            "reviews_allowed": m.get("_reviews_allowed", True) is not False,
            "average_rating": f"{float(m.get('_wc_average_rating') or 0):.2f}",
            "rating_count": int(m.get("_wc_rating_count") or 0),
            "upsell_ids": upsells, "cross_sell_ids": _ids(m.get("_crosssell_ids")),
            "parent_id": p["post_parent"], "purchase_note": m.get("_purchase_note", ""),
            "categories": cats[pid], "tags": [], "images": product_images,
            "attributes": [{"id": 0, "name": a["name"], "slug": a["name"].lower(), "position": n, "visible": True,
                            "variation": a["variation"], "options": a["options"]}
                           for n, a in enumerate(m.get("_product_attributes") or [])],
            "default_attributes": [], "variations": variations[pid], "grouped_products": _ids(m.get("_children")),
            "menu_order": p["menu_order"], "price_html": _price_html(price, regular, sale),
            "related_ids": [] if is_variation else (related(pid) if related else _related(store, pid, related_rng)),
            "meta_data": visible_meta(metas[pid], PRODUCT_INTERNAL_META),
            "stock_status": stock_status, "has_options": ptype == "variable",
            "post_password": "",
        }
        if m.get("_product_type") == "subscription":
            doc["meta_data"].append({"id": 0, "key": "_subscription_period", "value": m.get("_subscription_period")})
        if is_variation:
            attrs = m.get("_variation_attributes") or {}
            doc["attributes"] = [{"id": 0, "name": k.replace("attribute_pa_", "").title(), "option": v}
                                 for k, v in attrs.items()]
            doc["image"] = product_images[0] if product_images else None
            doc = {k: doc[k] for k in VARIATION_FIELDS}
            doc["_links"] = links(base, f"products/{p['post_parent']}/variations", pid,
                                  up=f"{base}/products/{p['post_parent']}")
        else:
            doc["_links"] = links(base, "products", pid)
        out.append(doc)
    return out


def categories(store: Store, ids: list[int], base: str) -> list[dict]:
    if not ids:
        return []
    lookup_ids = [i + 1000 for i in ids]
    marks = ",".join("?" * len(ids))
    rows = {r["id"] - 1000: r for r in store.db.execute(f"SELECT * FROM lookup WHERE id IN ({marks})", lookup_ids)}
    counts = dict(store.db.execute(
        f"SELECT t.term_id, COUNT(*) FROM term_relationships t JOIN posts p ON p.id=t.object_id "
        f"AND p.post_status='publish' WHERE t.term_id IN ({marks}) GROUP BY t.term_id", ids).fetchall())
    thumbs = {r[0] - 1000: int(r[1]) for r in store.db.execute(
        f"SELECT lookup_id, meta_value FROM lookup_meta WHERE meta_key='thumbnail_id' AND lookup_id IN ({marks})",
        lookup_ids) if r[1]}
    images = {k: {f: v for f, v in img.items()} for k, img in
              attachments(store, sorted(set(thumbs.values())), base.split("/wp-json")[0]).items()}
    out = []
    for cid in ids:
        r = rows.get(cid)
        if r is None:
            continue
        parent = (r["parent_id"] - 1000) if r["parent_id"] else 0
        extra = {"up": f"{base}/products/categories/{parent}"} if parent else {}
        # The term's thumbnail_id (lookup_meta) is an attachment: the image object of the categories
        # controller; without one the image is empty.
        image = images.get(thumbs.get(cid, 0)) or ([] if cid % 2 else None)
        out.append({
            "id": cid, "name": r["name"], "slug": r["code"], "parent": parent, "description": r["v_text1"] or "",
            "display": "default", "image": image, "menu_order": r["sort"],
            "count": counts.get(cid, 0), "_links": links(base, "products/categories", cid, **extra),
        })
    return out


# -- orders, subscriptions, refunds ------------------------------------------------------------
def _items(store: Store, ids: list[int]) -> dict[int, list]:
    out: dict[int, list] = {i: [] for i in ids}
    marks = ",".join("?" * len(ids))
    rows = store.db.execute(
        f"SELECT order_item_id, order_id, order_item_type, order_item_name FROM order_items "
        f"WHERE order_id IN ({marks}) ORDER BY order_item_id", ids).fetchall()
    metas = store.meta_for("order_itemmeta", "order_item_id", [r[0] for r in rows])
    for r in rows:
        out[r[1]].append((r[0], r[2], r[3], metas[r[0]]))
    return out


def _taxes(tax_data: dict | None, key: str = "total") -> list[dict]:
    tax_data = tax_data or {}
    totals, subtotals = tax_data.get("total") or {}, tax_data.get("subtotal") or {}
    return [{"id": int(rid), "total": amount, "subtotal": subtotals.get(rid, "")} if subtotals
            else {"id": int(rid), "total": amount} for rid, amount in totals.items()]


def _skus(store: Store, product_ids: set[int]) -> dict[int, str | None]:
    if not product_ids:
        return {}
    ids = list(product_ids)
    marks = ",".join("?" * len(ids))
    out: dict[int, str | None] = {}
    for r in store.db.execute(
        f"SELECT p.id, m.meta_value FROM posts p LEFT JOIN postmeta m ON m.post_id=p.id AND m.meta_key='_sku' "
        f"WHERE p.id IN ({marks})", ids):
        out[r[0]] = (r[1] or '""').strip('"')
    return out


def _variation_parents(store: Store, product_ids: set[int]) -> dict[int, str]:
    """Variation id -> its parent's title: ``parent_name`` (a variation's ``get_title()``)."""
    if not product_ids:
        return {}
    ids = list(product_ids)
    return {r[0]: r[1] for r in store.db.execute(
        f"SELECT v.id, p.post_title FROM posts v JOIN posts p ON p.id=v.post_parent "
        f"WHERE v.post_type='product_variation' AND v.id IN ({','.join('?' * len(ids))})", ids)}


def _thumbnails(store: Store, product_ids: set[int]) -> dict[int, int]:
    """Product id -> its featured image's attachment id (``_thumbnail_id``), when it has one."""
    if not product_ids:
        return {}
    ids = list(product_ids)
    return {r[0]: int(r[1]) for r in store.db.execute(
        f"SELECT post_id, meta_value FROM postmeta WHERE meta_key='_thumbnail_id' "
        f"AND post_id IN ({','.join('?' * len(ids))})", ids) if r[1] and int(r[1])}


def attachments(store: Store, ids: list[int], site: str) -> dict[int, dict]:
    """Attachment posts as the REST image objects (``get_images`` in the products controller)."""
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = {r["id"]: r for r in store.db.execute(
        f"SELECT * FROM posts WHERE post_type='attachment' AND id IN ({marks})", ids)}
    metas = store.meta_for("postmeta", "post_id", list(rows))
    out = {}
    for aid, r in rows.items():
        m = {k: v for _, k, v in metas[aid]}
        created, modified = pair(store, r["post_date_gmt"]), pair(store, r["post_modified_gmt"])
        src = f"{site}/wp-content/uploads/{m.get('_wp_attached_file', '')}"
        out[aid] = {"id": aid, "date_created": created[0], "date_created_gmt": created[1],
                    "date_modified": modified[0], "date_modified_gmt": modified[1], "src": src,
                    "name": r["post_title"], "alt": m.get("_wp_attachment_image_alt", "")}
    return out


def line_items(store: Store, items: list, skus: dict[int, str | None], refund: bool = False,
               parents: dict[int, str] | None = None, images: dict[int, tuple[int, str]] | None = None,
               guids: dict[int, str] | None = None) -> dict[str, list]:
    groups: dict[str, list] = {"line_items": [], "tax_lines": [], "shipping_lines": [], "fee_lines": [],
                               "coupon_lines": []}
    for item_id, kind, name, meta_rows in items:
        m = {k: v for _, k, v in meta_rows}
        meta_data = visible_meta(meta_rows, ITEM_INTERNAL_META, item=True)
        if kind == "line_item":
            qty = int(m.get("_qty") or 0)
            total = float(m.get("_line_total") or 0)
            pid, vid = int(m.get("_product_id") or 0), int(m.get("_variation_id") or 0)
            # get_order_item_data (class-wc-rest-orders-v2-controller.php): sku/global_unique_id null when
            # the product is gone, image {id: 0, src: ""} without one, parent_name only for variations.
            exists = (vid or pid) in skus
            image_id, image_src = (images or {}).get(vid or pid, (0, ""))
            entry = {
                "id": item_id, "name": name, "product_id": pid, "variation_id": vid, "quantity": qty,
                "tax_class": m.get("_tax_class", ""), "subtotal": m.get("_line_subtotal", "0.00"),
                "subtotal_tax": m.get("_line_subtotal_tax", "0.00"), "total": m.get("_line_total", "0.00"),
                "total_tax": m.get("_line_tax", "0.00"), "taxes": _taxes(m.get("_line_tax_data")),
                "meta_data": meta_data, "sku": skus.get(vid or pid),
                "global_unique_id": (guids or {}).get(vid or pid, "") if exists else None,
                "price": (total / qty) if qty else 0, "image": {"id": image_id, "src": image_src},
                "parent_name": (parents or {}).get(vid) if vid else None,
            }
            if refund:
                entry["refund_total"] = float(m.get("_line_total") or 0)
            groups["line_items"].append(entry)
        elif kind == "tax":
            groups["tax_lines"].append({
                "id": item_id, "rate_code": name, "rate_id": m.get("rate_id"), "label": m.get("label", ""),
                "compound": bool(m.get("compound")), "tax_total": m.get("tax_amount", "0.00"),
                "shipping_tax_total": m.get("shipping_tax_amount", "0.00"), "rate_percent": m.get("rate_percent"),
                "meta_data": meta_data})
        elif kind == "shipping":
            groups["shipping_lines"].append({
                "id": item_id, "method_title": name, "method_id": m.get("method_id", ""),
                "instance_id": m.get("instance_id", ""), "total": m.get("cost", "0.00"),
                "total_tax": m.get("total_tax", "0.00"), "taxes": _taxes(m.get("taxes")), "meta_data": meta_data})
        elif kind == "fee":
            groups["fee_lines"].append({
                "id": item_id, "name": name, "tax_class": m.get("_tax_class", ""),
                "tax_status": m.get("_tax_status", "taxable"), "amount": m.get("_line_total", "0.00"),
                "total": m.get("_line_total", "0.00"), "total_tax": m.get("_line_tax", "0.00"),
                "taxes": _taxes(m.get("_line_tax_data")), "meta_data": meta_data})
        elif kind == "coupon":
            groups["coupon_lines"].append({
                "id": item_id, "code": name, "discount": m.get("discount_amount", "0.00"),
                "discount_tax": m.get("discount_amount_tax", "0.00"), "discount_type": m.get("discount_type", ""),
                "nominal_amount": m.get("nominal_amount", 0), "free_shipping": False, "meta_data": meta_data})
    return groups


def orders(store: Store, ids: list[int], base: str, post_type: str = "shop_order") -> list[dict]:
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    # The type is checked in Python: "AND post_type=?" lures SQLite onto the type index (a scan of
    # every order on a large store) instead of the primary key.
    rows = {r["id"]: r for r in store.db.execute(f"SELECT * FROM posts WHERE id IN ({marks})", ids)
            if r["post_type"] == post_type}
    live = [i for i in ids if i in rows]
    metas = store.meta_for("postmeta", "post_id", live)
    items = _items(store, live)
    line_products: dict[int, list[int]] = {}
    for i in live:
        line_products[i] = []
        for _, kind, _, mr in items[i]:
            if kind == "line_item":
                m = {k: v for _, k, v in mr}
                line_products[i].append(int(m.get("_variation_id") or 0) or int(m.get("_product_id") or 0))
    product_ids = {int(v) for i in live for _, kind, _, mr in items[i] if kind == "line_item"
                   for _, k, v in mr if k in ("_product_id", "_variation_id") and v}
    skus = _skus(store, product_ids)
    flags = product_flags(store, {p for ps in line_products.values() for p in ps})
    parents = _variation_parents(store, product_ids)
    site = base.split("/wp-json")[0]
    thumbs = _thumbnails(store, product_ids)
    images = {pid: (aid, a["src"]) for pid, aid in thumbs.items()
              if (a := attachments(store, [aid], site).get(aid))}
    guids = {r[0]: (r[1] or '""').strip('"') for r in store.db.execute(
        f"SELECT post_id, meta_value FROM postmeta WHERE meta_key='_global_unique_id' "
        f"AND post_id IN ({','.join('?' * len(product_ids))})", list(product_ids))} if product_ids else {}
    domain = Domain(store)
    refunds: dict[int, list] = {i: [] for i in live}
    if post_type == "shop_order" and live:
        for r in store.db.execute(
            f"SELECT p.post_parent, p.id, (SELECT meta_value FROM postmeta WHERE post_id=p.id AND meta_key='_refund_reason') reason, "
            f"(SELECT meta_value FROM postmeta WHERE post_id=p.id AND meta_key='_refund_amount') amount "
            f"FROM posts p WHERE p.post_type='shop_order_refund' AND p.post_parent IN ({','.join('?' * len(live))}) ORDER BY p.id DESC",
            live,
        ):
            refunds[r[0]].append({"id": r[1], "reason": (r[2] or '""').strip('"'),
                                  "total": "-" + (r[3] or '"0.00"').strip('"')})
    collection = "subscriptions" if post_type == "shop_subscription" else "orders"
    out = []
    for oid in live:
        p, m = rows[oid], {k: v for _, k, v in metas[oid]}
        created, modified = pair(store, p["post_date_gmt"]), pair(store, p["post_modified_gmt"])
        paid, completed = pair(store, m.get("_date_paid")), pair(store, m.get("_date_completed"))
        extra = {}
        if p["customer_id"]:
            extra["customer"] = f"{base}/customers/{p['customer_id']}"
        if p["post_parent"]:
            extra["up"] = f"{base}/orders/{p['post_parent']}"
        doc = {
            "id": oid, "parent_id": p["post_parent"], "number": str(m.get("_order_number") or oid),
            "order_key": m.get("_order_key", ""), "created_via": m.get("_created_via", ""),
            "version": m.get("_order_version", ""), "status": p["post_status"],
            "currency": m.get("_order_currency", "EUR"),
            "date_created": created[0], "date_created_gmt": created[1],
            "date_modified": modified[0], "date_modified_gmt": modified[1],
            "discount_total": m.get("_cart_discount", "0.00"), "discount_tax": m.get("_cart_discount_tax", "0.00"),
            "shipping_total": m.get("_order_shipping", "0.00"), "shipping_tax": m.get("_order_shipping_tax", "0.00"),
            "cart_tax": m.get("_order_tax", "0.00"), "total": m.get("_order_total", "0.00"),
            "total_tax": m.get("_order_tax", "0.00"), "prices_include_tax": m.get("_prices_include_tax") == "yes",
            "customer_id": p["customer_id"], "customer_ip_address": m.get("_customer_ip_address", ""),
            "customer_user_agent": m.get("_customer_user_agent", ""), "customer_note": m.get("_customer_note", ""),
            "billing": address(m.get("_billing"), ADDRESS_BILLING),
            "shipping": address(m.get("_shipping"), ADDRESS_SHIPPING),
            "payment_method": m.get("_payment_method", ""), "payment_method_title": m.get("_payment_method_title", ""),
            "transaction_id": m.get("_transaction_id", ""),
            "date_paid": paid[0], "date_paid_gmt": paid[1],
            "date_completed": completed[0], "date_completed_gmt": completed[1],
            "cart_hash": m.get("_cart_hash", ""),
            "meta_data": visible_meta(metas[oid], ORDER_INTERNAL_META),
            **line_items(store, items[oid], skus, parents=parents, images=images, guids=guids),
            "_links": links(base, collection, oid, **extra),
        }
        # get_checkout_payment_url() carries the order key; needs_payment() wants a total above zero;
        # needs_processing() is false when every line's product is virtual and downloadable.
        doc["payment_url"] = f"{site}/checkout/order-pay/{oid}/?pay_for_order=true&key={doc['order_key']}"
        if post_type == "shop_order":
            doc["refunds"] = refunds[oid]
            doc["is_editable"] = p["post_status"] in ("pending", "on-hold", "auto-draft")
            doc["needs_payment"] = p["post_status"] in ("pending", "failed") and float(doc["total"] or 0) > 0
            doc["needs_processing"] = needs_processing(line_products[oid], flags)
        else:
            # WCS 9 (includes/api/class-wc-rest-subscriptions-controller.php): no transaction_id, cart_hash,
            # refunds or set_paid; every sandbox gateway supports amount changes, so is_editable.
            for key in ("transaction_id", "cart_hash"):
                doc.pop(key, None)
            doc["is_editable"] = True
            doc["needs_payment"] = domain.subscription_needs_payment(oid)
            doc["needs_processing"] = needs_processing(line_products[oid], flags)
            doc["billing_period"] = m.get("_billing_period", "month")
            doc["billing_interval"] = str(m.get("_billing_interval", "1"))
            doc["trial_period"] = m.get("_trial_period") or ""
            doc["suspension_count"] = int(m.get("_suspension_count") or 0)
            doc["requires_manual_renewal"] = m.get("_requires_manual_renewal") in (True, "true", "yes")
            for key in ("start", "trial_end", "next_payment", "last_payment", "cancelled", "end"):
                out_key = {"start": "start_date_gmt", "trial_end": "trial_end_date_gmt",
                           "next_payment": "next_payment_date_gmt", "last_payment": "last_payment_date_gmt",
                           "cancelled": "cancelled_date_gmt", "end": "end_date_gmt"}[key]
                doc[out_key] = iso(m.get(f"_schedule_{key}") or "") or ""
            doc["resubscribed_from"] = ""
            doc["resubscribed_subscription"] = ""
            doc["removed_line_items"] = []
        out.append(doc)
    return out


def refunds(store: Store, ids: list[int], base: str) -> list[dict]:
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    rows = {r["id"]: r for r in store.db.execute(f"SELECT * FROM posts WHERE id IN ({marks})", ids)
            if r["post_type"] == "shop_order_refund"}
    live = [i for i in ids if i in rows]
    metas = store.meta_for("postmeta", "post_id", live)
    items = _items(store, live)
    out = []
    for rid in live:
        p, m = rows[rid], {k: v for _, k, v in metas[rid]}
        created, modified = pair(store, p["post_date_gmt"]), pair(store, p["post_modified_gmt"])
        out.append({
            "id": rid, "parent_id": p["post_parent"], "date_created": created[0], "date_created_gmt": created[1],
            "date_modified": modified[0], "date_modified_gmt": modified[1],
            "amount": m.get("_refund_amount", "0.00"), "reason": m.get("_refund_reason", ""),
            "refunded_by": m.get("_refunded_by", 0), "refunded_payment": bool(m.get("_refunded_payment")),
            "meta_data": visible_meta(metas[rid], ORDER_INTERNAL_META | {"_order_currency", "_order_total"}),
            "line_items": line_items(store, items[rid], {}, refund=True)["line_items"],
            "_links": links(base, f"orders/{p['post_parent']}/refunds", rid, up=f"{base}/orders/{p['post_parent']}"),
        })
    return out


def notes(store: Store, post_id: int, note_type: str = "any", note_id: int | None = None) -> list[dict]:
    sql, args = "SELECT * FROM comments WHERE post_id=?", [post_id]
    if note_type == "customer":
        sql += " AND customer_note=1"
    elif note_type == "internal":
        sql += " AND customer_note=0"
    if note_id is not None:
        sql += " AND comment_id=?"
        args.append(note_id)
    out = []
    for r in store.db.execute(sql + " ORDER BY comment_id DESC", args):
        created = pair(store, r["comment_date_gmt"])
        out.append({"id": r["comment_id"], "author": r["author"], "date_created": created[0],
                    "date_created_gmt": created[1], "note": r["content"], "customer_note": bool(r["customer_note"])})
    return out


# -- lookups -----------------------------------------------------------------------------------
def countries(store: Store, base: str, code: str | None = None) -> list[dict]:
    out = []
    for c in store.lookup_rows("COUNTRY"):
        if code and c["code"] != code.upper():
            continue
        states = [{"code": s["code"], "name": s["name"]} for s in store.lookup_rows("STATE", parent_id=c["id"])]
        out.append({"code": c["code"], "name": c["name"], "states": states,
                    "_links": {"self": [{"href": f"{base}/data/countries/{c['code'].lower()}"}],
                               "collection": [{"href": f"{base}/data/countries"}]}})
    return out


def payment_gateways(store: Store, base: str) -> list[dict]:
    return [{"id": g["code"], "title": g["name"], "description": "", "order": g["sort"], "enabled": bool(g["active"]),
             "method_title": g["v_text1"], "method_description": "", "method_supports": ["products"],
             "settings": {}, "_links": links(base, "payment_gateways", 0) | {
                 "self": [{"href": f"{base}/payment_gateways/{g['code']}"}]}}
            for g in store.lookup_rows("PAYMENT_METHOD")]


def tax_classes(store: Store) -> list[dict]:
    return [{"slug": t["code"], "name": t["name"]} for t in store.lookup_rows("TAX_CLASS")]


def subscription_statuses(store: Store) -> dict[str, str]:
    return {f"wc-{s['code']}": s["name"] for s in store.lookup_rows("SUBSCRIPTION_STATUS")}


def order_statuses(store: Store) -> list[dict]:
    return [{"slug": s["code"], "name": s["name"], "total": 0} for s in store.lookup_rows("ORDER_STATUS")]
