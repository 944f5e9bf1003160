-- The CRM keeps what it receives: every field of a record the mapping does not name (the registry's
-- `mapped:` list) is kept in the entity's extra table, by its path from the record's root.
--
-- The rule: a field the mapping names is mapped, with all below it; a field on the way to a mapped field
-- (`billing`, `line_items`, `line_items[]`) is walked into when it is the object or array the mapping
-- expects; any other field is kept whole as JSON (`images`, `dimensions`, `_links`,
-- `line_items[0].parent_name`). Array elements are named by their position: `line_items[0]`.
-- Children are replaced with their document: the newest version's extras replace the older ones.
CREATE TABLE IF NOT EXISTS crm.customer_extra (
    customer_id bigint NOT NULL REFERENCES crm.customer ON DELETE CASCADE, path text NOT NULL, value jsonb,
    PRIMARY KEY (customer_id, path));
CREATE TABLE IF NOT EXISTS crm.product_extra (
    product_id bigint NOT NULL REFERENCES crm.product ON DELETE CASCADE, path text NOT NULL, value jsonb,
    PRIMARY KEY (product_id, path));
CREATE TABLE IF NOT EXISTS crm.product_category_extra (
    category_id bigint NOT NULL REFERENCES crm.product_category ON DELETE CASCADE, path text NOT NULL, value jsonb,
    PRIMARY KEY (category_id, path));
CREATE TABLE IF NOT EXISTS crm.sales_order_extra (
    order_id bigint NOT NULL REFERENCES crm.sales_order ON DELETE CASCADE, path text NOT NULL, value jsonb,
    PRIMARY KEY (order_id, path));
CREATE TABLE IF NOT EXISTS crm.refund_extra (
    refund_id bigint NOT NULL REFERENCES crm.refund ON DELETE CASCADE, path text NOT NULL, value jsonb,
    PRIMARY KEY (refund_id, path));
CREATE TABLE IF NOT EXISTS crm.subscription_extra (
    subscription_id bigint NOT NULL REFERENCES crm.subscription ON DELETE CASCADE, path text NOT NULL, value jsonb,
    PRIMARY KEY (subscription_id, path));
CREATE TABLE IF NOT EXISTS crm.sales_order_note_extra (
    note_id bigint NOT NULL REFERENCES crm.sales_order_note ON DELETE CASCADE, path text NOT NULL, value jsonb,
    PRIMARY KEY (note_id, path));

-- After an entity's upsert: for the records of the batch (pg_temp.b) whose version the CRM now holds
-- (t.landed_inbox_id = b.inbox_id: newest wins, as for the other children), replace their extras with
-- what the mapping leaves. pg_temp.field_map (entity, pattern, what) comes from the registry (the
-- transform runner fills it per batch): what = 'column' (mapped), 'object' / 'array' (walk into it).
-- p_id: the SQL that turns b.source_key into the parent's id.
CREATE OR REPLACE FUNCTION sync.keep_unmapped(p_entity text, p_table regclass, p_extra regclass, p_fk text,
                                              p_id text DEFAULT 'b.source_key::bigint') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE IF EXISTS pg_temp.unmapped_won;
    EXECUTE format('CREATE TEMP TABLE unmapped_won ON COMMIT DROP AS SELECT DISTINCT ON (t.id) t.id, b.payload '
                   'FROM pg_temp.b b JOIN %s t ON t.id = %s AND t.landed_inbox_id = b.inbox_id WHERE NOT b.gone '
                   'ORDER BY t.id', p_table, p_id);
    EXECUTE format('DELETE FROM %s x USING pg_temp.unmapped_won w WHERE x.%I = w.id', p_extra, p_fk);
    EXECUTE format($q$
        WITH RECURSIVE f AS (SELECT pattern, what FROM pg_temp.field_map WHERE entity = %L),
        walk (id, pattern, path, value, what) AS (
            SELECT w.id, e.key, e.key, e.value, f.what
            FROM pg_temp.unmapped_won w CROSS JOIN LATERAL jsonb_each(w.payload) e LEFT JOIN f ON f.pattern = e.key
            UNION ALL
            SELECT w.id, w.pattern || c.pattern, w.path || c.path, c.value, f.what
            FROM walk w CROSS JOIN LATERAL (
                SELECT '.' || e.key, '.' || e.key, e.value
                FROM jsonb_each(CASE WHEN w.what = 'object' AND jsonb_typeof(w.value) = 'object' THEN w.value
                                     ELSE '{}' END) e
                UNION ALL
                SELECT '[]', '[' || (a.n - 1) || ']', a.value
                FROM jsonb_array_elements(CASE WHEN w.what = 'array' AND jsonb_typeof(w.value) = 'array' THEN w.value
                                               ELSE '[]' END) WITH ORDINALITY a(value, n)
            ) c(pattern, path, value)
            LEFT JOIN f ON f.pattern = w.pattern || c.pattern)
        INSERT INTO %s (%I, path, value)
        SELECT id, path, value FROM walk
        WHERE what IS NULL OR (what = 'object' AND jsonb_typeof(value) <> 'object')
           OR (what = 'array' AND jsonb_typeof(value) <> 'array')$q$, p_entity, p_extra, p_fk);
END $$;
