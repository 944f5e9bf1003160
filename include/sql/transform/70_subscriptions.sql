-- Subscriptions, their lines and meta, and their relation to orders (parent here; renewals and
-- switches come from the orders' meta).
SELECT sync.prepare_batch('subscriptions', 'crm.subscription');

INSERT INTO crm.currency (code) SELECT DISTINCT payload->>'currency' FROM b ON CONFLICT DO NOTHING;
INSERT INTO crm.subscription_status (code, label) SELECT DISTINCT payload->>'status', payload->>'status' FROM b
ON CONFLICT DO NOTHING;
INSERT INTO crm.payment_method (code, title)
SELECT DISTINCT ON (payload->>'payment_method') payload->>'payment_method', crm.html_text(payload->>'payment_method_title')
FROM b WHERE COALESCE(payload->>'payment_method', '') <> '' ON CONFLICT DO NOTHING;

INSERT INTO crm.subscription (id, status, customer_id, currency, billing_period, billing_interval, payment_method, total,
    start_date, trial_end_date, next_payment_date, last_payment_date, cancelled_date, end_date, stripe_customer_id,
    date_created, source_modified_at, deleted_at, landed_run_id, landed_inbox_id)
SELECT source_key::bigint, payload->>'status', NULLIF((payload->>'customer_id')::bigint, 0), payload->>'currency',
       payload->>'billing_period', (payload->>'billing_interval')::integer, NULLIF(payload->>'payment_method', ''),
       crm.money(payload->>'total'), crm.gmt(payload->>'start_date_gmt'), crm.gmt(payload->>'trial_end_date_gmt'),
       crm.gmt(payload->>'next_payment_date_gmt'), crm.gmt(payload->>'last_payment_date_gmt'),
       crm.gmt(payload->>'cancelled_date_gmt'), crm.gmt(payload->>'end_date_gmt'),
       crm.meta(payload->'meta_data', '_stripe_customer_id') #>> '{}', crm.gmt(payload->>'date_created_gmt'),
       source_modified_at, CASE WHEN payload->>'status' = 'trash' THEN source_modified_at END, run_id, inbox_id
FROM b
ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, customer_id = EXCLUDED.customer_id, currency = EXCLUDED.currency,
    billing_period = EXCLUDED.billing_period, billing_interval = EXCLUDED.billing_interval,
    payment_method = EXCLUDED.payment_method, total = EXCLUDED.total, start_date = EXCLUDED.start_date,
    trial_end_date = EXCLUDED.trial_end_date, next_payment_date = EXCLUDED.next_payment_date,
    last_payment_date = EXCLUDED.last_payment_date, cancelled_date = EXCLUDED.cancelled_date,
    end_date = EXCLUDED.end_date, stripe_customer_id = EXCLUDED.stripe_customer_id,
    date_created = EXCLUDED.date_created, source_modified_at = EXCLUDED.source_modified_at,
    deleted_at = EXCLUDED.deleted_at, landed_run_id = EXCLUDED.landed_run_id, landed_inbox_id = EXCLUDED.landed_inbox_id;
-- Every field the registry's `mapped` list does not name: kept in the extra table, by path.
SELECT sync.keep_unmapped('subscriptions', 'crm.subscription', 'crm.subscription_extra_fields', 'subscription_id');

DELETE FROM crm.subscription_line WHERE subscription_id IN (SELECT source_key::bigint FROM b);
INSERT INTO crm.subscription_line (id, subscription_id, product_id, variation_id, name, quantity, total, total_tax)
SELECT (li->>'id')::bigint, b.source_key::bigint, NULLIF((li->>'product_id')::bigint, 0),
       NULLIF((li->>'variation_id')::bigint, 0), crm.html_text(li->>'name'), (li->>'quantity')::numeric,
       crm.money(li->>'total'), crm.money(li->>'total_tax')
FROM b, jsonb_array_elements(payload->'line_items') li;

DELETE FROM crm.subscription_meta WHERE subscription_id IN (SELECT source_key::bigint FROM b);
INSERT INTO crm.subscription_meta (subscription_id, meta_id, key, value)
SELECT b.source_key::bigint, (m->>'id')::bigint, m->>'key', m->'value'
FROM b, jsonb_array_elements(payload->'meta_data') m WHERE m->>'key' NOT IN ('_stripe_customer_id');

INSERT INTO crm.subscription_order (subscription_id, order_id, relation)
SELECT source_key::bigint, (payload->>'parent_id')::bigint, 'parent' FROM b
WHERE COALESCE((payload->>'parent_id')::bigint, 0) > 0
ON CONFLICT DO NOTHING;

INSERT INTO sync.fetch_request (entity, source_key, reason)
SELECT DISTINCT ON (s.customer_id) 'customers', s.customer_id::text, 'customer of subscription ' || s.id
FROM crm.subscription s JOIN b ON b.source_key::bigint = s.id
WHERE s.customer_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM crm.customer c WHERE c.id = s.customer_id)
ON CONFLICT DO NOTHING;
