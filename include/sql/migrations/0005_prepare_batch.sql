-- What every entity transform does first: take the batch's newest versions (temp table b), drop those
-- older than what the CRM already has, soft-delete the records the store no longer has.
CREATE OR REPLACE FUNCTION sync.prepare_batch(p_entity text, p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TABLE IF EXISTS pg_temp.b;
    CREATE TEMP TABLE b ON COMMIT DROP AS SELECT * FROM sync.batch_versions(p_entity);
    EXECUTE format('DELETE FROM pg_temp.b USING %s t WHERE NOT b.gone AND t.id = b.source_key::bigint '
                   'AND (t.source_modified_at, t.landed_inbox_id) > (b.source_modified_at, b.inbox_id)', p_table);
    EXECUTE format('UPDATE %s t SET deleted_at = COALESCE(t.deleted_at, clock_timestamp()), landed_run_id = b.run_id, '
                   'landed_inbox_id = b.inbox_id FROM pg_temp.b b WHERE b.gone AND t.id = b.source_key::bigint', p_table);
    DELETE FROM pg_temp.b WHERE gone;
END $$;
