-- Orders: header, addresses, lines with their taxes and meta, tax/shipping/fee/coupon lines, other
-- meta; known meta keys promoted; buyers as contacts; missing customers and products queued.
SELECT sync.prepare_batch('orders', 'crm.sales_order');

-- Codes the orders use that the code lists may not have yet (labels follow from the snapshots).
INSERT INTO crm.currency (code) SELECT DISTINCT payload->>'currency' FROM b ON CONFLICT DO NOTHING;
INSERT INTO crm.order_status (code, label) SELECT DISTINCT payload->>'status', payload->>'status' FROM b
ON CONFLICT DO NOTHING;
INSERT INTO crm.payment_method (code, title)
SELECT DISTINCT ON (payload->>'payment_method') payload->>'payment_method', crm.html_text(payload->>'payment_method_title')
FROM b WHERE COALESCE(payload->>'payment_method', '') <> '' ON CONFLICT DO NOTHING;
INSERT INTO crm.country (iso2, name)
SELECT DISTINCT crm.country_code(a->>'country'), crm.country_code(a->>'country')
FROM b, LATERAL (VALUES (payload->'billing'), (payload->'shipping')) x(a)
WHERE crm.country_code(a->>'country') IS NOT NULL ON CONFLICT DO NOTHING;
INSERT INTO crm.tax_class (slug, name)
SELECT DISTINCT li->>'tax_class', li->>'tax_class' FROM b, jsonb_array_elements(payload->'line_items') li
WHERE COALESCE(li->>'tax_class', '') <> '' ON CONFLICT DO NOTHING;

-- Buyers, registered or guests, once each by normalised email.
INSERT INTO crm.contact (email_norm, first_name, last_name, customer_id)
SELECT DISTINCT ON (lower(btrim(payload->'billing'->>'email'))) lower(btrim(payload->'billing'->>'email')),
       crm.html_text(payload->'billing'->>'first_name'), crm.html_text(payload->'billing'->>'last_name'), c.id
FROM b LEFT JOIN crm.customer c ON c.id = NULLIF((payload->>'customer_id')::bigint, 0)
WHERE COALESCE(btrim(payload->'billing'->>'email'), '') <> ''
ORDER BY lower(btrim(payload->'billing'->>'email')), b.source_modified_at DESC
ON CONFLICT (email_norm) DO UPDATE SET customer_id = COALESCE(crm.contact.customer_id, EXCLUDED.customer_id);

CREATE TEMP TABLE known ON COMMIT DROP AS
SELECT o.id FROM crm.sales_order o JOIN b ON o.id = b.source_key::bigint;
ANALYZE known;

INSERT INTO crm.sales_order (id, number, status, currency, customer_id, contact_id, payment_method, payment_method_title,
    transaction_id, created_via, prices_include_tax, customer_note, discount_total, discount_tax, shipping_total,
    shipping_tax, cart_tax, total, total_tax, date_created, date_paid, date_completed, downloads_granted,
    attribution_source, source_modified_at, deleted_at, landed_run_id, landed_inbox_id)
SELECT b.source_key::bigint, p->>'number', p->>'status', p->>'currency', NULLIF((p->>'customer_id')::bigint, 0),
       c.contact_id, NULLIF(p->>'payment_method', ''), crm.html_text(NULLIF(p->>'payment_method_title', '')),
       NULLIF(p->>'transaction_id', ''), p->>'created_via', (p->>'prices_include_tax')::boolean,
       NULLIF(p->>'customer_note', ''), crm.money(p->>'discount_total'), crm.money(p->>'discount_tax'),
       crm.money(p->>'shipping_total'), crm.money(p->>'shipping_tax'), crm.money(p->>'cart_tax'),
       crm.money(p->>'total'), crm.money(p->>'total_tax'), crm.gmt(p->>'date_created_gmt'),
       crm.gmt(p->>'date_paid_gmt'), crm.gmt(p->>'date_completed_gmt'),
       crm.meta(p->'meta_data', '_download_permissions_granted') #>> '{}' = 'yes',
       crm.meta(p->'meta_data', '_wc_order_attribution_source_type') #>> '{}',
       b.source_modified_at, CASE WHEN p->>'status' = 'trash' THEN b.source_modified_at END, b.run_id, b.inbox_id
FROM b CROSS JOIN LATERAL (SELECT b.payload AS p) x
LEFT JOIN crm.contact c ON c.email_norm = lower(btrim(p->'billing'->>'email'))
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
SELECT b.source_key::bigint, x.kind, crm.html_text(a->>'first_name'), crm.html_text(a->>'last_name'),
       NULLIF(a->>'company', ''), NULLIF(a->>'address_1', ''), NULLIF(a->>'address_2', ''), crm.html_text(NULLIF(a->>'city', '')),
       NULLIF(a->>'state', ''), NULLIF(a->>'postcode', ''), crm.country_code(a->>'country'),
       CASE WHEN crm.country_code(a->>'country') IS NULL THEN NULLIF(a->>'country', '') END, NULLIF(a->>'email', ''),
       NULLIF(a->>'phone', '')
FROM b, LATERAL (VALUES ('billing', payload->'billing'), ('shipping', payload->'shipping')) x(kind, a)
WHERE COALESCE(a->>'address_1', '') <> '' OR COALESCE(a->>'first_name', '') <> '' OR COALESCE(a->>'email', '') <> '';

