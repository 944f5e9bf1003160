-- Which session applies a record when a step runs sessions side by side (crm/transform.py,
-- transform_sessions): its buyer for orders (the customer, else the billing email), so two sessions
-- rarely write the same contact or queue the same customer at once: such a row, inserted by one
-- session's open batch, makes the other wait for that whole batch (measured: two sessions by order id
-- ran 1.1x one). Any other entity: its own key. The caller takes the value of a record's newest version,
-- so all its versions go to one session.
CREATE OR REPLACE FUNCTION sync.partition_key(p_entity text, p_source_key text, p_payload jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_entity
        WHEN 'orders' THEN COALESCE('c' || NULLIF(NULLIF(p_payload->>'customer_id', ''), '0'),
                                    'e' || NULLIF(lower(btrim(p_payload->'billing'->>'email')), ''), p_source_key)
        ELSE p_source_key END
$$;
