-- Wake the change triggers when the store shows signs of life: a webhook delivery recorded here sends
-- NOTIFY store_activity (at commit; one per statement), which every StoreChangeTrigger polling slowly
-- listens for. Landings that land changes send the same notification (triggers.note_change).
CREATE OR REPLACE FUNCTION sync.notify_store_activity() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('store_activity', TG_TABLE_NAME);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS webhook_event_wakes_triggers ON sync.webhook_event;
CREATE TRIGGER webhook_event_wakes_triggers AFTER INSERT ON sync.webhook_event
    FOR EACH STATEMENT EXECUTE FUNCTION sync.notify_store_activity();
