"""docker-compose.yml and airflow.cfg.example: parsed and checked (no Docker engine runs here)."""

from __future__ import annotations

import ast
import configparser
import re
import shlex

import yaml

from store_sync.dag_defaults import POOLS
from tests.helpers import REPO

WORKERS = {"airflow-worker-1", "airflow-worker-2"}
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-init"} | WORKERS


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_airflow_33_layout_plus_crm_and_sandbox():
    services = compose()["services"]
    assert AIRFLOW_SERVICES | {"redis", "airflow-db", "crm-db", "sandbox-store"} <= set(services)
    commands = {name: services[name].get("command") for name in AIRFLOW_SERVICES - {"airflow-init"}}
    assert commands == {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                        "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                        **dict.fromkeys(WORKERS, "celery worker")}


def test_compose_runs_the_celery_executor_with_two_workers_redis_and_results_in_postgres():
    services = compose()["services"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://") and "@redis:" in env["AIRFLOW__CELERY__BROKER_URL"]
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
        assert "@airflow-db/" in env["AIRFLOW__CELERY__RESULT_BACKEND"]
    # Two workers that tell themselves apart (Celery's node name and the task instances' hostname).
    assert len({services[n]["hostname"] for n in WORKERS}) == 2
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name


def test_compose_creates_every_pool_the_dags_use():
    command = compose()["services"]["airflow-init"]["command"]
    script = command[-1] if isinstance(command, list) else command
    pools = {}
    for step in script.split("&&"):
        words = shlex.split(step)
        if words[:3] == ["airflow", "pools", "set"]:
            pools[words[3]] = (int(words[4]), words[5])
    assert pools == POOLS


def test_compose_image_installs_requirements_txt():
    common = compose()["x-airflow-common"]
    assert common["build"] == "."
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.\d+-python3\.11$", text, re.M)
    assert re.search(r"^COPY requirements\.txt ", text, re.M) and re.search(r"pip install .*-r \S*requirements\.txt", text)
    # Every Airflow service runs that image (the sandbox store too), not the bare official one.
    for name, service in compose()["services"].items():
        if name in AIRFLOW_SERVICES | {"sandbox-store"}:
            assert service["image"] == common["image"] and "build" in service, name


def test_requirements_txt_holds_every_package_the_dags_and_the_package_import():
    import sys
    from importlib.metadata import packages_distributions

    pinned = {re.split(r"[=<>\[ ]", line)[0].lower().replace("_", "-")
              for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")}
    own = {"store_sync", "sandbox", "tests"} | {p.stem for p in (REPO / "dags").glob("*.py")}
    owners = packages_distributions()
    missing = set()
    for folder in ("dags", "plugins", "sandbox", "include"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} - own - set(sys.stdlib_module_names):
                    dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
                    if not dists & pinned:
                        missing.add(f"{path.relative_to(REPO)}: {top} ({', '.join(sorted(dists)) or 'not installed'})")
    assert not missing, f"imported but not pinned in requirements.txt: {sorted(missing)}"


def test_every_image_is_pinned():
    for name, service in compose()["services"].items():
        image = service.get("image", "")
        assert re.search(r":\d+(\.\d+)+", image), f"{name} uses an unpinned image {image!r}"
        assert not image.endswith(":latest")


def test_airflow_containers_share_one_jwt_secret_and_execution_api():
    services = compose()["services"]
    secrets = {services[n]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] for n in AIRFLOW_SERVICES}
    assert len(secrets) == 1
    urls = {services[n]["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] for n in AIRFLOW_SERVICES}
    assert urls == {"http://airflow-apiserver:8080/execution/"}
    assert "airflow-apiserver" in services and services["airflow-apiserver"]["ports"] == ["8080:8080"]


def test_airflow_containers_mount_dags_plugins_include_and_get_both_connections():
    services = compose()["services"]
    for name in AIRFLOW_SERVICES:
        mounts = {v.split(":")[1] for v in services[name]["volumes"] if ":" in v}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/include"} <= mounts, name
        env = services[name]["environment"]
        assert "AIRFLOW_CONN_STORE_API" in env and "AIRFLOW_CONN_CRM_DB" in env
        assert "crm-db" in env["AIRFLOW_CONN_CRM_DB"] and "sandbox-store" in env["AIRFLOW_CONN_STORE_API"]


def test_no_secret_literal_in_compose():
    text = (REPO / "docker-compose.yml").read_text()
    for line in text.splitlines():
        if re.search(r"(PASSWORD|SECRET)\s*:", line) and "airflow" not in line.lower():
            assert "${" in line, f"secret without an env indirection: {line.strip()}"


def test_airflow_cfg_example_parses_and_sets_the_fast_reaction_settings():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "airflow.cfg.example")
    assert cfg.getboolean("core", "load_examples") is False
    assert cfg.getfloat("scheduler", "scheduler_idle_sleep_time") <= 0.2
    assert cfg.getint("dag_processor", "min_file_process_interval") <= 10
    assert cfg.getboolean("scheduler", "create_cron_data_intervals") is False
    assert not cfg.has_option("api_auth", "jwt_secret"), "the JWT secret belongs in the environment"
    for section in cfg.sections():
        for key, _ in cfg.items(section):
            assert key.startswith(tuple("abcdefghijklmnopqrstuvwxyz_")), key
    # Every key must be one Airflow 3.3 knows.
    from airflow.configuration import conf

    known = conf.configuration_description
    for section in cfg.sections():
        for key in cfg[section]:
            assert key in known.get(section, {}).get("options", {}), f"[{section}] {key} is not an Airflow 3.3 setting"
