"""CRM -> store: the outbox's write-back, and fetching on demand what the CRM lacks."""
