-- Customers, their two addresses, their other meta; contacts linked by normalised email.
SELECT sync.prepare_batch('customers', 'crm.customer');

INSERT INTO crm.country (iso2, name)
SELECT DISTINCT crm.country_code(a->>'country'), crm.country_code(a->>'country')
FROM b, LATERAL (VALUES (payload->'billing'), (payload->'shipping')) x(a)
WHERE crm.country_code(a->>'country') IS NOT NULL ON CONFLICT DO NOTHING;

INSERT INTO crm.customer (id, email, first_name, last_name, username, role, is_paying, preferred_language,
                          date_created, source_modified_at, deleted_at, landed_run_id, landed_inbox_id)
SELECT source_key::bigint, payload->>'email', crm.html_text(NULLIF(payload->>'first_name', '')), crm.html_text(NULLIF(payload->>'last_name', '')),
       payload->>'username', payload->>'role', (payload->>'is_paying_customer')::boolean,
       crm.meta(payload->'meta_data', 'preferred_language') #>> '{}', crm.gmt(payload->>'date_created_gmt'),
       crm.gmt(payload->>'date_modified_gmt'), NULL, run_id, inbox_id
FROM b
ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name,
    username = EXCLUDED.username, role = EXCLUDED.role, is_paying = EXCLUDED.is_paying,
    preferred_language = EXCLUDED.preferred_language, date_created = EXCLUDED.date_created,
    source_modified_at = EXCLUDED.source_modified_at, deleted_at = NULL, landed_run_id = EXCLUDED.landed_run_id,
    landed_inbox_id = EXCLUDED.landed_inbox_id;
-- Every field the registry's `mapped` list does not name: kept in the extra table, by path.
SELECT sync.keep_unmapped('customers', 'crm.customer', 'crm.customer_extra_fields', 'customer_id');

DELETE FROM crm.customer_address WHERE customer_id IN (SELECT source_key::bigint FROM b);
INSERT INTO crm.customer_address (customer_id, kind, first_name, last_name, company, address_1, address_2, city,
                                  state_code, postcode, country_iso2, country_raw, email, phone)
SELECT b.source_key::bigint, x.kind, crm.html_text(a->>'first_name'), crm.html_text(a->>'last_name'),
       NULLIF(a->>'company', ''), NULLIF(a->>'address_1', ''), NULLIF(a->>'address_2', ''), crm.html_text(NULLIF(a->>'city', '')),
       NULLIF(a->>'state', ''), NULLIF(a->>'postcode', ''), crm.country_code(a->>'country'),
       CASE WHEN crm.country_code(a->>'country') IS NULL THEN NULLIF(a->>'country', '') END, NULLIF(a->>'email', ''),
       NULLIF(a->>'phone', '')
FROM b, LATERAL (VALUES ('billing', payload->'billing'), ('shipping', payload->'shipping')) x(kind, a)
WHERE COALESCE(a->>'address_1', '') <> '' OR COALESCE(a->>'first_name', '') <> '' OR COALESCE(a->>'country', '') <> '';

DELETE FROM crm.customer_meta WHERE customer_id IN (SELECT source_key::bigint FROM b);
INSERT INTO crm.customer_meta (customer_id, meta_id, key, value)
SELECT b.source_key::bigint, (m->>'id')::bigint, m->>'key', m->'value'
FROM b, jsonb_array_elements(payload->'meta_data') m
WHERE m->>'key' NOT IN ('preferred_language');

INSERT INTO crm.contact (email_norm, first_name, last_name, customer_id)
SELECT DISTINCT ON (lower(btrim(payload->>'email'))) lower(btrim(payload->>'email')),
       crm.html_text(NULLIF(payload->>'first_name', '')), crm.html_text(NULLIF(payload->>'last_name', '')), source_key::bigint
FROM b WHERE COALESCE(btrim(payload->>'email'), '') <> ''
ORDER BY lower(btrim(payload->>'email')), source_key::bigint
ON CONFLICT (email_norm) DO UPDATE SET customer_id = EXCLUDED.customer_id,
    first_name = COALESCE(EXCLUDED.first_name, crm.contact.first_name),
    last_name = COALESCE(EXCLUDED.last_name, crm.contact.last_name);

UPDATE sync.fetch_request f SET fetched_at = clock_timestamp()
FROM b WHERE f.entity = 'customers' AND f.source_key = b.source_key AND f.fetched_at IS NULL;

-- Orders that arrived before their customer (fetched on demand later): their buyer's contact is linked
-- now, as the orders transform links it when the customer is already there (the newest order decides).
UPDATE crm.contact ct SET customer_id = o.customer_id
FROM (SELECT DISTINCT ON (o.contact_id) o.contact_id, o.customer_id FROM crm.sales_order o
      JOIN b ON o.customer_id = b.source_key::bigint
      ORDER BY o.contact_id, o.date_created DESC, o.id DESC) o
WHERE ct.contact_id = o.contact_id AND ct.customer_id IS NULL;
