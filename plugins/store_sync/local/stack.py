"""Run Airflow 3.3 itself on this machine for the demo and the freshness benchmark.

api-server, scheduler, dag-processor and triggerer as separate processes (LocalExecutor), Airflow's
metadata in the embedded PostgreSQL (database ``airflow``), the latency settings measured in
``shared/reference/airflow3-latency.md``, the package's pools, and the DAGs unpaused. Secrets (the
JWT secret, the admin password) are generated into ``.data/airflow`` and never printed to logs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

from store_sync.dag_defaults import POOLS

REPO = Path(__file__).resolve().parents[3]

FAST_REACTION = {
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.1",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
    "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
    "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
}
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


class AirflowStack:
    def __init__(self, home: Path, metadata_url: str, *, port: int = 8080, extra_env: dict[str, str] | None = None):
        self.home, self.metadata_url, self.port = Path(home), metadata_url, port
        self.extra_env = extra_env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.url = f"http://127.0.0.1:{port}"

    def _secret(self, name: str) -> str:
        path = self.home / name
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",  # standalone-style children call `airflow`
            "PYTHONPATH": f"{REPO / 'plugins'}:{REPO}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "16",  # busy watch tasks stay running (stay_while_busy_seconds)
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__SCHEDULER__CREATE_CRON_DATA_INTERVALS": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **FAST_REACTION,
            **self.extra_env,
        }

    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env(), check=check,
                              capture_output=True, text=True, timeout=600)

    def admin_password(self) -> str:
        path = self.home / "passwords.json"
        if not path.exists():
            path.write_text(json.dumps({"admin": secrets.token_urlsafe(12)}))
            path.chmod(0o600)
        return json.loads(path.read_text())["admin"]

    def setup(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.admin_password()
        done = self.airflow("db", "migrate", check=False)
        if done.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{done.stderr[-3000:]}")
        for pool, (slots, description) in POOLS.items():
            self.airflow("pools", "set", pool, str(slots), description)

    def start(self) -> None:
        logs = self.home / "process-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in COMPONENTS:
            log = open(logs / f"{name}.log", "a")  # noqa: SIM115 - lives as long as the process
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", name], env=self.env(),
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{self.url}/api/v2/version", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Airflow did not come up ({', '.join(dead) or 'timeout'}); see {logs}")
            time.sleep(1)

    def stop(self) -> None:
        import signal

        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()

    def reset(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


def metadata_url_for(embedded) -> str:
    """Airflow's metadata database on the embedded PostgreSQL (psycopg 3 driver)."""
    return embedded.dsn("airflow").replace("postgresql://", "postgresql+psycopg://", 1)
