-- The CRM in third normal form. Every row keeps its source id, the source modified time and the
-- landing run it came from; rows are soft-deleted (deleted_at), never removed, when the store deletes.
CREATE SCHEMA IF NOT EXISTS crm;

-- Text as a person reads it: the store sends HTML entities (Amap&aacute;, &ndash;).
CREATE OR REPLACE FUNCTION crm.html_text(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN t IS NULL OR position('&' IN t) = 0 THEN t ELSE (
        SELECT string_agg(CASE
                 WHEN m[4] IS NOT NULL THEN m[4]
                 WHEN m[2] IS NOT NULL THEN chr(m[2]::int)
                 WHEN m[3] IS NOT NULL THEN chr(('x' || lpad(m[3], 8, '0'))::bit(32)::int)
                 ELSE COALESCE((SELECT c FROM (VALUES
                        ('amp','&'),('lt','<'),('gt','>'),('quot','"'),('apos',''''),('nbsp',' '),('ndash','–'),
                        ('mdash','—'),('euro','€'),('pound','£'),('aacute','á'),('eacute','é'),('iacute','í'),
                        ('oacute','ó'),('uacute','ú'),('ntilde','ñ'),('Aacute','Á'),('Eacute','É'),('Iacute','Í'),
                        ('Oacute','Ó'),('Uacute','Ú'),('Ntilde','Ñ'),('atilde','ã'),('otilde','õ'),('ccedil','ç'),
                        ('uuml','ü'),('ouml','ö'),('auml','ä'),('rsquo','’'),('lsquo','‘'),('hellip','…'))
                        AS e(name, c) WHERE e.name = m[1]), '&' || m[1] || ';')
               END, '' ORDER BY n)
        FROM regexp_matches(t, '&(?:([A-Za-z]+)|#([0-9]+)|#[xX]([0-9A-Fa-f]+));|([^&]+|&)', 'g') WITH ORDINALITY AS r(m, n)
        ) END
$$;

-- Money arrives as strings; empty means unknown.
CREATE OR REPLACE FUNCTION crm.money(t text) RETURNS numeric LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN t IS NULL OR btrim(t) = '' THEN NULL ELSE t::numeric END
$$;

-- GMT strings without offset ('' for unset subscription dates) to timestamptz.
CREATE OR REPLACE FUNCTION crm.gmt(t text) RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN t IS NULL OR t = '' THEN NULL ELSE (replace(t, 'T', ' ') || '+00')::timestamptz END
$$;

-- Code lists -------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS crm.order_status (
    code text PRIMARY KEY, label text NOT NULL, is_paid boolean NOT NULL DEFAULT false,
    is_final boolean NOT NULL DEFAULT false
);
INSERT INTO crm.order_status (code, label, is_paid, is_final) VALUES
    ('pending', 'Pending payment', false, false), ('processing', 'Processing', true, false),
    ('on-hold', 'On hold', false, false), ('completed', 'Completed', true, true),
    ('cancelled', 'Cancelled', false, true), ('refunded', 'Refunded', false, true),
    ('failed', 'Failed', false, true), ('checkout-draft', 'Draft', false, false), ('trash', 'Trash', false, true)
ON CONFLICT (code) DO NOTHING;

CREATE TABLE IF NOT EXISTS crm.subscription_status (code text PRIMARY KEY, label text NOT NULL);
INSERT INTO crm.subscription_status VALUES ('trash', 'Trash') ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS crm.payment_method (
    code text PRIMARY KEY, title text NOT NULL, method_title text, enabled boolean
);
CREATE TABLE IF NOT EXISTS crm.country (iso2 char(2) PRIMARY KEY, name text NOT NULL);
CREATE TABLE IF NOT EXISTS crm.country_state (
    country_iso2 char(2) NOT NULL REFERENCES crm.country, code text NOT NULL, name text NOT NULL,
    PRIMARY KEY (country_iso2, code)
);
CREATE TABLE IF NOT EXISTS crm.tax_class (slug text PRIMARY KEY, name text NOT NULL);
INSERT INTO crm.tax_class VALUES ('standard', 'Standard rate') ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS crm.currency (code char(3) PRIMARY KEY CHECK (code ~ '^[A-Z]{3}$'));

-- Catalogue --------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS crm.product_category (
    id bigint PRIMARY KEY, parent_id bigint REFERENCES crm.product_category DEFERRABLE INITIALLY DEFERRED,
    source_parent_id bigint,                -- the parent the store names, even one the CRM lacks
    slug text NOT NULL UNIQUE, name text NOT NULL, description text NOT NULL DEFAULT '',
    path text NOT NULL DEFAULT '',          -- materialised: 'courses/programming/python'
    depth integer NOT NULL DEFAULT 0, is_orphan boolean NOT NULL DEFAULT false,
    deleted_at timestamptz, landed_run_id text NOT NULL,
    landed_inbox_id bigint NOT NULL DEFAULT 0, CHECK (parent_id IS DISTINCT FROM id)
);
CREATE TABLE IF NOT EXISTS crm.product (
    id bigint PRIMARY KEY, parent_id bigint,  -- a variation's product (the store's own id)
    type text NOT NULL, name text NOT NULL, slug text, sku text, status text NOT NULL,
    price numeric(14, 4), regular_price numeric(14, 4), sale_price numeric(14, 4),
    tax_class text REFERENCES crm.tax_class, virtual boolean, downloadable boolean,
    stock_quantity integer, stock_status text, course_id bigint,
    date_created timestamptz, source_modified_at timestamptz NOT NULL, deleted_at timestamptz,
    landed_run_id text NOT NULL, landed_inbox_id bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS crm.product_category_link (
    product_id bigint NOT NULL REFERENCES crm.product ON DELETE CASCADE,
    category_id bigint NOT NULL,  -- the store's category id (the category may arrive later)
    PRIMARY KEY (product_id, category_id)
);
CREATE TABLE IF NOT EXISTS crm.product_attribute (
    product_id bigint NOT NULL REFERENCES crm.product ON DELETE CASCADE, name text NOT NULL,
    position integer NOT NULL, is_variation boolean NOT NULL, options text[] NOT NULL,
    PRIMARY KEY (product_id, name)
);
CREATE TABLE IF NOT EXISTS crm.product_meta (
    product_id bigint NOT NULL REFERENCES crm.product ON DELETE CASCADE, meta_id bigint NOT NULL,
    key text NOT NULL, value jsonb, PRIMARY KEY (product_id, meta_id)
);

-- People ----------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS crm.customer (
    id bigint PRIMARY KEY, email text NOT NULL, first_name text, last_name text, username text,
    role text NOT NULL, is_paying boolean NOT NULL DEFAULT false, preferred_language text,
    date_created timestamptz, source_modified_at timestamptz, deleted_at timestamptz, landed_run_id text NOT NULL,
    landed_inbox_id bigint NOT NULL DEFAULT 0  -- orders same-second versions as they were received
);
CREATE TABLE IF NOT EXISTS crm.customer_address (
    customer_id bigint NOT NULL REFERENCES crm.customer ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('billing', 'shipping')),
    first_name text, last_name text, company text, address_1 text, address_2 text, city text,
    state_code text, postcode text, country_iso2 char(2) REFERENCES crm.country, email text, phone text,
    PRIMARY KEY (customer_id, kind)
);
CREATE TABLE IF NOT EXISTS crm.customer_meta (
    customer_id bigint NOT NULL REFERENCES crm.customer ON DELETE CASCADE, meta_id bigint NOT NULL,
    key text NOT NULL, value jsonb, PRIMARY KEY (customer_id, meta_id)
);
-- Everyone who bought, registered or not, once, by normalised email.
CREATE TABLE IF NOT EXISTS crm.contact (
    contact_id bigserial PRIMARY KEY, email_norm text NOT NULL UNIQUE CHECK (email_norm = lower(btrim(email_norm))),
    first_name text, last_name text, customer_id bigint REFERENCES crm.customer,
    first_seen_at timestamptz NOT NULL DEFAULT now()
);

-- Orders ----------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS crm.sales_order (
    id bigint PRIMARY KEY, number text NOT NULL, status text NOT NULL REFERENCES crm.order_status,
    currency char(3) NOT NULL REFERENCES crm.currency,
    customer_id bigint,                       -- the store's customer id; NULL for guests
    contact_id bigint REFERENCES crm.contact,
    payment_method text REFERENCES crm.payment_method, payment_method_title text, transaction_id text,
    created_via text, prices_include_tax boolean NOT NULL, customer_note text,
    discount_total numeric(14, 4) NOT NULL, discount_tax numeric(14, 4) NOT NULL,
    shipping_total numeric(14, 4) NOT NULL, shipping_tax numeric(14, 4) NOT NULL,
    cart_tax numeric(14, 4) NOT NULL, total numeric(14, 4) NOT NULL, total_tax numeric(14, 4) NOT NULL,
    date_created timestamptz NOT NULL, date_paid timestamptz, date_completed timestamptz,
    downloads_granted boolean, attribution_source text,
    source_modified_at timestamptz NOT NULL, deleted_at timestamptz, landed_run_id text NOT NULL,
    landed_inbox_id bigint NOT NULL DEFAULT 0  -- orders same-second versions as they were received
);
CREATE INDEX IF NOT EXISTS sales_order_customer ON crm.sales_order (customer_id);
CREATE TABLE IF NOT EXISTS crm.sales_order_address (
    order_id bigint NOT NULL REFERENCES crm.sales_order ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('billing', 'shipping')),
    first_name text, last_name text, company text, address_1 text, address_2 text, city text,
    state_code text, postcode text, country_iso2 char(2) REFERENCES crm.country, email text, phone text,
    PRIMARY KEY (order_id, kind)
);
CREATE TABLE IF NOT EXISTS crm.sales_order_line (
    id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES crm.sales_order ON DELETE CASCADE,
    product_id bigint, variation_id bigint,   -- the store's ids (the product may arrive later)
    name text NOT NULL, sku text, quantity numeric NOT NULL, tax_class text REFERENCES crm.tax_class,
    subtotal numeric(14, 4) NOT NULL, subtotal_tax numeric(14, 4) NOT NULL,
    total numeric(14, 4) NOT NULL, total_tax numeric(14, 4) NOT NULL
);
CREATE INDEX IF NOT EXISTS sales_order_line_order ON crm.sales_order_line (order_id);
CREATE TABLE IF NOT EXISTS crm.sales_order_line_tax (
    line_id bigint NOT NULL REFERENCES crm.sales_order_line ON DELETE CASCADE, rate_id bigint NOT NULL,
    total numeric(14, 6) NOT NULL, subtotal numeric(14, 6), PRIMARY KEY (line_id, rate_id)
);
CREATE TABLE IF NOT EXISTS crm.sales_order_line_meta (
    line_id bigint NOT NULL REFERENCES crm.sales_order_line ON DELETE CASCADE, meta_id bigint NOT NULL,
    key text NOT NULL, value jsonb, PRIMARY KEY (line_id, meta_id)
);
CREATE TABLE IF NOT EXISTS crm.sales_order_tax (
    id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES crm.sales_order ON DELETE CASCADE,
    rate_code text NOT NULL, rate_id bigint, label text, compound boolean NOT NULL,
    tax_total numeric(14, 4) NOT NULL, shipping_tax_total numeric(14, 4) NOT NULL, rate_percent numeric
);
CREATE TABLE IF NOT EXISTS crm.sales_order_shipping (
    id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES crm.sales_order ON DELETE CASCADE,
    method_id text, method_title text NOT NULL, instance_id text, total numeric(14, 4) NOT NULL,
    total_tax numeric(14, 4) NOT NULL
);
CREATE TABLE IF NOT EXISTS crm.sales_order_fee (
    id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES crm.sales_order ON DELETE CASCADE,
    name text NOT NULL, tax_class text, tax_status text, total numeric(14, 4) NOT NULL,
    total_tax numeric(14, 4) NOT NULL
);
CREATE TABLE IF NOT EXISTS crm.sales_order_coupon (
    id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES crm.sales_order ON DELETE CASCADE,
    code text NOT NULL, discount numeric(14, 4) NOT NULL, discount_tax numeric(14, 4) NOT NULL,
    discount_type text, nominal_amount numeric
);
CREATE TABLE IF NOT EXISTS crm.sales_order_meta (
    order_id bigint NOT NULL REFERENCES crm.sales_order ON DELETE CASCADE, meta_id bigint NOT NULL,
    key text NOT NULL, value jsonb, PRIMARY KEY (order_id, meta_id)
);
CREATE TABLE IF NOT EXISTS crm.shipment (  -- the _tracking meta, promoted
    order_id bigint PRIMARY KEY REFERENCES crm.sales_order ON DELETE CASCADE, carrier text, tracking_number text
);

CREATE TABLE IF NOT EXISTS crm.refund (
    id bigint PRIMARY KEY, order_id bigint NOT NULL,  -- the store's order id (the order may arrive later)
    amount numeric(14, 4) NOT NULL CHECK (amount >= 0), reason text, refunded_by bigint,
    refunded_payment boolean, date_created timestamptz NOT NULL,
    source_modified_at timestamptz, deleted_at timestamptz, landed_run_id text NOT NULL,
    landed_inbox_id bigint NOT NULL DEFAULT 0  -- orders same-second versions as they were received
);
CREATE TABLE IF NOT EXISTS crm.refund_line (
    id bigint PRIMARY KEY, refund_id bigint NOT NULL REFERENCES crm.refund ON DELETE CASCADE,
    product_id bigint, variation_id bigint, name text, quantity numeric NOT NULL,
    total numeric(14, 4) NOT NULL, total_tax numeric(14, 4)
);

-- Subscriptions ---------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS crm.subscription (
    id bigint PRIMARY KEY, status text NOT NULL REFERENCES crm.subscription_status,
    customer_id bigint, currency char(3) NOT NULL REFERENCES crm.currency,
    billing_period text NOT NULL CHECK (billing_period IN ('day', 'week', 'month', 'year')),
    billing_interval integer NOT NULL CHECK (billing_interval > 0),
    payment_method text REFERENCES crm.payment_method, total numeric(14, 4) NOT NULL,
    start_date timestamptz, trial_end_date timestamptz, next_payment_date timestamptz,
    last_payment_date timestamptz, cancelled_date timestamptz, end_date timestamptz,
    stripe_customer_id text, date_created timestamptz NOT NULL,
    source_modified_at timestamptz NOT NULL, deleted_at timestamptz, landed_run_id text NOT NULL,
    landed_inbox_id bigint NOT NULL DEFAULT 0  -- orders same-second versions as they were received
);
CREATE TABLE IF NOT EXISTS crm.subscription_line (
    id bigint PRIMARY KEY, subscription_id bigint NOT NULL REFERENCES crm.subscription ON DELETE CASCADE,
    product_id bigint, variation_id bigint, name text NOT NULL, quantity numeric NOT NULL,
    total numeric(14, 4) NOT NULL, total_tax numeric(14, 4) NOT NULL
);
CREATE TABLE IF NOT EXISTS crm.subscription_meta (
    subscription_id bigint NOT NULL REFERENCES crm.subscription ON DELETE CASCADE, meta_id bigint NOT NULL,
    key text NOT NULL, value jsonb, PRIMARY KEY (subscription_id, meta_id)
);
-- Which orders belong to which subscription: parent (the first order), renewals, switches.
CREATE TABLE IF NOT EXISTS crm.subscription_order (
    subscription_id bigint NOT NULL, order_id bigint NOT NULL,
    relation text NOT NULL CHECK (relation IN ('parent', 'renewal', 'switch')),
    PRIMARY KEY (subscription_id, order_id)
);

-- Records the CRM references but has not received yet: a queue for fetching on demand.
CREATE TABLE IF NOT EXISTS sync.fetch_request (
    entity text NOT NULL, source_key text NOT NULL, reason text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(), fetched_at timestamptz,
    PRIMARY KEY (entity, source_key)
);

-- The batch a transform works on: the newest version per record among the inbox rows in scope
-- (pg_temp.batch_scope, filled by the runner). A "gone" record (hard delete) wins over versions.
CREATE OR REPLACE FUNCTION sync.batch_versions(p_entity text)
RETURNS TABLE (inbox_id bigint, source_key text, source_modified_at timestamptz, gone boolean, payload jsonb,
               run_id text)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT DISTINCT ON (r.source_key) r.inbox_id, r.source_key, r.source_modified_at, (r.payload ? 'deleted'),
           r.payload, r.run_id
    FROM inbox.record r JOIN pg_temp.batch_scope s ON s.inbox_id = r.inbox_id
    WHERE r.entity = p_entity
    ORDER BY r.source_key, (r.payload ? 'deleted') DESC, r.source_modified_at DESC NULLS LAST, r.inbox_id DESC;
END $$;

-- A meta value by key from a meta_data array.
CREATE OR REPLACE FUNCTION crm.meta(meta jsonb, k text) RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_path_query_first(meta, '$[*] ? (@.key == $k).value', jsonb_build_object('k', k))
$$;
