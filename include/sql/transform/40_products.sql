-- Products (and variations), their category links, attributes and other meta.
SELECT sync.prepare_batch('products', 'crm.product');

INSERT INTO crm.tax_class (slug, name)
SELECT DISTINCT payload->>'tax_class', payload->>'tax_class' FROM b WHERE COALESCE(payload->>'tax_class', '') <> ''
ON CONFLICT DO NOTHING;

INSERT INTO crm.product (id, parent_id, type, name, slug, sku, status, price, regular_price, sale_price, tax_class,
                         virtual, downloadable, stock_quantity, stock_status, course_id, date_created,
                         source_modified_at, deleted_at, landed_run_id, landed_inbox_id)
SELECT source_key::bigint, NULLIF((payload->>'parent_id')::bigint, 0), payload->>'type', crm.html_text(payload->>'name'),
       payload->>'slug', NULLIF(payload->>'sku', ''), payload->>'status', crm.money(payload->>'price'),
       crm.money(payload->>'regular_price'), crm.money(payload->>'sale_price'),
       COALESCE(NULLIF(payload->>'tax_class', ''), 'standard'), (payload->>'virtual')::boolean,
       (payload->>'downloadable')::boolean, (payload->>'stock_quantity')::numeric, payload->>'stock_status',
       (crm.meta(payload->'meta_data', '_course_id') #>> '{}')::bigint, crm.gmt(payload->>'date_created_gmt'),
       source_modified_at, CASE WHEN payload->>'status' = 'trash' THEN source_modified_at END, run_id, inbox_id
FROM b
ON CONFLICT (id) DO UPDATE SET parent_id = EXCLUDED.parent_id, type = EXCLUDED.type, name = EXCLUDED.name,
    slug = EXCLUDED.slug, sku = EXCLUDED.sku, status = EXCLUDED.status, price = EXCLUDED.price,
    regular_price = EXCLUDED.regular_price, sale_price = EXCLUDED.sale_price, tax_class = EXCLUDED.tax_class,
    virtual = EXCLUDED.virtual, downloadable = EXCLUDED.downloadable, stock_quantity = EXCLUDED.stock_quantity,
    stock_status = EXCLUDED.stock_status, course_id = EXCLUDED.course_id, date_created = EXCLUDED.date_created,
    source_modified_at = EXCLUDED.source_modified_at, deleted_at = EXCLUDED.deleted_at,
    landed_run_id = EXCLUDED.landed_run_id, landed_inbox_id = EXCLUDED.landed_inbox_id;
-- Every field the registry's `mapped` list does not name: kept in the extra table, by path.
SELECT sync.keep_unmapped('products', 'crm.product', 'crm.product_extra_fields', 'product_id');

DELETE FROM crm.product_category_link WHERE product_id IN (SELECT source_key::bigint FROM b);
INSERT INTO crm.product_category_link (product_id, category_id)
SELECT DISTINCT b.source_key::bigint, (c->>'id')::bigint FROM b, jsonb_array_elements(COALESCE(payload->'categories', '[]')) c;

DELETE FROM crm.product_attribute WHERE product_id IN (SELECT source_key::bigint FROM b);
INSERT INTO crm.product_attribute (product_id, name, position, is_variation, options)
SELECT DISTINCT ON (b.source_key, a->>'name') b.source_key::bigint, a->>'name', COALESCE((a->>'position')::int, 0),
       COALESCE((a->>'variation')::boolean, false),
       CASE WHEN a ? 'options' THEN ARRAY(SELECT jsonb_array_elements_text(a->'options')) ELSE ARRAY[a->>'option'] END
FROM b, jsonb_array_elements(COALESCE(payload->'attributes', '[]')) a;

DELETE FROM crm.product_meta WHERE product_id IN (SELECT source_key::bigint FROM b);
INSERT INTO crm.product_meta (product_id, meta_id, key, value)
SELECT DISTINCT ON (b.source_key, m->>'id') b.source_key::bigint, (m->>'id')::bigint, m->>'key', m->'value'
FROM b, jsonb_array_elements(payload->'meta_data') m WHERE m->>'key' NOT IN ('_course_id');

UPDATE sync.fetch_request f SET fetched_at = clock_timestamp()
FROM b WHERE f.entity = 'products' AND f.source_key = b.source_key AND f.fetched_at IS NULL;
