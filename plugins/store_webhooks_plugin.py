"""Airflow plugin: mounts the store-webhook receiver on the api-server at /store-webhooks."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from store_sync.inbound.webhook_receiver import create_app


class StoreWebhooksPlugin(AirflowPlugin):
    name = "store_webhooks"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/store-webhooks", "name": "Store webhooks"}]
