-- Webhook events: each delivery recorded once, bad ids kept aside, old consumed events prunable.

-- A delivery id is wp_hash(webhook id . time()) in whole seconds (class-wc-webhook.php,
-- get_new_delivery_id): two records sent by one webhook within the same second share it. So a
-- delivery is (delivery id, record), not the delivery id alone. Copies already recorded go first.
DELETE FROM sync.webhook_event a USING sync.webhook_event b
 WHERE a.delivery_id = b.delivery_id AND a.entity = b.entity AND a.source_key = b.source_key
   AND a.event_id > b.event_id;
CREATE UNIQUE INDEX IF NOT EXISTS webhook_event_delivery_once
    ON sync.webhook_event (delivery_id, entity, source_key) WHERE delivery_id IS NOT NULL;

-- Events recorded before the receiver checked ids: a key that is no store id (the customer scan casts
-- it to bigint) goes to the quarantine with the reason, out of the scan's way.
INSERT INTO sync.quarantine (entity, source_key, reason, raw, run_id)
SELECT entity, source_key, 'webhook ' || topic || ': the record id is not a positive integer',
       jsonb_build_object('id', source_key, 'topic', topic, 'delivery_id', delivery_id, 'received_at', received_at),
       'webhook:' || coalesce(delivery_id, event_id::text)
  FROM sync.webhook_event WHERE source_key !~ '^[1-9][0-9]{0,17}$';
DELETE FROM sync.webhook_event WHERE source_key !~ '^[1-9][0-9]{0,17}$';

CREATE INDEX IF NOT EXISTS webhook_event_received ON sync.webhook_event (received_at);
