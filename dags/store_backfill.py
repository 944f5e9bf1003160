"""
### Backfill: re-read a window or a list of records from the store

Trigger it from the Airflow UI with the form: pick the **entity**, a window **since** / **until**
(UTC; `until` empty means now), or a list of **ids** to refresh, and the **chunk size**. The
window is read in bounded chunks beside live sync: the live watermark does not move, nothing already
landed is landed twice, and a killed run resumes at its first unfinished chunk when cleared.
`plan` cuts the window into chunks; `backfill` is mapped over them (one task instance per chunk,
at most 256, on any worker), so with the CeleryExecutor the chunks spread over the workers.
`plan`'s log says how many records the window holds; progress is the mapped tasks done of all (the grid
view), each one's log has its records/s; counts per chunk are in `sync.landing_run`. Backfills use the `store_api_backfill` pool (its slots are how many
chunks run at once) and a smaller request budget than live sync.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, task

from store_sync.dag_defaults import BACKFILL_POOL, DEFAULT_ARGS, Tag
from store_sync.registry import entities

ENTITIES = sorted(entities())
# format="date-time" drives the UI's date picker; the pattern makes validation refuse other text.
DATE_TIME = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$"


@dag(dag_id="store_backfill", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     default_args=DEFAULT_ARGS, tags=[Tag.SYNC, Tag.BACKFILL], doc_md=__doc__,
     params={
         "entity": Param("orders", type="string", enum=ENTITIES, title="Entity"),
         "since": Param(None, type=["null", "string"], format="date-time", pattern=DATE_TIME, title="Since (UTC)",
                        description="Start of the window, e.g. 2026-01-01T00:00:00Z"),
         "until": Param(None, type=["null", "string"], format="date-time", pattern=DATE_TIME, title="Until (UTC)",
                        description="End of the window; empty means now"),
         "ids": Param([], type="array", items={"type": "integer", "minimum": 1}, title="Ids",
                      description="Records to refresh instead of a window"),
         "chunk_hours": Param(24, type="integer", minimum=1, maximum=24 * 31, title="Chunk size (hours)"),
     })
def store_backfill():
    @task(pool=BACKFILL_POOL)
    def plan(params=None) -> list[dict]:
        from store_sync.tasks import plan_backfill

        return plan_backfill(dict(params))

    # The map index shows the chunk's window in the UI instead of a bare number.
    @task(pool=BACKFILL_POOL, map_index_template="{{ backfill_chunk }}")
    def backfill(part: dict, dag_run=None) -> dict:
        from airflow.sdk import get_current_context

        from store_sync.tasks import backfill_slice

        get_current_context()["backfill_chunk"] = part["label"]
        return backfill_slice(part, dag_run.run_id)

    backfill.expand(part=plan())


store_backfill()
