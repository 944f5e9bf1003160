-- Orders: header, addresses, lines with their taxes and meta, tax/shipping/fee/coupon lines, other
-- meta; known meta keys promoted; buyers as contacts; missing customers and products queued.
SELECT sync.prepare_batch('orders', 'crm.sales_order');

-- Each document expanded once (jsonb_to_record / jsonb_to_recordset: one pass over an object instead of a
-- `->>` per field, and an inlined crm.money(x->>'f') evaluates its argument three times) into staged temp
-- tables (no WAL), which every statement below reads. Text columns: the same values `->>` gives. The
-- arrays read once stay in b (a copy would be compressed again past 2 kB).
CREATE TEMP TABLE o ON COMMIT DROP AS
SELECT b.source_key::bigint AS id, b.inbox_id, b.run_id, b.source_modified_at, r.*
FROM b, jsonb_to_record(b.payload) AS r(number text, status text, currency text, customer_id text, payment_method text,
    payment_method_title text, transaction_id text, created_via text, prices_include_tax text, customer_note text,
    discount_total text, discount_tax text, shipping_total text, shipping_tax text, cart_tax text, total text,
    total_tax text, date_created_gmt text, date_paid_gmt text, date_completed_gmt text, meta_data jsonb);
-- Addresses (not objects: nothing, as `->>` reads them), the country code worked out once.
CREATE TEMP TABLE ad ON COMMIT DROP AS
SELECT b.source_key::bigint AS order_id, x.kind, r.*, crm.country_code(r.country) AS iso2,
       lower(btrim(r.email)) AS email_norm
FROM b, LATERAL (VALUES ('billing', b.payload->'billing'), ('shipping', b.payload->'shipping')) x(kind, a),
     jsonb_to_record(CASE WHEN jsonb_typeof(x.a) = 'object' THEN x.a END) AS r(first_name text, last_name text,
         company text, address_1 text, address_2 text, city text, state text, postcode text, country text,
         email text, phone text);
CREATE TEMP TABLE li ON COMMIT DROP AS
SELECT b.source_key::bigint AS order_id, r.*
FROM b, jsonb_to_recordset(b.payload->'line_items') AS r(id text, product_id text, variation_id text, name text,
    sku text, quantity text, tax_class text, subtotal text, subtotal_tax text, total text, total_tax text, taxes jsonb,
    meta_data jsonb);
-- Statistics for the joins only: sampling every column (the meta_data documents) cost more than it saved.
ANALYZE o (id, customer_id, status);
ANALYZE ad (order_id, kind, email_norm, iso2);

-- Codes the orders use that the code lists may not have yet (labels follow from the snapshots). In key
-- order, as every shared row below: sessions side by side (transform_sessions) take them in one order.
INSERT INTO crm.currency (code) SELECT DISTINCT currency FROM o ORDER BY 1 ON CONFLICT DO NOTHING;
INSERT INTO crm.order_status (code, label) SELECT DISTINCT status, status FROM o ORDER BY 1 ON CONFLICT DO NOTHING;
INSERT INTO crm.payment_method (code, title)
SELECT DISTINCT ON (payment_method) payment_method, crm.html_text(payment_method_title)
FROM o WHERE COALESCE(payment_method, '') <> '' ON CONFLICT DO NOTHING;
INSERT INTO crm.country (iso2, name)
SELECT DISTINCT iso2, iso2 FROM ad WHERE iso2 IS NOT NULL ORDER BY 1 ON CONFLICT DO NOTHING;
INSERT INTO crm.tax_class (slug, name)
SELECT DISTINCT tax_class, tax_class FROM li WHERE COALESCE(tax_class, '') <> '' ORDER BY 1 ON CONFLICT DO NOTHING;

-- Buyers, registered or guests, once each by normalised email.
INSERT INTO crm.contact (email_norm, first_name, last_name, customer_id)
SELECT DISTINCT ON (ad.email_norm) ad.email_norm, crm.html_text(ad.first_name), crm.html_text(ad.last_name), c.id
FROM ad JOIN o ON o.id = ad.order_id LEFT JOIN crm.customer c ON c.id = NULLIF(o.customer_id::bigint, 0)
WHERE ad.kind = 'billing' AND COALESCE(btrim(ad.email), '') <> ''
ORDER BY ad.email_norm, o.source_modified_at DESC
-- (a contact the CRM holds is rewritten only when it gains its customer: most buyers come back)
ON CONFLICT (email_norm) DO UPDATE SET customer_id = EXCLUDED.customer_id
WHERE crm.contact.customer_id IS NULL AND EXCLUDED.customer_id IS NOT NULL;

CREATE TEMP TABLE known ON COMMIT DROP AS
SELECT o.id FROM crm.sales_order o JOIN b ON o.id = b.source_key::bigint;
ANALYZE known;

INSERT INTO crm.sales_order (id, number, status, currency, customer_id, contact_id, payment_method, payment_method_title,
    transaction_id, created_via, prices_include_tax, customer_note, discount_total, discount_tax, shipping_total,
    shipping_tax, cart_tax, total, total_tax, date_created, date_paid, date_completed, downloads_granted,
    attribution_source, source_modified_at, deleted_at, landed_run_id, landed_inbox_id)