INSERT INTO crm.sales_order_line (id, order_id, product_id, variation_id, name, sku, quantity, tax_class, subtotal,
                                  subtotal_tax, total, total_tax)
SELECT (li->>'id')::bigint, b.source_key::bigint, NULLIF((li->>'product_id')::bigint, 0),
       NULLIF((li->>'variation_id')::bigint, 0), crm.html_text(li->>'name'), NULLIF(li->>'sku', ''),
       (li->>'quantity')::numeric, COALESCE(NULLIF(li->>'tax_class', ''), 'standard'), crm.money(li->>'subtotal'),
       crm.money(li->>'subtotal_tax'), crm.money(li->>'total'), crm.money(li->>'total_tax')
FROM b, jsonb_array_elements(payload->'line_items') li;

INSERT INTO crm.sales_order_line_tax (line_id, rate_id, total, subtotal)
SELECT (li->>'id')::bigint, (t->>'id')::bigint, crm.money(t->>'total'), crm.money(t->>'subtotal')
FROM b, jsonb_array_elements(payload->'line_items') li, jsonb_array_elements(li->'taxes') t;

INSERT INTO crm.sales_order_line_meta (line_id, meta_id, key, value)
SELECT (li->>'id')::bigint, (m->>'id')::bigint, m->>'key', m->'value'
FROM b, jsonb_array_elements(payload->'line_items') li, jsonb_array_elements(li->'meta_data') m;

INSERT INTO crm.sales_order_tax (id, order_id, rate_code, rate_id, label, compound, tax_total, shipping_tax_total, rate_percent)
SELECT (t->>'id')::bigint, b.source_key::bigint, t->>'rate_code', (t->>'rate_id')::bigint, t->>'label',
       (t->>'compound')::boolean, crm.money(t->>'tax_total'), crm.money(t->>'shipping_tax_total'), (t->>'rate_percent')::numeric
FROM b, jsonb_array_elements(payload->'tax_lines') t;

INSERT INTO crm.sales_order_shipping (id, order_id, method_id, method_title, instance_id, total, total_tax)
SELECT (s->>'id')::bigint, b.source_key::bigint, s->>'method_id', crm.html_text(s->>'method_title'), s->>'instance_id',
       crm.money(s->>'total'), crm.money(s->>'total_tax')
FROM b, jsonb_array_elements(payload->'shipping_lines') s;

INSERT INTO crm.sales_order_fee (id, order_id, name, tax_class, tax_status, total, total_tax)
SELECT (f->>'id')::bigint, b.source_key::bigint, crm.html_text(f->>'name'), f->>'tax_class', f->>'tax_status',
       crm.money(f->>'total'), crm.money(f->>'total_tax')
FROM b, jsonb_array_elements(payload->'fee_lines') f;

INSERT INTO crm.sales_order_coupon (id, order_id, code, discount, discount_tax, discount_type, nominal_amount)
SELECT (c->>'id')::bigint, b.source_key::bigint, c->>'code', crm.money(c->>'discount'), crm.money(c->>'discount_tax'),
       c->>'discount_type', (c->>'nominal_amount')::numeric
FROM b, jsonb_array_elements(payload->'coupon_lines') c;

-- Known meta keys become columns or relations; every other key is kept as it came.
INSERT INTO crm.shipment (order_id, carrier, tracking_number)
SELECT b.source_key::bigint, t->>'carrier', t->>'number'
FROM b, LATERAL (SELECT crm.meta(payload->'meta_data', '_tracking') AS t) x WHERE t IS NOT NULL;

INSERT INTO crm.subscription_order (subscription_id, order_id, relation)
SELECT (m->'value' #>> '{}')::bigint, b.source_key::bigint,
       CASE m->>'key' WHEN '_subscription_renewal' THEN 'renewal' ELSE 'switch' END
FROM b, jsonb_array_elements(payload->'meta_data') m
WHERE m->>'key' IN ('_subscription_renewal', '_subscription_switch')
ON CONFLICT DO NOTHING;

INSERT INTO crm.sales_order_meta (order_id, meta_id, key, value)
SELECT b.source_key::bigint, (m->>'id')::bigint, m->>'key', m->'value'
FROM b, jsonb_array_elements(payload->'meta_data') m
WHERE m->>'key' NOT IN ('_download_permissions_granted', '_wc_order_attribution_source_type', '_tracking',
                        '_subscription_renewal', '_subscription_switch');

-- References the CRM cannot resolve yet: kept as source ids, and queued for fetching on demand.
-- (Read from the batch's documents: the CRM's tables grow, the batch does not.)
INSERT INTO sync.fetch_request (entity, source_key, reason)
SELECT DISTINCT ON (o.customer_id) 'customers', o.customer_id::text, 'customer of order ' || b.source_key
FROM b CROSS JOIN LATERAL (SELECT NULLIF((b.payload->>'customer_id')::bigint, 0) AS customer_id) o
WHERE o.customer_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.customer c WHERE c.id = o.customer_id)
ON CONFLICT DO NOTHING;
INSERT INTO sync.fetch_request (entity, source_key, reason)
SELECT DISTINCT ON (l.product_id) 'products', l.product_id::text, 'product of order line ' || (li->>'id')
FROM b, jsonb_array_elements(b.payload->'line_items') li,
     LATERAL (SELECT NULLIF((li->>'product_id')::bigint, 0) AS product_id) l
WHERE l.product_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.product p WHERE p.id = l.product_id)
ON CONFLICT DO NOTHING;
