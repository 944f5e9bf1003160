-- The category tree: adjacency list plus a materialised path; orphans and cycles are flagged, not fatal.
CREATE TEMP TABLE b ON COMMIT DROP AS SELECT * FROM sync.batch_versions('product_categories');

-- A delete applies only when received after the version the CRM holds (newest wins, deletes too).
UPDATE crm.product_category c SET deleted_at = COALESCE(c.deleted_at, clock_timestamp()), landed_run_id = b.run_id,
    landed_inbox_id = b.inbox_id
FROM b WHERE b.gone AND c.id = b.source_key::bigint AND c.landed_inbox_id < b.inbox_id;

INSERT INTO crm.product_category (id, source_parent_id, slug, name, description, landed_run_id, landed_inbox_id)
SELECT b.source_key::bigint, NULLIF((payload->>'parent')::bigint, 0), payload->>'slug', crm.html_text(payload->>'name'),
       COALESCE(payload->>'description', ''), b.run_id, b.inbox_id
FROM b WHERE NOT b.gone
ON CONFLICT (id) DO UPDATE SET source_parent_id = EXCLUDED.source_parent_id, slug = EXCLUDED.slug, name = EXCLUDED.name,
    description = EXCLUDED.description, landed_run_id = EXCLUDED.landed_run_id, deleted_at = NULL,
    landed_inbox_id = EXCLUDED.landed_inbox_id
WHERE crm.product_category.landed_inbox_id <= EXCLUDED.landed_inbox_id;
-- Every field the registry's `mapped` list does not name: kept in the extra table, by path.
SELECT sync.keep_unmapped('product_categories', 'crm.product_category', 'crm.product_category_extra_fields', 'category_id');

-- A parent the CRM lacks or the store deleted makes an orphan: it hangs from the root, flagged.
UPDATE crm.product_category c
SET parent_id = CASE WHEN EXISTS (SELECT 1 FROM crm.product_category p WHERE p.id = c.source_parent_id)
                     THEN c.source_parent_id END,
    is_orphan = c.source_parent_id IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM crm.product_category p WHERE p.id = c.source_parent_id AND p.deleted_at IS NULL);


-- Paths from the roots down; a cycle stops at the first repeated id and keeps what it had.
WITH RECURSIVE tree AS (
    SELECT id, slug::text AS path, 0 AS depth, ARRAY[id] AS seen
    FROM crm.product_category WHERE parent_id IS NULL OR is_orphan
    UNION ALL
    SELECT c.id, t.path || '/' || c.slug, t.depth + 1, t.seen || c.id
    FROM crm.product_category c JOIN tree t ON c.parent_id = t.id AND NOT c.is_orphan
    WHERE NOT c.id = ANY(t.seen)
)
UPDATE crm.product_category c SET path = t.path, depth = t.depth FROM tree t WHERE t.id = c.id
  AND (c.path, c.depth) IS DISTINCT FROM (t.path, t.depth);