SELECT o.id, o.number, o.status, o.currency, NULLIF(o.customer_id::bigint, 0),
       c.contact_id, NULLIF(o.payment_method, ''), crm.html_text(NULLIF(o.payment_method_title, '')),
       NULLIF(o.transaction_id, ''), o.created_via, o.prices_include_tax::boolean,
       NULLIF(o.customer_note, ''), crm.money(o.discount_total), crm.money(o.discount_tax),
       crm.money(o.shipping_total), crm.money(o.shipping_tax), crm.money(o.cart_tax),
       crm.money(o.total), crm.money(o.total_tax), crm.gmt(o.date_created_gmt),
       crm.gmt(o.date_paid_gmt), crm.gmt(o.date_completed_gmt),
       crm.meta(o.meta_data, '_download_permissions_granted') #>> '{}' = 'yes',
       crm.meta(o.meta_data, '_wc_order_attribution_source_type') #>> '{}',
       o.source_modified_at, CASE WHEN o.status = 'trash' THEN o.source_modified_at END, o.run_id, o.inbox_id
FROM o LEFT JOIN ad ON ad.order_id = o.id AND ad.kind = 'billing'
LEFT JOIN crm.contact c ON c.email_norm = ad.email_norm
ON CONFLICT (id) DO UPDATE SET number = EXCLUDED.number, status = EXCLUDED.status, currency = EXCLUDED.currency,
    customer_id = EXCLUDED.customer_id, contact_id = EXCLUDED.contact_id, payment_method = EXCLUDED.payment_method,
    payment_method_title = EXCLUDED.payment_method_title, transaction_id = EXCLUDED.transaction_id,
    created_via = EXCLUDED.created_via, prices_include_tax = EXCLUDED.prices_include_tax,
    customer_note = EXCLUDED.customer_note, discount_total = EXCLUDED.discount_total,
    discount_tax = EXCLUDED.discount_tax, shipping_total = EXCLUDED.shipping_total,
    shipping_tax = EXCLUDED.shipping_tax, cart_tax = EXCLUDED.cart_tax, total = EXCLUDED.total,
    total_tax = EXCLUDED.total_tax, date_created = EXCLUDED.date_created, date_paid = EXCLUDED.date_paid,
    date_completed = EXCLUDED.date_completed, downloads_granted = EXCLUDED.downloads_granted,
    attribution_source = EXCLUDED.attribution_source, source_modified_at = EXCLUDED.source_modified_at,
    deleted_at = EXCLUDED.deleted_at, landed_run_id = EXCLUDED.landed_run_id, landed_inbox_id = EXCLUDED.landed_inbox_id;
-- Every field the registry's `mapped` list does not name: kept in the extra table, by path.
SELECT sync.keep_unmapped('orders', 'crm.sales_order', 'crm.sales_order_extra_fields', 'order_id');

