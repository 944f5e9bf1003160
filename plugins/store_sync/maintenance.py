"""Keep Airflow's metadata database flat under the ``@continuous`` DAGs.

Every cycle of a watch DAG leaves a DAG run, its task instances, asset events, an XCom and log rows;
at one cycle every few seconds that is a few hundred thousand rows a day with nothing to remove them.
Airflow ships the tool (``airflow db clean``, ``airflow/utils/db_cleanup.py``: deletes in batches,
cascades from ``dag_run`` to its task instances, keeps the last scheduled run of each DAG); what it
needs is a schedule.

Why a DAG that runs the CLI, and not the cleanup inside task code: Airflow 3 keeps task code away from
the metadata database (the Task SDK talks to the API server; ``shared/reference/airflow3.md`` 1.17),
so the task starts ``airflow db clean`` as a separate program with the worker's own Airflow
configuration. That works where the workers have the metadata database's settings (LocalExecutor, the
package's docker-compose); where they do not (a locked-down Celery or Kubernetes worker), run the same
command from cron on the scheduler's host instead, e.g. hourly::

    airflow db clean --clean-before-timestamp "$(date -u -d '-1 day' '+%Y-%m-%d %H:%M:%S+00:00')" \\
        --tables dag_run,task_instance,task_instance_history,xcom,log,job,asset_event \\
        --skip-archive --yes --batch-size 5000

Airflow 3.3's ``--dag-ids`` fails on the tables without a ``dag_id`` column (``asset_event`` has
``source_dag_id``; ``deadline``, a dependent of ``dag_run``): "no such column: base.dag_id", logged
as a warning and the table skipped. So the package's DAGs are cleaned in two calls: the per-DAG
tables by DAG id, then asset events by age alone.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

# The tables the continuous DAGs grow; dag_run deletes cascade to task instances and XComs.
BY_DAG = ("dag_run", "task_instance", "task_instance_history", "xcom", "log", "job")
BY_AGE = ("asset_event",)  # no dag_id column: by age alone (unused triggers Airflow removes itself)
# Skipped by `db clean --dag-ids` in Airflow 3.3 (see above); their rows go with their dag_run anyway.
NO_DAG_COLUMN = {"deadline", "asset_event"}
NOT_CLEANED = re.compile(r"tables were not cleaned due to errors: \[([^\]]*)\]")
PACKAGE_TAG = "store-sync"


def package_dag_ids(dag_folder: Path | None = None) -> list[str]:
    """The DAGs of this package (tagged ``store-sync``), parsed from the DAG folder (no metadata DB)."""
    from airflow.dag_processing.dagbag import DagBag

    folder = dag_folder or Path(__file__).resolve().parents[2] / "dags"
    bag = DagBag(dag_folder=str(folder))
    return sorted(d for d, dag in bag.dags.items() if PACKAGE_TAG in (dag.tags or ()))


def clean_command(cutoff: datetime, tables, dag_ids: list[str] | None, dry_run: bool = False,
                  batch_size: int = 5000) -> list[str]:
    cmd = [sys.executable, "-m", "airflow", "db", "clean", "--clean-before-timestamp", cutoff.isoformat(),
           "--tables", ",".join(tables), "--skip-archive", "--yes", "--batch-size", str(batch_size)]
    if dag_ids:
        cmd += ["--dag-ids", ",".join(dag_ids)]
    if dry_run:
        cmd.append("--dry-run")
    return cmd


def clean_metadata(keep_hours: float, *, run_started: datetime | None = None, all_dags: bool = False,
                   dry_run: bool = False) -> dict:
    """Delete the metadata rows older than ``keep_hours`` of the package's DAGs (or of every DAG).

    The cutoff never reaches the running DAG run itself (a ``keep_hours`` of 0 in a test or by hand)."""
    now = datetime.now(UTC)
    cutoff = now - timedelta(hours=float(keep_hours))
    if run_started is not None:
        cutoff = min(cutoff, run_started - timedelta(seconds=1))
    dag_ids = None if all_dags else package_dag_ids()
    log.info("cleaning Airflow's metadata rows before %s (%s)", cutoff.isoformat(),
             "every DAG" if all_dags else f"{len(dag_ids)} DAGs of the package")
    _run(clean_command(cutoff, BY_DAG, dag_ids, dry_run=dry_run), tolerated=NO_DAG_COLUMN if dag_ids else set())
    _run(clean_command(cutoff, BY_AGE, None, dry_run=dry_run), tolerated=set())
    return {"cutoff": cutoff.isoformat(), "dags": len(dag_ids) if dag_ids else "all", "dry_run": dry_run}


def _run(cmd: list[str], tolerated: set[str]) -> None:
    log.info("%s", " ".join(cmd[1:]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=3600)
    output = done.stdout + done.stderr
    for line in output.splitlines():
        if line.strip():
            log.info("db clean: %s", line)
    failed = {t.strip().strip("'\"") for m in NOT_CLEANED.finditer(output) for t in m.group(1).split(",")} - {""}
    if done.returncode != 0 or failed - tolerated:
        raise RuntimeError(
            f"`airflow db clean` failed (exit {done.returncode}; tables not cleaned: {sorted(failed) or 'none'}): "
            f"{(done.stderr or done.stdout).strip()[-600:]}. It needs the metadata database's settings "
            "([database] sql_alchemy_conn) on the worker; where workers do not have them, schedule the same "
            "command on the scheduler's host (store_sync/maintenance.py)")
