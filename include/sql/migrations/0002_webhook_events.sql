-- Store webhooks received by the Airflow api-server plugin: a latency shortcut, never the source of
-- truth (deliveries are coalesced, never retried, and disabled after repeated failures).
CREATE TABLE IF NOT EXISTS sync.webhook_event (
    event_id     bigserial PRIMARY KEY,
    entity       text        NOT NULL,
    source_key   text        NOT NULL,
    topic        text        NOT NULL,
    delivery_id  text,
    received_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS webhook_event_entity ON sync.webhook_event (entity, event_id);
