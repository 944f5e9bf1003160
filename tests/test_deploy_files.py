"""docker-compose.yml and airflow.cfg.example: parsed and checked (no Docker engine runs here)."""

from __future__ import annotations

import configparser
import re

import yaml

from tests.helpers import REPO

AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-init"}


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_airflow_33_layout_plus_crm_and_sandbox():
    services = compose()["services"]
    assert AIRFLOW_SERVICES | {"redis", "airflow-db", "crm-db", "sandbox-store"} <= set(services)
    commands = {name: services[name].get("command") for name in AIRFLOW_SERVICES - {"airflow-init"}}
    assert commands == {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                        "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                        "airflow-worker": "celery worker"}


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
