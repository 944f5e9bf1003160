-- Order notes (keys are "<order id>:<note id>"); a note never changes, it is only added or deleted.
CREATE TEMP TABLE b ON COMMIT DROP AS SELECT * FROM sync.batch_versions('order_notes');
UPDATE crm.sales_order_note n SET deleted_at = COALESCE(n.deleted_at, clock_timestamp()), landed_run_id = b.run_id,
    landed_inbox_id = b.inbox_id
FROM b WHERE b.gone AND n.id = split_part(b.source_key, ':', 2)::bigint AND n.landed_inbox_id < b.inbox_id;
INSERT INTO crm.sales_order_note (id, order_id, author, note, is_customer_note, date_created, deleted_at,
                                  landed_run_id, landed_inbox_id)
SELECT split_part(source_key, ':', 2)::bigint, split_part(source_key, ':', 1)::bigint, payload->>'author',
       crm.html_text(payload->>'note'), COALESCE((payload->>'customer_note')::boolean, false),
       crm.gmt(payload->>'date_created_gmt'), CASE WHEN gone THEN clock_timestamp() END, run_id, inbox_id
FROM b WHERE NOT gone
ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note, author = EXCLUDED.author,
    is_customer_note = EXCLUDED.is_customer_note, landed_run_id = EXCLUDED.landed_run_id,
    landed_inbox_id = EXCLUDED.landed_inbox_id, deleted_at = NULL
WHERE crm.sales_order_note.landed_inbox_id < EXCLUDED.landed_inbox_id;
-- Every field the registry's `mapped` list does not name: kept in the extra table, by path.
SELECT sync.keep_unmapped('order_notes', 'crm.sales_order_note', 'crm.sales_order_note_extra_fields', 'note_id',
                          'split_part(b.source_key, '':'', 2)::bigint');
