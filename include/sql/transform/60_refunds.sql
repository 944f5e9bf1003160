-- Refunds and their lines. Amounts are positive here; the store sends the lines negative.
SELECT sync.prepare_batch('refunds', 'crm.refund');

INSERT INTO crm.refund (id, order_id, amount, reason, refunded_by, refunded_payment, date_created, source_modified_at,
                        deleted_at, landed_run_id, landed_inbox_id)
SELECT source_key::bigint, (payload->>'parent_id')::bigint, crm.money(payload->>'amount'), NULLIF(payload->>'reason', ''),
       NULLIF((payload->>'refunded_by')::bigint, 0), (payload->>'refunded_payment')::boolean,
       crm.gmt(payload->>'date_created_gmt'), source_modified_at, NULL, run_id, inbox_id
FROM b
ON CONFLICT (id) DO UPDATE SET order_id = EXCLUDED.order_id, amount = EXCLUDED.amount, reason = EXCLUDED.reason,
    refunded_by = EXCLUDED.refunded_by, refunded_payment = EXCLUDED.refunded_payment,
    date_created = EXCLUDED.date_created, source_modified_at = EXCLUDED.source_modified_at, deleted_at = NULL,
    landed_run_id = EXCLUDED.landed_run_id, landed_inbox_id = EXCLUDED.landed_inbox_id;
-- Every field the registry's `mapped` list does not name: kept in the extra table, by path.
SELECT sync.keep_unmapped('refunds', 'crm.refund', 'crm.refund_extra_fields', 'refund_id');

DELETE FROM crm.refund_line WHERE refund_id IN (SELECT source_key::bigint FROM b);
INSERT INTO crm.refund_line (id, refund_id, product_id, variation_id, name, quantity, total, total_tax)
SELECT (li->>'id')::bigint, b.source_key::bigint, NULLIF((li->>'product_id')::bigint, 0),
       NULLIF((li->>'variation_id')::bigint, 0), crm.html_text(li->>'name'), -(li->>'quantity')::numeric,
       -crm.money(li->>'total'), -crm.money(li->>'total_tax')
FROM b, jsonb_array_elements(payload->'line_items') li;

INSERT INTO sync.fetch_request (entity, source_key, reason)
SELECT DISTINCT ON (r.order_id) 'orders', r.order_id::text, 'order of refund ' || r.id
FROM crm.refund r JOIN b ON b.source_key::bigint = r.id
WHERE NOT EXISTS (SELECT 1 FROM crm.sales_order o WHERE o.id = r.order_id)
ORDER BY r.order_id, r.id
ON CONFLICT DO NOTHING;
