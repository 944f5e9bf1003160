-- The CRM's inboxes (every record received, untouched) and the integration's own bookkeeping.
CREATE SCHEMA IF NOT EXISTS inbox;
CREATE SCHEMA IF NOT EXISTS sync;

CREATE TABLE IF NOT EXISTS inbox.record (
    inbox_id           bigserial PRIMARY KEY,
    entity             text        NOT NULL,
    source_key         text        NOT NULL,               -- the store's id (or code, for lookups)
    source_modified_at timestamptz,                        -- the store's date_modified_gmt, as UTC
    is_delete          boolean     NOT NULL DEFAULT false, -- trashed or gone from the store
    payload            jsonb       NOT NULL,               -- the record exactly as received
    payload_hash       text        NOT NULL,
    received_at        timestamptz NOT NULL DEFAULT clock_timestamp(),  -- when the row was written
    run_id             text        NOT NULL,
    applied_at         timestamptz,                        -- set by the CRM transforms
    CONSTRAINT inbox_record_once UNIQUE (entity, source_key, payload_hash)
);
CREATE INDEX IF NOT EXISTS inbox_record_latest ON inbox.record (entity, source_key, source_modified_at DESC, inbox_id DESC);
CREATE INDEX IF NOT EXISTS inbox_record_unapplied ON inbox.record (entity, inbox_id) WHERE applied_at IS NULL;

CREATE TABLE IF NOT EXISTS sync.watermark (
    entity     text PRIMARY KEY,
    cursor_at  timestamptz,             -- everything modified before this instant has landed
    state      jsonb NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now(),
    run_id     text
);

CREATE TABLE IF NOT EXISTS sync.quarantine (
    quarantine_id bigserial PRIMARY KEY,
    entity        text        NOT NULL,
    source_key    text,
    reason        text        NOT NULL,
    raw           jsonb       NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    run_id        text        NOT NULL
);

CREATE TABLE IF NOT EXISTS sync.landing_run (
    run_id        text        NOT NULL,
    entity        text        NOT NULL,
    mode          text        NOT NULL CHECK (mode IN ('live', 'backfill', 'reconcile', 'on_demand')),
    window_from   timestamptz,
    window_to     timestamptz,
    pages         integer     NOT NULL DEFAULT 0,
    records_read  integer     NOT NULL DEFAULT 0,
    landed        integer     NOT NULL DEFAULT 0,
    skipped       integer     NOT NULL DEFAULT 0,
    quarantined   integer     NOT NULL DEFAULT 0,
    retries       integer     NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    duration_s    numeric GENERATED ALWAYS AS (EXTRACT(EPOCH FROM finished_at - started_at)) STORED,
    status        text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'success', 'failed')),
    error         text,
    PRIMARY KEY (run_id, entity)
);
