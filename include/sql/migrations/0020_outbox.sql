-- The outbox: changes the back office asks the store (or, later, another system) to make.
-- A CRM workflow calls crm.request_*(); the write-back DAG sends what waits, exactly once in effect,
-- and never over a change the store made since the version the request was based on.
CREATE TABLE IF NOT EXISTS sync.outbox (
    request_id          bigserial PRIMARY KEY,
    source_system       text        NOT NULL DEFAULT 'crm',    -- which back office asked (crm, erp)
    requested_by        text        NOT NULL DEFAULT current_user,
    target_system       text        NOT NULL DEFAULT 'store',  -- where the change goes
    entity              text        NOT NULL CHECK (entity IN ('orders', 'subscriptions')),
    record_id           bigint      NOT NULL,                  -- the target's id of the record
    action              text        NOT NULL CHECK (action IN ('set_status', 'create_refund', 'set_next_payment')),
    change              jsonb       NOT NULL,                  -- what to write: {"status": ...}, the refund, the date
    note                text,                                  -- a note to leave on the record, if any
    based_on_modified_at timestamptz,                          -- the CRM's version of the record when asked
    based_on            jsonb,                                 -- the CRM's values of the changed fields then
    state               text        NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'sent', 'applied', 'rejected', 'conflict', 'failed', 'cancelled')),
    attempts            integer     NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    last_error          text,
    store_version       jsonb,                                 -- the store's values when a conflict was found
    result              jsonb,                                 -- what the store answered (ids, dates), never secrets
    store_modified_at   timestamptz,                           -- the record's modified time after the write
    requested_at        timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    finished_at         timestamptz,
    confirmed_at        timestamptz                            -- the change came back through the sync
);
CREATE INDEX IF NOT EXISTS outbox_due ON sync.outbox (target_system, next_attempt_at) WHERE state IN ('pending', 'sent');
CREATE INDEX IF NOT EXISTS outbox_record ON sync.outbox (target_system, entity, record_id, request_id);

