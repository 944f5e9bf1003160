-- Inbox rows a transform step could not apply (the model rejected their content), one row each. They
-- are left out of the batches until re-applied (python -m store_sync.crm.transform --retry-quarantine, the
-- crm_retry_quarantine DAG) or until a newer version of the same record applies.
CREATE TABLE IF NOT EXISTS sync.transform_quarantine (
    quarantine_id bigserial PRIMARY KEY,
    inbox_id      bigint      NOT NULL UNIQUE REFERENCES inbox.record ON DELETE CASCADE,
    entity        text        NOT NULL,
    source_key    text        NOT NULL,
    step          text        NOT NULL,            -- the transform file that failed on it
    sqlstate      text        NOT NULL,
    reason        text        NOT NULL,            -- PostgreSQL's message, detail and hint
    record        jsonb       NOT NULL,            -- the version that failed, as landed
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    attempts      integer     NOT NULL DEFAULT 1,
    resolved_at   timestamptz,
    resolution    text CHECK (resolution IN ('applied', 'superseded')),
    CHECK ((resolved_at IS NULL) = (resolution IS NULL))
);
CREATE INDEX IF NOT EXISTS transform_quarantine_unresolved ON sync.transform_quarantine (entity, source_key)
    WHERE resolved_at IS NULL;

-- What closes a batch (pg_temp.batch_scope) that applied: its rows are applied; quarantined rows in it
-- are resolved; quarantined older versions of its records are moot (the CRM moved past them).
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
              AND CASE WHEN n.payload ? 'deleted' THEN n.inbox_id > old.inbox_id
                       ELSE (COALESCE(n.source_modified_at, '-infinity'), n.inbox_id)
                          > (COALESCE(old.source_modified_at, '-infinity'), old.inbox_id) END)
        RETURNING q.inbox_id)
    UPDATE inbox.record r SET applied_at = clock_timestamp() FROM moot WHERE r.inbox_id = moot.inbox_id;
END $$;

-- Open quarantine rows for people: what failed, why, and which version the CRM shows instead (the
-- newest version that applied; NULL when the record is not in the CRM at all).
CREATE OR REPLACE VIEW sync.transform_quarantine_open AS
SELECT q.quarantine_id, q.entity, q.source_key, q.step, q.inbox_id, r.source_modified_at, q.sqlstate, q.reason,
       q.attempts, q.first_seen_at, q.last_seen_at, held.inbox_id AS crm_version_inbox_id,
       held.source_modified_at AS crm_version_modified_at
FROM sync.transform_quarantine q
JOIN inbox.record r ON r.inbox_id = q.inbox_id
LEFT JOIN LATERAL (
    SELECT a.inbox_id, a.source_modified_at FROM inbox.record a
    WHERE a.entity = q.entity AND a.source_key = q.source_key AND a.applied_at IS NOT NULL AND NOT a.payload ? 'deleted'
    ORDER BY a.source_modified_at DESC NULLS LAST, a.inbox_id DESC LIMIT 1) held ON true
WHERE q.resolved_at IS NULL;
