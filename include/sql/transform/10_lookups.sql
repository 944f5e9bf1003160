-- Code lists from their snapshots: statuses, gateways, countries and states, tax classes.
CREATE TEMP TABLE b_countries ON COMMIT DROP AS SELECT * FROM sync.batch_versions('countries') WHERE NOT gone;
INSERT INTO crm.country (iso2, name)
SELECT source_key, crm.html_text(payload->>'name') FROM b_countries
ON CONFLICT (iso2) DO UPDATE SET name = EXCLUDED.name;
INSERT INTO crm.country_state (country_iso2, code, name)
SELECT b.source_key, s->>'code', crm.html_text(s->>'name')
FROM b_countries b, jsonb_array_elements(b.payload->'states') s
ON CONFLICT (country_iso2, code) DO UPDATE SET name = EXCLUDED.name;

INSERT INTO crm.payment_method (code, title, method_title, enabled)
SELECT source_key, crm.html_text(payload->>'title'), crm.html_text(payload->>'method_title'), (payload->>'enabled')::boolean
FROM sync.batch_versions('payment_gateways') WHERE NOT gone
ON CONFLICT (code) DO UPDATE SET title = EXCLUDED.title, method_title = EXCLUDED.method_title, enabled = EXCLUDED.enabled;

-- The store's standard class is "standard" here and "" on products and lines: one code, "standard".
INSERT INTO crm.tax_class (slug, name)
SELECT COALESCE(NULLIF(source_key, ''), 'standard'), crm.html_text(payload->>'name')
FROM sync.batch_versions('tax_classes') WHERE NOT gone
ON CONFLICT (slug) DO UPDATE SET name = EXCLUDED.name;

INSERT INTO crm.subscription_status (code, label)
SELECT regexp_replace(source_key, '^wc-', ''), crm.html_text(payload->>'name')
FROM sync.batch_versions('subscription_statuses') WHERE NOT gone
ON CONFLICT (code) DO UPDATE SET label = EXCLUDED.label;