-- What happens when the store changed a field after the version a request was based on.
--   conflict   (default) the request waits for a person, holding both versions
--   request_wins  write anyway
--   store_wins    drop the request as superseded (state rejected)
CREATE TABLE IF NOT EXISTS sync.outbox_policy (
    entity text NOT NULL, field text NOT NULL,
    policy text NOT NULL CHECK (policy IN ('conflict', 'request_wins', 'store_wins')),
    PRIMARY KEY (entity, field)
);
INSERT INTO sync.outbox_policy VALUES ('orders', 'status', 'conflict'), ('subscriptions', 'status', 'conflict'),
    ('subscriptions', 'next_payment_date', 'conflict')
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION sync.outbox_enqueue(p_entity text, p_record_id bigint, p_action text, p_change jsonb,
                                               p_note text, p_based_on_modified_at timestamptz, p_based_on jsonb,
                                               p_requested_by text, p_source_system text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO sync.outbox (entity, record_id, action, change, note, based_on_modified_at, based_on, requested_by,
                             source_system)
    VALUES (p_entity, p_record_id, p_action, p_change, NULLIF(btrim(p_note), ''), p_based_on_modified_at, p_based_on,
            COALESCE(p_requested_by, current_user), COALESCE(p_source_system, 'crm'))
    RETURNING request_id INTO v_id;
    -- Wakes the write-back DAG's trigger at once (delivered when this transaction commits).
    PERFORM pg_notify('sync_outbox', v_id::text);
    RETURN v_id;
END $$;

-- Logistic (processing, on-hold, completed, cancelled) and financial (pending, failed, refunded) order statuses.
CREATE OR REPLACE FUNCTION crm.request_order_status(order_id bigint, status text, note text DEFAULT NULL,
                                                    requested_by text DEFAULT NULL, source_system text DEFAULT 'crm')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    o record;
BEGIN
    IF status NOT IN ('pending', 'processing', 'on-hold', 'completed', 'cancelled', 'refunded', 'failed') THEN
        RAISE EXCEPTION 'order status "%" cannot be requested; use one of pending, processing, on-hold, completed, '
                        'cancelled, refunded, failed', status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s.status, s.source_modified_at INTO o FROM crm.sales_order s WHERE s.id = order_id AND s.deleted_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'order % is not in the CRM (or deleted at the store)', order_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN sync.outbox_enqueue('orders', order_id, 'set_status', jsonb_build_object('status', status), note,
                               o.source_modified_at, jsonb_build_object('status', o.status), requested_by, source_system);
END $$;

-- A refund recorded at the store without moving money through the gateway (api_refund=false).
-- line_items: [{"id": <order line id>, "quantity": n, "refund_total": "x.xx"}, ...] or NULL.
CREATE OR REPLACE FUNCTION crm.request_refund(order_id bigint, amount numeric, reason text DEFAULT NULL,
                                              line_items jsonb DEFAULT NULL, requested_by text DEFAULT NULL,
                                              source_system text DEFAULT 'crm')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    o record;
BEGIN
    IF amount IS NULL OR amount <= 0 THEN
        RAISE EXCEPTION 'a refund needs an amount above zero' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s.total, s.source_modified_at INTO o FROM crm.sales_order s WHERE s.id = order_id AND s.deleted_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'order % is not in the CRM (or deleted at the store)', order_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN sync.outbox_enqueue('orders', order_id, 'create_refund',
                               jsonb_strip_nulls(jsonb_build_object('amount', to_char(amount, 'FM999999999999990.00'),
                                                 'reason', reason, 'line_items', line_items, 'api_refund', false)),
                               NULL, o.source_modified_at, jsonb_build_object('total', o.total), requested_by,
                               source_system);
END $$;

-- Subscriptions change status the way the store's own screens do (transition_status: the store's
-- rules apply, and it may refuse).
CREATE OR REPLACE FUNCTION crm.request_subscription_status(subscription_id bigint, status text, note text DEFAULT NULL,
                                                           requested_by text DEFAULT NULL,
                                                           source_system text DEFAULT 'crm')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    IF status NOT IN ('active', 'on-hold', 'pending-cancel', 'cancelled') THEN
        RAISE EXCEPTION 'subscription status "%" cannot be requested; use one of active, on-hold, pending-cancel, '
                        'cancelled', status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT x.status, x.source_modified_at INTO s FROM crm.subscription x WHERE x.id = subscription_id AND x.deleted_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription % is not in the CRM (or deleted at the store)', subscription_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN sync.outbox_enqueue('subscriptions', subscription_id, 'set_status', jsonb_build_object('status', status),
                               note, s.source_modified_at, jsonb_build_object('status', s.status), requested_by,
                               source_system);
END $$;

CREATE OR REPLACE FUNCTION crm.request_subscription_next_payment(subscription_id bigint, next_payment timestamptz,
                                                                 note text DEFAULT NULL, requested_by text DEFAULT NULL,
                                                                 source_system text DEFAULT 'crm')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    IF next_payment IS NULL OR next_payment <= now() THEN
        RAISE EXCEPTION 'the next payment must be in the future' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT x.next_payment_date, x.source_modified_at INTO s FROM crm.subscription x
    WHERE x.id = subscription_id AND x.deleted_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription % is not in the CRM (or deleted at the store)', subscription_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN sync.outbox_enqueue('subscriptions', subscription_id, 'set_next_payment',
                               jsonb_build_object('next_payment_date',
                                                  to_char(next_payment AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')),
                               note, s.source_modified_at,
                               jsonb_build_object('next_payment_date',
                                                  to_char(s.next_payment_date AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')),
                               requested_by, source_system);
END $$;

-- What a data engineer looks at: backlog, age, results, conflicts waiting for a person.
CREATE OR REPLACE VIEW sync.outbox_status AS
SELECT target_system, entity, action, state, count(*) AS requests,
       min(requested_at) FILTER (WHERE state IN ('pending', 'sent')) AS oldest_open_since,
       EXTRACT(EPOCH FROM now() - min(requested_at) FILTER (WHERE state IN ('pending', 'sent')))::int AS oldest_open_age_s,
       count(*) FILTER (WHERE state = 'applied' AND confirmed_at IS NULL) AS applied_not_yet_back,
       max(finished_at) AS last_finished_at
FROM sync.outbox GROUP BY 1, 2, 3, 4;

CREATE OR REPLACE VIEW sync.outbox_conflicts AS
SELECT request_id, entity, record_id, action, change, based_on, based_on_modified_at, store_version,
       last_error, requested_by, source_system, requested_at
FROM sync.outbox WHERE state = 'conflict' ORDER BY request_id;
