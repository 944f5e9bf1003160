"""A faithful imitation of a WooCommerce (+ Subscriptions) store's REST API v3, for tests and demos."""
