-- The transforms, fast: each batch's documents are read uncompressed, text decoding and the unmapped
-- fields cost nothing per row where there is nothing to do, and a record's unmapped fields are one row.

-- A batch's newest versions (pg_temp.b) as before, but held decompressed and inline: every statement of a
-- transform reads the same documents, and a compressed jsonb is decompressed again by each `->`
-- (measured: 20x slower key lookups). `payload - '{}'::text[]` returns the detoasted document unchanged;
-- toast_tuple_target keeps documents up to 8 kB from being compressed again.
CREATE OR REPLACE FUNCTION sync.prepare_batch(p_entity text, p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE IF EXISTS pg_temp.b;
    CREATE TEMP TABLE b (inbox_id bigint, source_key text, source_modified_at timestamptz, gone boolean, payload jsonb,
                         run_id text) WITH (toast_tuple_target = 8160) ON COMMIT DROP;
    -- sync.batch_versions (0006) inlined, choosing among keys only: its RETURN QUERY (and a sort carrying
    -- the documents) would spill every document to disk first.
    INSERT INTO pg_temp.b
    WITH s AS (
        SELECT r.inbox_id, r.source_key, r.source_modified_at, (r.payload ? 'deleted') AS gone, r.run_id
        FROM inbox.record r JOIN pg_temp.batch_scope bs ON bs.inbox_id = r.inbox_id
        WHERE r.entity = p_entity),
    v AS (SELECT DISTINCT ON (s.source_key) s.*, max(s.inbox_id) OVER (PARTITION BY s.source_key) AS last_seen
          FROM s WHERE NOT s.gone ORDER BY s.source_key, s.source_modified_at DESC NULLS LAST, s.inbox_id DESC),
    d AS (SELECT DISTINCT ON (s.source_key) s.* FROM s WHERE s.gone ORDER BY s.source_key, s.inbox_id DESC),
    won AS (
        SELECT v.inbox_id, v.source_key, v.source_modified_at, v.gone, v.run_id FROM v
        WHERE NOT EXISTS (SELECT 1 FROM d WHERE d.source_key = v.source_key AND d.inbox_id > v.last_seen)
        UNION ALL
        SELECT d.inbox_id, d.source_key, d.source_modified_at, d.gone, d.run_id FROM d
        WHERE NOT EXISTS (SELECT 1 FROM v WHERE v.source_key = d.source_key AND v.last_seen > d.inbox_id))
    SELECT w.inbox_id, w.source_key, w.source_modified_at, w.gone, r.payload - '{}'::text[], w.run_id
    FROM won w JOIN inbox.record r ON r.inbox_id = w.inbox_id;
    EXECUTE format('DELETE FROM pg_temp.b USING %s t WHERE NOT b.gone AND t.id = b.source_key::bigint '
                   'AND (t.source_modified_at, t.landed_inbox_id) > (b.source_modified_at, b.inbox_id)', p_table);
    EXECUTE format('UPDATE %s t SET deleted_at = COALESCE(t.deleted_at, clock_timestamp()), landed_run_id = b.run_id, '
                   'landed_inbox_id = b.inbox_id FROM pg_temp.b b WHERE b.gone AND t.id = b.source_key::bigint '
                   'AND t.landed_inbox_id < b.inbox_id', p_table);
    DELETE FROM pg_temp.b WHERE gone;
    -- Without statistics the planner guesses joins on b badly (a sort of every document per join).
    ANALYZE pg_temp.b (inbox_id, source_key);
END $$;

-- Text as a person reads it: most text has no entity at all, and then it is returned as is by an
-- expression the planner inlines; only text with an '&' pays for the decoding.
CREATE OR REPLACE FUNCTION crm.html_decode(t text) RETURNS text LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
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

CREATE OR REPLACE FUNCTION crm.html_text(t text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN strpos(t, '&') > 0 THEN crm.html_decode(t) ELSE t END
$$;

-- A record's unmapped fields, one row per record: {path: value} in `fields` (the rule of 0009 is
-- unchanged). One row instead of ~30 per order (their index and foreign key checks were most of the
-- transform's time); the views keep the names and the (id, path, value) rows people query.
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT * FROM (VALUES ('customer_extra', 'customer_id', 'customer'), ('product_extra', 'product_id', 'product'),
                                   ('product_category_extra', 'category_id', 'product_category'),
                                   ('sales_order_extra', 'order_id', 'sales_order'), ('refund_extra', 'refund_id', 'refund'),
                                   ('subscription_extra', 'subscription_id', 'subscription'),
                                   ('sales_order_note_extra', 'note_id', 'sales_order_note')) v(extra, fk, parent) LOOP
        EXECUTE format('CREATE TABLE IF NOT EXISTS crm.%I (%I bigint PRIMARY KEY REFERENCES crm.%I ON DELETE CASCADE, '
                       'fields jsonb NOT NULL)', r.extra || '_fields', r.fk, r.parent);
        IF EXISTS (SELECT 1 FROM pg_class WHERE oid = format('crm.%I', r.extra)::regclass AND relkind = 'r') THEN
            EXECUTE format('INSERT INTO crm.%I SELECT %I, jsonb_object_agg(path, value) FROM crm.%I GROUP BY 1',
                           r.extra || '_fields', r.fk, r.extra);
            EXECUTE format('DROP TABLE crm.%I', r.extra);
        END IF;
        EXECUTE format('CREATE OR REPLACE VIEW crm.%I AS SELECT x.%I, f.key AS path, f.value FROM crm.%I x, '
                       'jsonb_each(x.fields) f', r.extra, r.fk, r.extra || '_fields');
        EXECUTE format('COMMENT ON VIEW crm.%I IS %L', r.extra,
                       'the fields of a record the mapping does not name, by path; stored in ' || r.extra || '_fields');
    END LOOP;
END $$;

-- The direct children of a pattern in the field map: (key, what), '' being the root.
CREATE OR REPLACE FUNCTION sync.field_map_children(p_entity text, p_pattern text)
RETURNS TABLE (key text, pattern text, what text) LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    SELECT substr(f.pattern, length(p_pattern) + CASE WHEN p_pattern = '' THEN 1 ELSE 2 END), f.pattern, f.what
    FROM pg_temp.field_map f
    WHERE f.entity = p_entity
      AND CASE WHEN p_pattern = '' THEN f.pattern !~ '[.]|\[\]$'
               ELSE left(f.pattern, length(p_pattern) + 1) = p_pattern || '.'
                    AND substr(f.pattern, length(p_pattern) + 2) !~ '[.]|\[\]$' END
    ORDER BY f.pattern;
END $$;

-- SQL listing what the mapping leaves below one node of a record, as (path, value) rows: per object its
-- fields the mapping does not name (jsonb `-` takes the named ones off at once), per array its elements
-- by position, each array expanded once. A node with nothing left costs no set-returning call.
-- p_value: the SQL of the node's value; p_path: the SQL of its path. NULL when nothing can be left.
CREATE OR REPLACE FUNCTION sync.unmapped_below(p_entity text, p_pattern text, p_kind text, p_value text,
                                               p_path text, p_depth int DEFAULT 0) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    parts text[] := '{}';
    kid record;
    cols text[];
    walked text;
    elem_kind text;
    alias text := 'a' || p_depth;
    elem text;
    inner_sql text;
    guard text := '';
BEGIN
    IF p_kind = 'object' THEN
        SELECT COALESCE(array_agg(c.key) FILTER (WHERE c.what = 'column'), '{}'),
               'CASE x.key ' || string_agg(format('WHEN %L THEN %L', c.key, c.what), ' ')
                   FILTER (WHERE c.what IN ('object', 'array')) || ' END'
        INTO cols, walked FROM sync.field_map_children(p_entity, p_pattern) c;
        -- a field the mapping walks into is kept whole when it is not the object or array expected
        parts := parts || format(
            'SELECT %s || ''.'' || x.key, x.value FROM jsonb_each(CASE WHEN jsonb_typeof(%s) = ''object'' '
            'THEN NULLIF(%s - %L::text[], ''{}'') END) x WHERE jsonb_typeof(x.value) IS DISTINCT FROM %s',
            p_path, p_value, p_value, cols, COALESCE(walked, 'NULL'));
        FOR kid IN SELECT * FROM sync.field_map_children(p_entity, p_pattern) c WHERE c.what IN ('object', 'array') LOOP
            parts := parts || sync.unmapped_below(p_entity, kid.pattern, kid.what, format('(%s -> %L)', p_value, kid.key),
                                                  format('%s || %L', p_path, '.' || kid.key), p_depth + 1);
        END LOOP;
    ELSE  -- an array: its elements by position
        elem := format('%s || ''['' || (%s.n - 1) || '']''', p_path, alias);
        SELECT f.what INTO elem_kind FROM pg_temp.field_map f WHERE f.entity = p_entity AND f.pattern = p_pattern || '[]';
        IF elem_kind IS NULL THEN  -- elements the mapping does not name: kept whole
            inner_sql := format('SELECT %s, %s.v', elem, alias);
        ELSIF elem_kind = 'object' THEN
            inner_sql := format('SELECT %s, %s.v WHERE jsonb_typeof(%s.v) <> ''object''', elem, alias, alias)
                || ' UNION ALL ' || sync.unmapped_below(p_entity, p_pattern || '[]', 'object', alias || '.v', elem, p_depth + 1);
            -- elements whose fields are all named columns (meta_data, taxes): one jsonpath test skips the array
            IF NOT EXISTS (SELECT 1 FROM sync.field_map_children(p_entity, p_pattern || '[]') c WHERE c.what <> 'column') THEN
                guard := format(' AND jsonb_path_exists(%s, %L)', p_value, format(
                    '$[*] ? (@.type() != "object" || exists(@.keyvalue() ? (!(%s))))',
                    (SELECT COALESCE(string_agg(format('@.key == %s', to_json(c.key)), ' || '), 'false')
                     FROM sync.field_map_children(p_entity, p_pattern || '[]') c)));
            END IF;
        ELSIF elem_kind = 'array' THEN
            inner_sql := format('SELECT %s, %s.v WHERE jsonb_typeof(%s.v) <> ''array''', elem, alias, alias)
                || COALESCE(' UNION ALL ' || sync.unmapped_below(p_entity, p_pattern || '[]', 'array', alias || '.v', elem,
                                                                 p_depth + 1), '');
        ELSE
            RETURN NULL;  -- an array mapped as a column
        END IF;
        parts := parts || format(
            'SELECT s.path, s.value FROM jsonb_array_elements(CASE WHEN jsonb_typeof(%s) = ''array''%s THEN %s END) '
            'WITH ORDINALITY %s(v, n) CROSS JOIN LATERAL (%s) s(path, value)', p_value, guard, p_value, alias, inner_sql);
    END IF;
    RETURN array_to_string(parts, ' UNION ALL ');
END $$;

-- SQL of a record's unmapped fields as one jsonb object {path: value}: the root's fields the mapping does
-- not name taken off the record at once, the deeper ones gathered by path.
CREATE OR REPLACE FUNCTION sync.unmapped_sql(p_entity text, p_value text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    root text;
    deeper text[] := '{}';
    kid record;
BEGIN
    SELECT format('(%s - (%L::text[] || array_remove(ARRAY[%s]::text[], NULL)))', p_value,
                  COALESCE(array_agg(c.key) FILTER (WHERE c.what = 'column'), '{}'),
                  COALESCE(string_agg(format('CASE WHEN jsonb_typeof(%s -> %L) = %L THEN %L END', p_value, c.key, c.what,
                                             c.key), ', ') FILTER (WHERE c.what IN ('object', 'array')), ''))
    INTO root FROM sync.field_map_children(p_entity, '') c;
    FOR kid IN SELECT * FROM sync.field_map_children(p_entity, '') c WHERE c.what IN ('object', 'array') LOOP
        deeper := deeper || sync.unmapped_below(p_entity, kid.pattern, kid.what, format('(%s -> %L)', p_value, kid.key),
                                                quote_literal(kid.key));
    END LOOP;
    IF cardinality(deeper) = 0 THEN
        RETURN root;
    END IF;
    RETURN format('%s || COALESCE((SELECT jsonb_object_agg(u.path, u.value) FROM (%s) u(path, value)), ''{}'')',
                  root, array_to_string(deeper, ' UNION ALL '));
END $$;

-- After an entity's upsert: for the records of the batch (pg_temp.b) whose version the CRM now holds,
-- replace their unmapped fields with what this version leaves (newest wins, as for the other children).
-- p_extra: the entity's *_extra_fields table; p_id: the SQL that turns b.source_key into the parent's id.
-- The query is written once per batch from pg_temp.field_map (the registry's `mapped` lists).
CREATE OR REPLACE FUNCTION sync.keep_unmapped(p_entity text, p_table regclass, p_extra regclass, p_fk text,
                                              p_id text DEFAULT 'b.source_key::bigint') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE IF EXISTS pg_temp.unmapped_won;
    EXECUTE format('CREATE TEMP TABLE unmapped_won ON COMMIT DROP AS SELECT DISTINCT ON (t.id) t.id, b.inbox_id, '
                   'EXISTS (SELECT 1 FROM %2$s x WHERE x.%1$I = t.id) AS had '
                   'FROM pg_temp.b b JOIN %3$s t ON t.id = %4$s AND t.landed_inbox_id = b.inbox_id WHERE NOT b.gone '
                   'ORDER BY t.id', p_fk, p_extra, p_table, p_id);
    ANALYZE pg_temp.unmapped_won;
    IF EXISTS (SELECT 1 FROM pg_temp.unmapped_won WHERE had) THEN  -- records new to the CRM have nothing to replace
        EXECUTE format('DELETE FROM %s x USING pg_temp.unmapped_won w WHERE w.had AND x.%I = w.id', p_extra, p_fk);
    END IF;
    EXECUTE format('INSERT INTO %s (%I, fields) SELECT w.id, u.fields FROM pg_temp.unmapped_won w '
                   'JOIN pg_temp.b b USING (inbox_id) CROSS JOIN LATERAL (SELECT %s AS fields OFFSET 0) u WHERE u.fields <> ''{}''',
                   p_extra, p_fk, sync.unmapped_sql(p_entity, 'b.payload'));
END $$;

-- An order and its parts (addresses, lines, their taxes and meta, tax/shipping/fee/coupon lines, meta,
-- shipment, unmapped fields) are written only by the orders transform, from the order's own document, in
-- the transaction that upserts the order right after adding the codes (status, currency, gateway,
-- country, tax class) and contacts the batch uses: their references hold by construction, and checking
-- them row by row (an index probe per reference, ~15 per order) was about a third of the transform. On
-- PostgreSQL 18+ those references stay declared (for people and tools reading the schema) but NOT
-- ENFORCED, so nothing cascades either (the CRM never removes an order: deletes are soft); the CRM checks
-- `order_parts_have_their_order` and `orders_use_known_codes` verify them set-based after every
-- transform run. References from other tables (refunds, subscriptions, contacts) stay enforced.
DO $$
DECLARE r record;
BEGIN
    IF current_setting('server_version_num')::int < 180000 THEN
        RETURN;
    END IF;
    FOR r IN SELECT c.conrelid::regclass AS tab, c.conname FROM pg_constraint c
             WHERE c.contype = 'f' AND c.conenforced
               AND c.conrelid IN ('crm.sales_order'::regclass, 'crm.sales_order_address'::regclass,
                                  'crm.sales_order_line'::regclass, 'crm.sales_order_line_tax'::regclass,
                                  'crm.sales_order_line_meta'::regclass, 'crm.sales_order_tax'::regclass,
                                  'crm.sales_order_shipping'::regclass, 'crm.sales_order_fee'::regclass,
                                  'crm.sales_order_coupon'::regclass, 'crm.sales_order_meta'::regclass,
                                  'crm.shipment'::regclass, 'crm.sales_order_extra_fields'::regclass) LOOP
        EXECUTE format('ALTER TABLE %s ALTER CONSTRAINT %I NOT ENFORCED', r.tab, r.conname);
    END LOOP;
END $$;
