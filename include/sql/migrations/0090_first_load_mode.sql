-- First loads (a new shop's whole history, read concurrently with their own request budget) show as
-- mode 'first_load' in sync.landing_run, beside live cycles and backfills.
ALTER TABLE sync.landing_run DROP CONSTRAINT IF EXISTS landing_run_mode_check;
ALTER TABLE sync.landing_run ADD CONSTRAINT landing_run_mode_check
    CHECK (mode IN ('live', 'backfill', 'reconcile', 'on_demand', 'first_load'));
