"""
### Watch the store and land each change in the CRM inbox

One DAG per registry entity that changes over time (`store_watch_orders`, `…_customers`, …).
Each run is one task, `land_changes`: it **waits** like a deferrable sensor (the polling happens in
the triggerer, on a small async trigger, and holds no worker slot), then **lands** the window since
the watermark untouched in `inbox.record`, moving the watermark in the same transaction, and
applies the CRM transform for what it landed when that is a small batch (`live_apply_max_rows`, 500);
a larger batch, or one a running transform kept waiting, is announced through the Asset
`crm_inbox_<entity>` (added to the alias `crm_inbox_<entity>_pending`) so `crm_transform` applies it.
While the store keeps changing, the task keeps landing (`stay_while_busy_seconds`). When the store already
has changes as the run starts, it lands at once without deferring. The DAG is `@continuous` with one
active run: the next wait starts as soon as a landing ends.

*Why this design*: measured here (`bench/freshness.py`; README), a continuous DAG waiting on a
deferrable trigger reacts fastest among the Airflow 3.3 designs on this machine; separate sensor and
land tasks cost an extra task hop per change, and handing over between DAGs through an Asset adds
about a second and a longer tail (`shared/reference/airflow3-latency.md`).

*Triage*: a failed landing leaves the watermark where it was; clearing the task resumes it. What each
landing did is in `sync.landing_run`; rejected records with their reason are in `sync.quarantine`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import AssetAlias, dag

from store_sync.dag_defaults import DEFAULT_ARGS, LIVE_POOL, Tag, inbox_alias_name
from store_sync.operators import LandStoreChangesOperator
from store_sync.registry import entities


def build(name: str):
    @dag(dag_id=f"store_watch_{name}", schedule="@continuous", start_date=datetime(2026, 1, 1), catchup=False,
         max_active_runs=1, default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.INBOX, Tag.LIVE], doc_md=__doc__)
    def watch():
        LandStoreChangesOperator(task_id="land_changes", entity=name, pool=LIVE_POOL,
                                 outlets=[AssetAlias(inbox_alias_name(name))])

    return watch()


for _name, _spec in entities().items():
    if _spec.strategy in ("modified_window", "id_scan"):
        globals()[f"store_watch_{_name}"] = build(_name)
