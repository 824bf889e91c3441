"""docker-compose.yml and its assets checked against the code, statically.

tests/integration/test_compose_drift.py runs each Flywheel service's command natively;
scripts/compose_test.sh brings the stack up in Docker.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from service.cli import app
from service.config import Settings
from tests.helpers.compose import (
    ComposeError,
    environment,
    flywheel_services,
    load,
    read_env_file,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = load()
SERVICES = COMPOSE["services"]
GPU = yaml.safe_load((ROOT / "deploy/compose.gpu.yml").read_text())["services"]
PROMETHEUS = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
LONG_RUNNING = ("postgres", "redis", "vllm", "api", "worker", "beat", "prometheus", "grafana")


def test_every_flywheel_variable_exists_in_settings():
    fields = {f"FLYWHEEL_{name.upper()}" for name in Settings.model_fields}
    for name, service in SERVICES.items():
        for var in environment(service):
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


def test_the_worker_consumes_every_queue_the_app_routes_to():
    import workers.tasks  # noqa: F401 - registers the tasks
    from workers.celery_app import QUEUES, ROUTES
    from workers.celery_app import app as celery

    worker = SERVICES["worker"]["command"]
    assert worker[:4] == ["celery", "-A", "workers.celery_app", "worker"]
    consumed = set(worker[worker.index("-Q") + 1].split(","))
    assert consumed == set(QUEUES)
    flywheel_tasks = {n for n in celery.tasks if n.startswith("flywheel.")}
    assert flywheel_tasks == set(ROUTES), "a task without a route goes to the default queue"
    for entry in celery.conf.beat_schedule.values():
        assert celery.amqp.router.route({}, entry["task"])["queue"].name in consumed, entry
    assert worker[worker.index("--concurrency") + 1] == "1"
    assert SERVICES["beat"]["command"][:4] == ["celery", "-A", "workers.celery_app", "beat"]


def _port_of(url: str) -> tuple[str, int]:
    m = re.match(r"\w[\w+]*://(?:[^@/]*@)?([\w.-]+):(\d+)", url)
    assert m, url
    return m.group(1), int(m.group(2))


def test_urls_point_at_services_and_ports_that_exist():
    env = environment(SERVICES["api"])
    assert _port_of(env["FLYWHEEL_DATABASE_URL"]) == ("postgres", 5432)
    assert _port_of(env["FLYWHEEL_BROKER_URL"]) == ("redis", 6379)
    host, port = _port_of(env["FLYWHEEL_VLLM_URLS"])
    assert host == "vllm"
    for engine in (SERVICES["vllm"], GPU["vllm"]):
        command = engine["command"]
        assert command[command.index("--port") + 1] == str(port)
        assert command[command.index("--host") + 1] == "0.0.0.0"
    api_cmd = SERVICES["api"]["command"]
    api_port = api_cmd[api_cmd.index("--port") + 1]
    assert f"{api_port}:{api_port}" in SERVICES["api"]["ports"]
    targets = {t for job in PROMETHEUS["scrape_configs"] for s in job["static_configs"]
               for t in s["targets"]}
    assert targets == {f"api:{api_port}", f"vllm:{port}"}


def test_the_engine_is_on_a_private_network_and_never_published():
    for engine in (SERVICES["vllm"], GPU["vllm"]):
        assert "ports" not in engine and "network_mode" not in engine
    assert SERVICES["vllm"]["networks"] == ["engine"]
    on_engine = {n for n, s in SERVICES.items() if "engine" in (s.get("networks") or [])}
    assert on_engine == {"vllm", "api", "worker", "prometheus"}  # Prometheus: its /metrics
    on_backend = {n for n, s in SERVICES.items() if "backend" in (s.get("networks") or [])}
    assert on_backend == {"postgres", "redis", "migrate", "api", "worker", "beat"}
    published = {n for n, s in SERVICES.items() if s.get("ports")}
    assert published == {"api", "prometheus", "grafana"}
    assert all(p.startswith("127.0.0.1:") for p in SERVICES["prometheus"]["ports"])
    # The engine gets the model settings it needs, not the database's password.
    assert not any("DATABASE" in k or "BROKER" in k for k in environment(SERVICES["vllm"]))


def test_docker_compose_up_alone_runs_the_loop():
    assert not any("profiles" in s for s in SERVICES.values()), "every service starts by default"
    models = SERVICES["models"]
    assert models["command"] == ["flywheel", "models", "prepare", "--output", "/models/base"]
    assert environment(models)["FLYWHEEL_BASE_MODEL"] == "/models/base"
    for name in ("api", "worker", "beat", "migrate"):
        assert environment(SERVICES[name])["FLYWHEEL_BASE_MODEL"] == "/models/base", name
    for name in ("worker", "vllm"):
        assert SERVICES[name]["depends_on"]["models"]["condition"] == "service_completed_successfully"


def test_dependencies_wait_for_health_and_migration():
    for name in ("api", "worker", "beat"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "noeviction" in SERVICES["redis"]["command"]


def test_long_running_services_restart_and_report_health():
    for name in LONG_RUNNING:
        assert SERVICES[name]["restart"] == "unless-stopped", name
    for name in ("postgres", "redis", "vllm", "api", "worker", "beat"):
        assert SERVICES[name]["healthcheck"]["test"], name
    for name in ("models", "migrate"):
        assert SERVICES[name]["restart"] == "no", name
    assert "inspect ping" in " ".join(SERVICES["worker"]["healthcheck"]["test"])
    from workers.celery_app import BEAT_HEARTBEAT

    heartbeat = f"{environment(SERVICES['beat'])['FLYWHEEL_DATA_DIR']}/{BEAT_HEARTBEAT}"
    assert heartbeat in " ".join(SERVICES["beat"]["healthcheck"]["test"])


def test_the_api_runs_its_processes_in_prometheus_multiprocess_mode():
    api = SERVICES["api"]
    assert int(api["command"][api["command"].index("--workers") + 1]) > 1
    assert environment(api)["PROMETHEUS_MULTIPROC_DIR"]
    for name, service in SERVICES.items():  # one folder per `flywheel api`, never shared
        if name != "api":
            assert "PROMETHEUS_MULTIPROC_DIR" not in environment(service), name


def test_fresh_multiproc_dir_makes_the_folder_and_drops_a_previous_runs_files(tmp_path):
    from service.cli.serve import fresh_multiproc_dir

    folder = tmp_path / "a" / "prometheus"
    fresh_multiproc_dir(folder)
    assert folder.is_dir()
    (folder / "counter_123.db").write_bytes(b"stale")
    (folder / "keep.txt").write_text("not prometheus_client's")
    fresh_multiproc_dir(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_secrets_come_from_env_and_the_example_names_every_one():
    raw = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", raw))
    assert required == {"POSTGRES_PASSWORD", "FLYWHEEL_METRICS_TOKEN", "GRAFANA_ADMIN_PASSWORD"}
    assert set(read_env_file()) == required
    assert not re.search(r"\$\{[A-Z_]+:-", raw), "a secret with a default is a shared secret"
    with pytest.raises(ComposeError, match="POSTGRES_PASSWORD"):
        load(env={})
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert dockerignore[dockerignore.index("*")] == "*"  # an allow-list: .env never in a context
    assert not any(line.startswith("!.env") for line in dockerignore)


def test_the_image_runs_as_a_non_root_user():
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert users and users[-1] not in ("root", "0")
    for name, service in flywheel_services(COMPOSE).items():
        assert service.get("user") in (None, users[-1]), name


@pytest.mark.parametrize("path", ["deploy/grafana/provisioning/datasources/prometheus.yml",
                                  "deploy/grafana/provisioning/dashboards/flywheel.yml"])
def test_grafana_provisioning_files_parse(path):
    assert yaml.safe_load((ROOT / path).read_text())["apiVersion"] == 1


def test_grafana_dashboard_queries_metrics_flywheel_exports():
    import json

    from prometheus_client import REGISTRY

    from service import metrics, metrics_db  # noqa: F401 - they register the series
    from service.intake import ratelimit  # noqa: F401 - it registers its series

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
    api_job = next(j for j in PROMETHEUS["scrape_configs"] if j["job_name"] == "flywheel-api")
    token_file = api_job["authorization"]["credentials_file"]
    prometheus = SERVICES["prometheus"]
    token = environment(SERVICES["api"])["FLYWHEEL_METRICS_TOKEN"]
    assert environment(prometheus)["FLYWHEEL_METRICS_TOKEN"] == token
    start = " ".join(prometheus["entrypoint"] + prometheus["command"])
    assert f'"$FLYWHEEL_METRICS_TOKEN" > {token_file}' in start
    grafana = environment(SERVICES["grafana"])
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == read_env_file()["GRAFANA_ADMIN_PASSWORD"]


def test_the_gpu_override_swaps_only_the_engine():
    assert set(GPU) == {"vllm"}
    vllm = GPU["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    command = vllm["command"]
    assert command[command.index("--served-model-name") + 1] == \
        environment(SERVICES["api"])["FLYWHEEL_BASE_MODEL_NAME"]
    assert command[command.index("--model") + 1] == "/models/base"
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    limit = int(command[command.index("--max-model-len") + 1])
    assert limit == Settings.model_fields["vllm_max_model_len"].default  # what training uses
