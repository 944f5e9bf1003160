-- One request budget per store, shared by every process and worker (issue 9, "quiet costs little").
--
-- Kept here, in the CRM database every task, trigger and worker already reaches, rather than in
-- Airflow pools: a pool counts task instances, not requests (a deferred trigger holds no slot, one task
-- may run several requests at once), it has no notion of a rate, and task code in Airflow 3 may not
-- touch the metadata database. A row per (store, lane) is a virtual-time token bucket (GCRA):
-- `next_slot` is the earliest moment the next request may start. A lane is only a name and its limits
-- (live, backfill, fetch, first_load...); the row with lane '*' is the store as a whole, and every
-- request of every lane spends from it too, so the lanes together never exceed it.
CREATE TABLE IF NOT EXISTS sync.store_budget (
    store         text NOT NULL,               -- the shop's URL
    lane          text NOT NULL,               -- '*' = the whole store
    max_rate      float8 NOT NULL CHECK (max_rate > 0),
    rate          float8 NOT NULL CHECK (rate > 0),   -- halved on 429/5xx/slow answers, won back on successes
    max_in_flight integer NOT NULL CHECK (max_in_flight > 0),
    next_slot     timestamptz NOT NULL DEFAULT clock_timestamp(),
    slowed_at     timestamptz,
    requests      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (store, lane)
);

-- Requests in flight: a lease per request, with an expiry, so a process killed mid-request (SIGKILL, a
-- lost worker) frees its slot by itself once the lease runs out.
CREATE TABLE IF NOT EXISTS sync.store_budget_lease (
    lease_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store      text NOT NULL,
    lane       text NOT NULL,
    holder     text NOT NULL,                   -- host:pid, for people looking at a stuck slot
    taken_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS store_budget_lease_store ON sync.store_budget_lease (store, lane);

-- Take one request: returns a lease and how long to wait before sending (0 or more seconds), or no
-- lease and how long to wait before asking again (the in-flight cap of the lane or store is full).
-- One short statement per request; the caller's limits refresh the rows, so an edited connection
-- extra takes effect at the next request.
CREATE OR REPLACE FUNCTION sync.take_store_request(p_store text, p_lane text, p_lane_rate float8,
        p_lane_in_flight integer, p_store_rate float8, p_store_in_flight integer, p_holder text,
        p_lease_seconds float8)
    RETURNS TABLE (lease_id bigint, wait_seconds float8)
    LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz := clock_timestamp();
    whole sync.store_budget;
    one sync.store_budget;
    slot timestamptz;
    lid bigint;
BEGIN
    IF p_lane = '*' THEN
        RAISE EXCEPTION 'lane ''*'' is the whole store, not a lane';
    END IF;
    -- '*' first, then the lane: every caller locks in the same order, so no deadlock.
    INSERT INTO sync.store_budget AS b (store, lane, max_rate, rate, max_in_flight)
    VALUES (p_store, '*', p_store_rate, p_store_rate, p_store_in_flight),
           (p_store, p_lane, p_lane_rate, p_lane_rate, p_lane_in_flight)
    ON CONFLICT (store, lane) DO UPDATE
        SET max_rate = EXCLUDED.max_rate, max_in_flight = EXCLUDED.max_in_flight,
            rate = least(b.rate, EXCLUDED.max_rate)
        WHERE (b.max_rate, b.max_in_flight) IS DISTINCT FROM (EXCLUDED.max_rate, EXCLUDED.max_in_flight);
    SELECT * INTO whole FROM sync.store_budget b WHERE b.store = p_store AND b.lane = '*' FOR UPDATE;
    SELECT * INTO one FROM sync.store_budget b WHERE b.store = p_store AND b.lane = p_lane FOR UPDATE;
    DELETE FROM sync.store_budget_lease l WHERE l.store = p_store AND l.expires_at < now_ts;
    IF (SELECT count(*) FROM sync.store_budget_lease l WHERE l.store = p_store) >= whole.max_in_flight
       OR (SELECT count(*) FROM sync.store_budget_lease l WHERE l.store = p_store AND l.lane = p_lane)
          >= one.max_in_flight THEN
        RETURN QUERY SELECT NULL::bigint, 0.05::float8;
        RETURN;
    END IF;
    slot := greatest(now_ts, whole.next_slot, one.next_slot);
    UPDATE sync.store_budget b
       SET next_slot = slot + make_interval(secs => 1.0 / b.rate), requests = b.requests + 1
     WHERE b.store = p_store AND b.lane IN ('*', p_lane);
    INSERT INTO sync.store_budget_lease (store, lane, holder, expires_at)
    VALUES (p_store, p_lane, p_holder, slot + make_interval(secs => p_lease_seconds))
    RETURNING sync.store_budget_lease.lease_id INTO lid;
    RETURN QUERY SELECT lid, extract(epoch FROM slot - now_ts)::float8;
END $$;

-- Give a request back: its lease ends; 'ok' wins back 5 % of the lane's and the store's rate, 'slow'
-- (a 429, a 5xx, an unreachable store, a latency jump) halves both, at most once a second however many
-- processes saw the same trouble, and never below 0.2 requests/s.
CREATE OR REPLACE FUNCTION sync.release_store_request(p_lease_id bigint, p_store text, p_lane text,
        p_outcome text)
    RETURNS float8
    LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz := clock_timestamp();
    current_rate float8;
BEGIN
    IF p_lease_id IS NOT NULL THEN
        DELETE FROM sync.store_budget_lease WHERE lease_id = p_lease_id;
    END IF;
    IF p_outcome = 'ok' THEN
        UPDATE sync.store_budget b SET rate = least(b.max_rate, b.rate + b.max_rate * 0.05)
         WHERE b.store = p_store AND b.lane IN ('*', p_lane) AND b.rate < b.max_rate;
    ELSIF p_outcome = 'slow' THEN
        UPDATE sync.store_budget b SET rate = greatest(0.2, b.rate / 2), slowed_at = now_ts
         WHERE b.store = p_store AND b.lane IN ('*', p_lane)
           AND (b.slowed_at IS NULL OR b.slowed_at < now_ts - interval '1 second');
    END IF;
    SELECT least(w.rate, l.rate) INTO current_rate FROM sync.store_budget w, sync.store_budget l
     WHERE w.store = p_store AND w.lane = '*' AND l.store = p_store AND l.lane = p_lane;
    RETURN current_rate;
END $$;

-- What people look at: each store's lanes, their rate now, requests in flight and how many were sent.
CREATE OR REPLACE VIEW sync.store_budget_status AS
SELECT b.store, b.lane, b.max_rate, round(b.rate::numeric, 3) AS rate, b.max_in_flight,
       (SELECT count(*) FROM sync.store_budget_lease l
         WHERE l.store = b.store AND (b.lane = '*' OR l.lane = b.lane) AND l.expires_at >= now()) AS in_flight,
       b.requests, b.slowed_at
  FROM sync.store_budget b;
