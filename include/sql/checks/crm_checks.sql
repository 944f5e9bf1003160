-- CRM checks: each query returns the offending rows (a key and the problem); none means pass.
-- name: order_totals_add_up
SELECT o.id::text AS key, format('total %s but lines %s + shipping %s + fees %s + tax %s', o.total,
       COALESCE(l.total, 0), o.shipping_total, COALESCE(f.total, 0), o.total_tax) AS problem
FROM crm.sales_order o
LEFT JOIN (SELECT order_id, sum(total) total FROM crm.sales_order_line GROUP BY 1) l ON l.order_id = o.id
LEFT JOIN (SELECT order_id, sum(total) total FROM crm.sales_order_fee GROUP BY 1) f ON f.order_id = o.id
WHERE o.deleted_at IS NULL
  AND abs(o.total - (COALESCE(l.total, 0) + o.shipping_total + COALESCE(f.total, 0) + o.total_tax)) > 0.02;
-- name: refunds_within_their_order
SELECT r.id::text, format('refund %s exceeds order %s total %s', r.amount, o.id, o.total)
FROM crm.refund r JOIN crm.sales_order o ON o.id = r.order_id
WHERE r.deleted_at IS NULL AND r.amount > o.total + 0.01;
-- name: references_resolved_or_queued
SELECT o.id::text, format('customer %s is neither in the CRM nor queued for fetching', o.customer_id)
FROM crm.sales_order o
WHERE o.customer_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.customer c WHERE c.id = o.customer_id)
  AND NOT EXISTS (SELECT 1 FROM sync.fetch_request f WHERE f.entity = 'customers' AND f.source_key = o.customer_id::text)
UNION ALL
SELECT l.id::text, format('product %s of line %s is neither in the CRM nor queued', l.product_id, l.id)
FROM crm.sales_order_line l
WHERE l.product_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.product p WHERE p.id = l.product_id)
  AND NOT EXISTS (SELECT 1 FROM sync.fetch_request f WHERE f.entity = 'products' AND f.source_key = l.product_id::text);
-- name: order_parts_have_their_order
-- (declared NOT ENFORCED on PostgreSQL 18+, see migration 0050: checked here, set-based)
SELECT format('%s %s', t, id), format('refers to order %s, which the CRM does not have', order_id) FROM (
    SELECT 'address' t, kind id, order_id FROM crm.sales_order_address UNION ALL
    SELECT 'line', id::text, order_id FROM crm.sales_order_line UNION ALL
    SELECT 'tax line', id::text, order_id FROM crm.sales_order_tax UNION ALL
    SELECT 'shipping line', id::text, order_id FROM crm.sales_order_shipping UNION ALL
    SELECT 'fee line', id::text, order_id FROM crm.sales_order_fee UNION ALL
    SELECT 'coupon line', id::text, order_id FROM crm.sales_order_coupon UNION ALL
    SELECT 'meta', meta_id::text, order_id FROM crm.sales_order_meta UNION ALL
    SELECT 'shipment', '', order_id FROM crm.shipment UNION ALL
    SELECT 'unmapped fields', '', order_id FROM crm.sales_order_extra_fields) p
WHERE NOT EXISTS (SELECT 1 FROM crm.sales_order o WHERE o.id = p.order_id)
UNION ALL
SELECT format('line %s %s', t, line_id), format('refers to order line %s, which the CRM does not have', line_id) FROM (
    SELECT 'tax' t, line_id FROM crm.sales_order_line_tax UNION ALL
    SELECT 'meta', line_id FROM crm.sales_order_line_meta) p
WHERE NOT EXISTS (SELECT 1 FROM crm.sales_order_line l WHERE l.id = p.line_id);
-- name: orders_use_known_codes
-- (declared NOT ENFORCED on PostgreSQL 18+, see migration 0050: checked here, set-based)
SELECT o.id::text, format('status %s, currency %s, gateway %s or contact %s is not in the CRM', o.status, o.currency,
                          o.payment_method, o.contact_id)
FROM crm.sales_order o
WHERE NOT EXISTS (SELECT 1 FROM crm.order_status s WHERE s.code = o.status)
   OR NOT EXISTS (SELECT 1 FROM crm.currency c WHERE c.code = o.currency)
   OR (o.payment_method IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.payment_method p WHERE p.code = o.payment_method))
   OR (o.contact_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.contact c WHERE c.contact_id = o.contact_id))
UNION ALL
SELECT 'line ' || l.id, format('tax class %s is not in the CRM', l.tax_class) FROM crm.sales_order_line l
WHERE l.tax_class IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.tax_class t WHERE t.slug = l.tax_class)
UNION ALL
SELECT format('address %s %s', a.order_id, a.kind), format('country %s is not in the CRM', a.country_iso2)
FROM crm.sales_order_address a
WHERE a.country_iso2 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.country c WHERE c.iso2 = a.country_iso2);
-- name: categories_have_paths
SELECT id::text, 'no path from a root (a cycle?)' FROM crm.product_category WHERE deleted_at IS NULL AND path = '';
-- name: buyers_are_contacts
SELECT o.id::text, 'order without a contact although it has a billing email'
FROM crm.sales_order o JOIN crm.sales_order_address a ON a.order_id = o.id AND a.kind = 'billing'
WHERE o.contact_id IS NULL AND COALESCE(a.email, '') <> '';
-- name: no_unapplied_inbox_rows_left_behind
-- (quarantined rows are accounted for: they wait in sync.transform_quarantine with their reason)
SELECT entity || ':' || source_key, 'landed more than an hour ago and still not applied'
FROM inbox.record r WHERE applied_at IS NULL AND received_at < now() - interval '1 hour'
  AND entity IN ('orders', 'customers', 'products', 'refunds', 'subscriptions', 'product_categories')
  AND NOT EXISTS (SELECT 1 FROM sync.transform_quarantine q WHERE q.inbox_id = r.inbox_id AND q.resolved_at IS NULL);