-- Children are replaced as a whole: an order's lines are part of its document. Orders new to the CRM
-- (known: those it held before this batch) have none to delete.
DELETE FROM crm.sales_order_address WHERE order_id IN (SELECT id FROM known);
-- (a line's taxes and meta explicitly: the references are not enforced, nothing cascades; see 0050)
DELETE FROM crm.sales_order_line_tax WHERE line_id IN (
    SELECT l.id FROM crm.sales_order_line l WHERE l.order_id IN (SELECT id FROM known));
DELETE FROM crm.sales_order_line_meta WHERE line_id IN (
    SELECT l.id FROM crm.sales_order_line l WHERE l.order_id IN (SELECT id FROM known));
DELETE FROM crm.sales_order_line WHERE order_id IN (SELECT id FROM known);
DELETE FROM crm.sales_order_tax WHERE order_id IN (SELECT id FROM known);
DELETE FROM crm.sales_order_shipping WHERE order_id IN (SELECT id FROM known);
DELETE FROM crm.sales_order_fee WHERE order_id IN (SELECT id FROM known);
DELETE FROM crm.sales_order_coupon WHERE order_id IN (SELECT id FROM known);
DELETE FROM crm.sales_order_meta WHERE order_id IN (SELECT id FROM known);
DELETE FROM crm.shipment WHERE order_id IN (SELECT id FROM known);

INSERT INTO crm.sales_order_address (order_id, kind, first_name, last_name, company, address_1, address_2, city,
                                     state_code, postcode, country_iso2, country_raw, email, phone)
SELECT order_id, kind, crm.html_text(first_name), crm.html_text(last_name),
       NULLIF(company, ''), NULLIF(address_1, ''), NULLIF(address_2, ''), crm.html_text(NULLIF(city, '')),
       NULLIF(state, ''), NULLIF(postcode, ''), iso2, CASE WHEN iso2 IS NULL THEN NULLIF(country, '') END,
       NULLIF(email, ''), NULLIF(phone, '')
FROM ad
WHERE COALESCE(address_1, '') <> '' OR COALESCE(first_name, '') <> '' OR COALESCE(email, '') <> '';

INSERT INTO crm.sales_order_line (id, order_id, product_id, variation_id, name, sku, quantity, tax_class, subtotal,
                                  subtotal_tax, total, total_tax)
SELECT id::bigint, order_id, NULLIF(product_id::bigint, 0), NULLIF(variation_id::bigint, 0), crm.html_text(name),
       NULLIF(sku, ''), quantity::numeric, COALESCE(NULLIF(tax_class, ''), 'standard'), crm.money(subtotal),
       crm.money(subtotal_tax), crm.money(total), crm.money(total_tax)
FROM li;

INSERT INTO crm.sales_order_line_tax (line_id, rate_id, total, subtotal)
SELECT li.id::bigint, t.id::bigint, crm.money(t.total), crm.money(t.subtotal)
FROM li, jsonb_to_recordset(li.taxes) AS t(id text, total text, subtotal text);

INSERT INTO crm.sales_order_line_meta (line_id, meta_id, key, value)
SELECT li.id::bigint, (m->>'id')::bigint, m->>'key', m->'value'
FROM li, jsonb_array_elements(li.meta_data) m;

INSERT INTO crm.sales_order_tax (id, order_id, rate_code, rate_id, label, compound, tax_total, shipping_tax_total, rate_percent)
SELECT t.id::bigint, b.source_key::bigint, t.rate_code, t.rate_id::bigint, t.label, t.compound::boolean,
       crm.money(t.tax_total), crm.money(t.shipping_tax_total), t.rate_percent::numeric
FROM b, jsonb_to_recordset(b.payload->'tax_lines') AS t(id text, rate_code text, rate_id text, label text,
    compound text, tax_total text, shipping_tax_total text, rate_percent text);

INSERT INTO crm.sales_order_shipping (id, order_id, method_id, method_title, instance_id, total, total_tax)
SELECT s.id::bigint, b.source_key::bigint, s.method_id, crm.html_text(s.method_title), s.instance_id,
       crm.money(s.total), crm.money(s.total_tax)
FROM b, jsonb_to_recordset(b.payload->'shipping_lines') AS s(id text, method_id text, method_title text,
    instance_id text, total text, total_tax text);

INSERT INTO crm.sales_order_fee (id, order_id, name, tax_class, tax_status, total, total_tax)
SELECT f.id::bigint, b.source_key::bigint, crm.html_text(f.name), f.tax_class, f.tax_status, crm.money(f.total),
       crm.money(f.total_tax)
FROM b, jsonb_to_recordset(b.payload->'fee_lines') AS f(id text, name text, tax_class text, tax_status text,
    total text, total_tax text);

INSERT INTO crm.sales_order_coupon (id, order_id, code, discount, discount_tax, discount_type, nominal_amount)
SELECT c.id::bigint, b.source_key::bigint, c.code, crm.money(c.discount), crm.money(c.discount_tax), c.discount_type,
       c.nominal_amount::numeric
FROM b, jsonb_to_recordset(b.payload->'coupon_lines') AS c(id text, code text, discount text,
    discount_tax text, discount_type text, nominal_amount text);

-- Known meta keys become columns or relations; every other key is kept as it came.
INSERT INTO crm.shipment (order_id, carrier, tracking_number)
SELECT o.id, t->>'carrier', t->>'number'
FROM o, LATERAL (SELECT crm.meta(o.meta_data, '_tracking') AS t) x WHERE t IS NOT NULL;

INSERT INTO crm.subscription_order (subscription_id, order_id, relation)
SELECT (m->'value' #>> '{}')::bigint, o.id, CASE m->>'key' WHEN '_subscription_renewal' THEN 'renewal' ELSE 'switch' END
FROM o, jsonb_array_elements(o.meta_data) m
WHERE m->>'key' IN ('_subscription_renewal', '_subscription_switch')
ON CONFLICT DO NOTHING;

INSERT INTO crm.sales_order_meta (order_id, meta_id, key, value)
SELECT o.id, (m->>'id')::bigint, m->>'key', m->'value'
FROM o, jsonb_array_elements(o.meta_data) m
WHERE m->>'key' NOT IN ('_download_permissions_granted', '_wc_order_attribution_source_type', '_tracking',
                        '_subscription_renewal', '_subscription_switch');

-- References the CRM cannot resolve yet: kept as source ids, and queued for fetching on demand.
-- (Read from the batch's documents: the CRM's tables grow, the batch does not.)
INSERT INTO sync.fetch_request (entity, source_key, reason)
SELECT DISTINCT ON (c.customer_id) 'customers', c.customer_id::text, 'customer of order ' || o.id
FROM o CROSS JOIN LATERAL (SELECT NULLIF(o.customer_id::bigint, 0) AS customer_id) c
WHERE c.customer_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.customer k WHERE k.id = c.customer_id)
ON CONFLICT DO NOTHING;
INSERT INTO sync.fetch_request (entity, source_key, reason)
SELECT DISTINCT ON (l.product_id) 'products', l.product_id::text, 'product of order line ' || li.id
FROM li CROSS JOIN LATERAL (SELECT NULLIF(li.product_id::bigint, 0) AS product_id) l
WHERE l.product_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.product p WHERE p.id = l.product_id)
ON CONFLICT DO NOTHING;
