"""The chaos bench, short: the whole stack live under changes, bulk edits, every store fault, killed
tasks and two CRM restarts, then the CRM must match the store and the inboxes hold no duplicates.

Minutes of wall clock: Airflow's four processes, two embedded PostgreSQL servers and the sandbox
start (2-4 min on two cores), 1.5 min of chaos, the catch-up, and -- when the live paths leave a
difference -- the safety nets: a safety cycle (max_quiet_seconds, 60 s here) and the customers'
periodic scan (scan_every_minutes, 1.5 here: the webhooks a CRM outage loses are found by it). Up to
about 10 minutes, so it is marked ``slow`` (``pytest -m "not slow"`` leaves it out). The bench brings
its own PostgreSQL servers (it restarts the CRM's), so ``CRM_DATABASE_URL`` does not apply to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("CRM_DATABASE_URL")),
                    reason="the bench brings and restarts its own PostgreSQL: the run on the embedded default covers it")
def test_chaos_short_run_loses_and_doubles_nothing(tmp_path):
    report_file = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items() if k != "CRM_DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chaos.py"), "--minutes", "1.5", "--size", "tiny", "--seed", "7",
         "--rate", "3", "--bulk-every", "20", "--bulk-size", "30", "80", "--kill-every", "15", "25",
         "--pg-restarts", "2", "--stable-seconds", "30", "--quiet-seconds", "60", "--scan-minutes", "1.5",
         "--catch-up-minutes", "14",
         "--json", str(report_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=35 * 60)
    tail = (done.stdout + done.stderr)[-6000:]
    assert report_file.exists(), tail
    report = json.loads(report_file.read_text())
    assert len(report["restarts"]) == 2 and report["kills"], tail
    assert sum(report["bulk_records"].values()) > 0 and report["faults"], tail
    assert report["converged"], tail
    differences = {e: {k: v for k, v in d.items() if isinstance(v, list) and v} for e, d in report["differences"].items()}
    assert not any(differences.values()), f"the CRM differs from the store: {differences}\n{tail}"
    assert not report["duplicates"], tail
    assert done.returncode == 0, tail
