-- Order notes: status-change notes written by the store, notes typed by staff, notes for the customer.
CREATE TABLE IF NOT EXISTS crm.sales_order_note (
    id bigint PRIMARY KEY, order_id bigint NOT NULL,  -- the store's order id (the order may arrive later)
    author text, note text NOT NULL, is_customer_note boolean NOT NULL, date_created timestamptz NOT NULL,
    deleted_at timestamptz, landed_run_id text NOT NULL, landed_inbox_id bigint NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sales_order_note_order ON crm.sales_order_note (order_id, date_created);
