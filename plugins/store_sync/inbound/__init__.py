"""Store -> CRM: change detection, landing in the inboxes, backfills, the webhook receiver."""
