"""docker-compose.yml checked against the code (no Docker engine runs on these machines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from service.cli import app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in env.items()} if isinstance(env, dict) else dict(
        e.split("=", 1) for e in env)


def test_every_flywheel_variable_exists_in_settings():
    fields = {f"FLYWHEEL_{name.upper()}" for name in Settings.model_fields}
    for name, service in SERVICES.items():
        for var in _env(service):
            if var.startswith("FLYWHEEL_"):
                assert var in fields, f"{name} sets {var}, which Settings does not have"


def test_every_flywheel_command_exists_in_the_cli():
    cli = get_command(app)
    for name, service in SERVICES.items():
        command = service.get("command") or []
        if not command or command[0] != "flywheel":
            continue
        words = [w for w in command[1:] if not w.startswith("-")]
        group = cli.commands.get(words[0])
        assert group is not None, f"{name}: `flywheel {words[0]}` does not exist"
        path = [words[0]]
        for word in words[1:]:  # into sub-commands (`flywheel models prepare`)
            if word not in getattr(group, "commands", {}):
                break
            group = group.commands[word]
            path.append(word)
        assert not getattr(group, "commands", None), f"{name}: `flywheel {' '.join(path)}` needs a sub-command"
        options = {o for p in group.params for o in getattr(p, "opts", [])}
        for flag in (w for w in command[1:] if w.startswith("--")):
            assert flag in options, f"{name}: `flywheel {' '.join(path)}` has no option {flag}"


def test_celery_commands_point_at_the_real_app_and_queue():
    from service.wakeup import TRAINING_QUEUE

    worker = SERVICES["worker"]["command"]
    assert worker[:4] == ["celery", "-A", "workers.celery_app", "worker"]
    assert worker[worker.index("-Q") + 1] == TRAINING_QUEUE
    assert worker[worker.index("--concurrency") + 1] == "1"
    assert SERVICES["beat"]["command"][:4] == ["celery", "-A", "workers.celery_app", "beat"]


def _port_of(url: str) -> tuple[str, int]:
    m = re.match(r"\w[\w+]*://(?:[^@/]*@)?([\w.-]+):(\d+)", url)
    assert m, url
    return m.group(1), int(m.group(2))


def test_urls_point_at_services_and_ports_that_exist():
    env = _env(SERVICES["api"])
    host, port = _port_of(env["FLYWHEEL_DATABASE_URL"])
    assert host == "postgres" and port == 5432
    host, port = _port_of(env["FLYWHEEL_BROKER_URL"])
    assert host == "redis" and port == 6379
    host, port = _port_of(env["FLYWHEEL_VLLM_URLS"])
    assert host == "vllm"
    vllm_cmd = SERVICES["vllm"]["command"]
    assert vllm_cmd[vllm_cmd.index("--port") + 1] == str(port)
    gpu_cmd = SERVICES["vllm-gpu"]["command"]
    assert gpu_cmd[gpu_cmd.index("--port") + 1] == str(port)
    assert "vllm" in SERVICES["vllm-gpu"]["networks"]["default"]["aliases"]
    api_cmd = SERVICES["api"]["command"]
    api_port = api_cmd[api_cmd.index("--port") + 1]
    assert f"{api_port}:{api_port}" in SERVICES["api"]["ports"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for s in job["static_configs"] for t in s["targets"]}
    assert f"api:{api_port}" in targets and f"vllm:{port}" in targets


def test_dependencies_wait_for_health_and_migration():
    for name in ("api", "worker", "beat"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("postgres", "redis", "api", "vllm"):
        assert "healthcheck" in SERVICES[name], name
    assert "noeviction" in SERVICES["redis"]["command"]


@pytest.mark.parametrize("path", ["deploy/grafana/provisioning/datasources/prometheus.yml",
                                  "deploy/grafana/provisioning/dashboards/flywheel.yml"])
def test_grafana_provisioning_files_parse(path):
    assert yaml.safe_load((ROOT / path).read_text())["apiVersion"] == 1


def test_grafana_dashboard_queries_metrics_flywheel_exports():
    import json

    from prometheus_client import REGISTRY

    from service import metrics, metrics_db, ratelimit  # noqa: F401 - they register the series

    dash = json.loads((ROOT / "deploy/grafana/dashboards/flywheel.json").read_text())
    exported = {m.name for m in REGISTRY.collect()}  # prometheus_client strips _total
    source = (ROOT / "service/metrics_db.py").read_text()
    for panel in dash["panels"]:
        expr = panel["targets"][0]["expr"]
        for name in re.findall(r"flywheel_[a-z_]+", expr):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in exported or f'"{base}"' in source, f"{panel['title']}: {name} is not exported"
    assert metrics_db  # the module the DB-derived series come from


def test_prometheus_scrapes_the_api_with_the_metrics_token_and_grafana_has_no_anonymous_access():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    token = compose["x-flywheel-env"]["FLYWHEEL_METRICS_TOKEN"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    api_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "flywheel-api")
    assert token == "${FLYWHEEL_METRICS_TOKEN:-" + api_job["authorization"]["credentials"] + "}"
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
