-- A payload is skipped only when it equals the LATEST landed version of its record, not any earlier
-- one: A -> B -> A must land the second A (a payment gateway re-enabled, a category rename undone).
-- inbox.latest holds that latest version per record; landing upserts it under the row's lock, so two
-- concurrent landings of the same payload still land it once.
CREATE TABLE IF NOT EXISTS inbox.latest (
    entity             text        NOT NULL,
    source_key         text        NOT NULL,
    payload_hash       text        NOT NULL,
    inbox_id           bigint      NOT NULL,
    is_delete          boolean     NOT NULL,
    source_modified_at timestamptz,
    PRIMARY KEY (entity, source_key)
);

INSERT INTO inbox.latest (entity, source_key, payload_hash, inbox_id, is_delete, source_modified_at)
SELECT DISTINCT ON (entity, source_key) entity, source_key, payload_hash, inbox_id, is_delete, source_modified_at
FROM inbox.record ORDER BY entity, source_key, inbox_id DESC
ON CONFLICT DO NOTHING;

ALTER TABLE inbox.record DROP CONSTRAINT IF EXISTS inbox_record_once;
CREATE INDEX IF NOT EXISTS inbox_record_key ON inbox.record (entity, source_key, inbox_id);

-- Deletes obey newest-wins like versions: within a batch a delete event wins only over versions that
-- arrived before it (a record read again after a delete proves it lives: the false delete heals).
CREATE OR REPLACE FUNCTION sync.batch_versions(p_entity text)
RETURNS TABLE (inbox_id bigint, source_key text, source_modified_at timestamptz, gone boolean, payload jsonb,
               run_id text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH s AS (
        SELECT r.inbox_id, r.source_key, r.source_modified_at, (r.payload ? 'deleted') AS gone, r.payload, r.run_id
        FROM inbox.record r JOIN pg_temp.batch_scope bs ON bs.inbox_id = r.inbox_id
        WHERE r.entity = p_entity),
    v AS (SELECT DISTINCT ON (s.source_key) s.*, max(s.inbox_id) OVER (PARTITION BY s.source_key) AS last_seen
          FROM s WHERE NOT s.gone ORDER BY s.source_key, s.source_modified_at DESC NULLS LAST, s.inbox_id DESC),
    d AS (SELECT DISTINCT ON (s.source_key) s.* FROM s WHERE s.gone ORDER BY s.source_key, s.inbox_id DESC)
    SELECT v.inbox_id, v.source_key, v.source_modified_at, v.gone, v.payload, v.run_id FROM v
    WHERE NOT EXISTS (SELECT 1 FROM d WHERE d.source_key = v.source_key AND d.inbox_id > v.last_seen)
    UNION ALL
    SELECT d.inbox_id, d.source_key, d.source_modified_at, d.gone, d.payload, d.run_id FROM d
    WHERE NOT EXISTS (SELECT 1 FROM v WHERE v.source_key = d.source_key AND v.last_seen > d.inbox_id);
END $$;

-- ... and across batches: a delete applies only when it was received after the version the CRM holds.
CREATE OR REPLACE FUNCTION sync.prepare_batch(p_entity text, p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE IF EXISTS pg_temp.b;
    CREATE TEMP TABLE b ON COMMIT DROP AS SELECT * FROM sync.batch_versions(p_entity);
    EXECUTE format('DELETE FROM pg_temp.b USING %s t WHERE NOT b.gone AND t.id = b.source_key::bigint '
                   'AND (t.source_modified_at, t.landed_inbox_id) > (b.source_modified_at, b.inbox_id)', p_table);
    EXECUTE format('UPDATE %s t SET deleted_at = COALESCE(t.deleted_at, clock_timestamp()), landed_run_id = b.run_id, '
                   'landed_inbox_id = b.inbox_id FROM pg_temp.b b WHERE b.gone AND t.id = b.source_key::bigint '
                   'AND t.landed_inbox_id < b.inbox_id', p_table);
    DELETE FROM pg_temp.b WHERE gone;
END $$;

-- Children keyed "<parent>:<child>" (order notes) are looked up by their parent.
CREATE INDEX IF NOT EXISTS inbox_latest_parent ON inbox.latest (entity, split_part(source_key, ':', 1));
