-- A batch's deletes, told apart without opening every document: a store's delete lands with is_delete
-- (landing.py), so only those rows (and trashed ones, also is_delete) are asked whether they are the
-- store's "deleted" answer. `payload ? 'deleted'` alone decompressed every document of the batch (about
-- a seventh of an orders batch), and took a live record with a top-level field named "deleted" for a
-- delete; the other readers of the inbox already ask both (`l.is_delete AND r.payload ? 'deleted'`).
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
        SELECT r.inbox_id, r.source_key, r.source_modified_at, (r.is_delete AND r.payload ? 'deleted') AS gone, r.run_id
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

-- As in 0008, telling a delete the same way.
CREATE OR REPLACE FUNCTION sync.finish_batch() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE inbox.record r SET applied_at = clock_timestamp() FROM pg_temp.batch_scope s WHERE r.inbox_id = s.inbox_id;
    IF NOT EXISTS (SELECT 1 FROM sync.transform_quarantine WHERE resolved_at IS NULL) THEN
        RETURN;  -- the usual case: nothing more to do
    END IF;
    UPDATE sync.transform_quarantine q SET resolved_at = clock_timestamp(), resolution = 'applied'
    FROM pg_temp.batch_scope s WHERE q.inbox_id = s.inbox_id AND q.resolved_at IS NULL;
    -- Newer is what the transforms call newer: later source time, then later arrival; a delete event
    -- wins over versions received before it.
    WITH moot AS (
        UPDATE sync.transform_quarantine q SET resolved_at = clock_timestamp(), resolution = 'superseded'
        FROM inbox.record old
        WHERE q.resolved_at IS NULL AND old.inbox_id = q.inbox_id AND EXISTS (
            SELECT 1 FROM pg_temp.batch_scope s JOIN inbox.record n ON n.inbox_id = s.inbox_id
            WHERE n.entity = q.entity AND n.source_key = q.source_key
              AND CASE WHEN n.is_delete AND n.payload ? 'deleted' THEN n.inbox_id > old.inbox_id
                       ELSE (COALESCE(n.source_modified_at, '-infinity'), n.inbox_id)
                          > (COALESCE(old.source_modified_at, '-infinity'), old.inbox_id) END)
        RETURNING q.inbox_id)
    UPDATE inbox.record r SET applied_at = clock_timestamp() FROM moot WHERE r.inbox_id = moot.inbox_id;
END $$;
