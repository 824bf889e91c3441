"""Edge exports through the real stack: the ops API queues a job, a real Celery worker merges,
converts and gates it against the served version, and ops download the files by checksum.

The versions here are random LoRAs on the tiny model registered directly (no training); the
worker's policy gives the golden prompts the consistency gate compares on. Every GGUF is written
by llama.cpp's convert_hf_to_gguf.py in a subprocess of the worker (10-15 s each on 2 cores,
most of it the converter's imports), so a fallback chain that converts five times takes minutes.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.db import repositories as repo
from service.db.models import Adapter, AdapterVersion, AuditEvent, Export, TrainingRun
from service.db.session import session_scope
from service.domain.policy import Policy
from service.engine.artifact import artifact_sha256
from service.wakeup import wake_run
from tests.helpers.auth import METRICS_AUTH, bearer
from tests.helpers.cli import flywheel
from tests.helpers.stack import ApiProcess, WorkerProcess, flywheel_env
from tests.helpers.vllm import make_random_lora
from workers.export.gguf_writer import llama_cpp_available

pytestmark = pytest.mark.vllm

WORKER_POLICY = """
gate:
  golden:
    - {prompt: "Where is Paris?"}
    - {prompt: "My order is late."}
    - {prompt: "What is two plus three?"}
export:
  max_new_tokens: 8
"""


@pytest.fixture(scope="module")
def export_worker(api_settings, stack_root, tmp_path_factory):
    policies = tmp_path_factory.mktemp("export-policies")
    (policies / "default.yaml").write_text(WORKER_POLICY)
    env = flywheel_env(**{**api_settings, "policy_dir": str(policies),
                          "artifact_dir": str(stack_root / "export-artifacts"),
                          "run_lease_s": "20"})
    worker = WorkerProcess(env=env, log=stack_root / "worker-exports.log", name="wexp").start()
    yield worker
    worker.stop()


def _add_version(db_sessions, tiny_model, tenant: str, alias: str, directory: Path, *,
                 seed: int, sha256: str | None = None) -> AdapterVersion:
    artifact = make_random_lora(tiny_model, directory, seed=seed)
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        return repo.create_version(s, adapter, artifact_path=str(artifact),
                                   sha256=sha256 or artifact_sha256(artifact),
                                   parent_version_id=None, run_id=None, lineage={})


def wait_export(client: httpx.Client, ops: str, alias: str, export_id: str, worker,
                timeout: float = 180) -> dict:
    """Poll the export until it settles; fail with the worker log's tail."""
    deadline = time.monotonic() + timeout
    seen_progress = []
    while time.monotonic() < deadline:
        body = client.get(f"/v1/adapters/{alias}/exports/{export_id}", headers=bearer(ops)).json()
        if body["progress"]:
            seen_progress.append(body["progress"])
        if body["status"] not in ("queued", "running"):
            body["_seen_progress"] = seen_progress
            return body
        time.sleep(0.3)
    raise AssertionError(f"export still {body['status']} ({body['progress']}):\n"
                         + worker.log.read_text()[-3000:])


@pytest.fixture()
def alias_with_version(db_sessions, tiny_model, make_alias, tenant, tmp_path):
    alias = make_alias(tenant)
    version = _add_version(db_sessions, tiny_model, tenant, alias, tmp_path / "v1", seed=5)
    return alias, version


needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="llama-cpp-python not built (scripts/bootstrap.sh)")


@needs_llama_cpp
def test_gguf_export_passes_the_gate_and_downloads_by_checksum(
        client, export_worker, make_key, tenant, alias_with_version, db_sessions, api_settings,
        stack_root):
    alias, version = alias_with_version
    ops = make_key(tenant, "ops")
    r = client.post(f"/v1/adapters/{alias}/exports", headers=bearer(ops),
                    json={"format": "gguf", "quant": "q8_0", "version": 1, "reason": "edge box"})
    assert r.status_code == 202, r.text
    queued = r.json()
    assert queued["status"] == "queued" and queued["lora_name"] == version.lora_name
    # The same request again is the same job, not a second one.
    again = client.post(f"/v1/adapters/{alias}/exports", headers=bearer(ops),
                        json={"format": "gguf", "quant": "q8_0", "version": 1})
    assert again.status_code == 200 and again.json()["id"] == queued["id"]

    done = wait_export(client, ops, alias, queued["id"], export_worker)
    assert done["status"] == "passed", done["failure_reason"]
    assert done["quant"] == "q8_0" and done["finished_at"]
    assert any(p.get("stage") for p in done["_seen_progress"]) or done["progress"]["stage"]
    [attempt] = done["metrics"]["attempts"]
    assert attempt["metrics"]["decisive_agreement"] >= 0.95
    assert abs(attempt["metrics"]["nll_delta"]) <= 0.02
    assert done["metrics"]["merged"]["metrics"]["exact_match"] == 1.0
    assert done["metrics"]["prompts"] == 3
    names = {f["name"]: f for f in done["files"]}
    assert {"model.gguf", "Modelfile", "lineage.json"} <= set(names)

    gguf = client.get(f"/v1/adapters/{alias}/exports/{queued['id']}/files/model.gguf",
                      headers=bearer(ops))
    assert gguf.status_code == 200
    digest = hashlib.sha256(gguf.content).hexdigest()
    assert digest == gguf.headers["x-checksum-sha256"] == names["model.gguf"]["sha256"]
    assert gguf.content[:4] == b"GGUF" and len(gguf.content) == names["model.gguf"]["bytes"]
    modelfile = client.get(f"/v1/adapters/{alias}/exports/{queued['id']}/files/Modelfile",
                           headers=bearer(ops)).text
    assert modelfile.startswith("FROM ./model.gguf") and "TEMPLATE" in modelfile
    lineage = client.get(f"/v1/adapters/{alias}/exports/{queued['id']}/files/lineage.json",
                         headers=bearer(ops)).json()
    # Lineage ties the file to the alias, the version and the adapter's own checksum.
    assert lineage["alias"] == alias and lineage["version"] == 1
    assert lineage["adapter"]["sha256"] == version.sha256
    assert lineage["gguf_sha256"] == digest and lineage["sha256"] == done["sha256"]

    # A short-lived link streams the file without a key (curl, a browser's own download).
    links = f"/v1/adapters/{alias}/exports/{queued['id']}/links"
    assert client.post(links, headers=bearer(make_key(tenant, "product")),
                       json={"name": "model.gguf"}).status_code == 403
    r = client.post(links, headers=bearer(make_key(f"{tenant}-x", "ops")), json={"name": "model.gguf"})
    assert r.status_code == 404
    r = client.post(links, headers=bearer(ops), json={"name": "../../etc/passwd"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"
    link = client.post(links, headers=bearer(ops), json={"name": "model.gguf"})
    assert link.status_code == 201 and link.json()["sha256"] == digest
    url = link.json()["url"]
    assert url.startswith("/v1/downloads/") and link.json()["expires_in_s"] == 300
    streamed = client.get(url)  # no Authorization header
    assert streamed.status_code == 200 and hashlib.sha256(streamed.content).hexdigest() == digest
    assert streamed.headers["x-checksum-sha256"] == digest
    assert client.get(url[:-4] + "abcd").status_code == 404
    r = client.get("/v1/downloads/" + "x" * 43)
    assert r.status_code == 404 and r.json()["error"]["code"] == "link_not_found"

    # With Redis down, links cannot be made or opened: 503 with a reason, never a traceback.
    no_redis = ApiProcess(env=flywheel_env(**{**api_settings, "broker_url": "redis://127.0.0.1:9/0"}),
                          log=stack_root / "api-exports-no-redis.log").start()
    try:
        with httpx.Client(base_url=no_redis.url, timeout=30) as c:
            r = c.post(links, headers=bearer(ops), json={"name": "model.gguf"})
            assert r.status_code == 503 and "Redis" in r.json()["error"]["message"]
            assert r.headers["retry-after"]
            assert c.get(url).status_code == 503
            # The keyed download does not need Redis.
            assert c.get(f"/v1/adapters/{alias}/exports/{queued['id']}/files/Modelfile",
                         headers=bearer(ops)).status_code == 200
    finally:
        no_redis.stop()

    # Listed with the alias, newest first.
    detail = client.get(f"/v1/adapters/{alias}", headers=bearer(ops)).json()
    assert [e["id"] for e in detail["exports"]] == [queued["id"]]
    assert detail["exports"][0]["sha256"] == done["sha256"]
    with db_sessions() as s:
        actions = [a.action for a in s.scalars(select(AuditEvent).where(
            AuditEvent.target_id == queued["id"]).order_by(AuditEvent.id))]
        reasons = [a.reason for a in s.scalars(select(AuditEvent).where(
            AuditEvent.target_id == queued["id"]))]
    assert actions == ["export.requested", "export.passed"] and "edge box" in reasons
    scraped = client.get("/metrics", headers=METRICS_AUTH).text
    assert f'flywheel_exports{{format="gguf",quant="q8_0",status="passed",tenant="{tenant}"}} 1.0' \
        in scraped

    # A one-time link opens one download; the next use finds nothing.
    once = client.post(links, headers=bearer(ops), json={"name": "Modelfile", "one_time": True})
    assert once.status_code == 201 and once.json()["one_time"] is True
    assert client.get(once.json()["url"]).status_code == 200
    again = client.get(once.json()["url"])
    assert again.status_code == 404 and again.json()["error"]["code"] == "link_not_found"

    # A file changed on disk after the export, same size: size and sha256 are checked on every
    # download, so neither the keyed route nor a link serves it.
    with db_sessions() as s:
        path = Path(s.get(Export, uuid.UUID(queued["id"])).path) / "model.gguf"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    link = client.post(links, headers=bearer(ops), json={"name": "model.gguf"}).json()
    for r in (client.get(f"/v1/adapters/{alias}/exports/{queued['id']}/files/model.gguf",
                         headers=bearer(ops)), client.get(link["url"])):
        assert r.status_code == 410 and r.json()["error"]["code"] == "export_file_gone"
        assert "sha256" in r.json()["error"]["message"]


@needs_llama_cpp
def test_too_aggressive_quant_fails_with_numbers_then_fallback_finds_one_that_passes(
        client, export_worker, make_key, tenant, alias_with_version, stack_root):
    alias, _ = alias_with_version
    ops = make_key(tenant, "ops")
    r = client.post(f"/v1/adapters/{alias}/exports", headers=bearer(ops),
                    json={"format": "gguf", "quant": "tq2_0", "version": 1, "fallback": False})
    failed = wait_export(client, ops, alias, r.json()["id"], export_worker)
    assert failed["status"] == "failed" and failed["suggestion"] == "q2_k"
    [attempt] = failed["metrics"]["attempts"]
    m = attempt["metrics"]
    assert m["decisive_agreement"] < 0.95
    assert f"{m['decisive_agreement']:.3f}" in failed["failure_reason"]
    assert f"{m['nll_delta']:+.4f}" in failed["failure_reason"]
    assert "try quant q2_k" in failed["failure_reason"]
    r = client.get(f"/v1/adapters/{alias}/exports/{failed['id']}/files/model.gguf",
                   headers=bearer(ops))
    assert r.status_code == 409 and r.json()["error"]["code"] == "export_not_passed"
    # A failed export keeps its numbers, not its files (a merged intermediate is base-sized).
    assert failed["files"] == [] and attempt["sha256"] and attempt["bytes"]
    assert not (stack_root / "export-artifacts" / "exports" / failed["id"]).exists()

    # A failed export does not block asking again; with fallback the gate walks up the order.
    r = client.post(f"/v1/adapters/{alias}/exports", headers=bearer(ops),
                    json={"format": "gguf", "quant": "tq2_0", "version": 1, "fallback": True})
    assert r.status_code == 202 and r.json()["id"] != failed["id"]
    # tq2_0, q2_k, q4_0 and q4_k_m fail on this random tiny model before q8_0 passes.
    passed = wait_export(client, ops, alias, r.json()["id"], export_worker, timeout=420)
    assert passed["status"] == "passed", passed["failure_reason"]
    tried = [a["quant"] for a in passed["metrics"]["attempts"]]
    assert tried[0] == "tq2_0" and len(tried) >= 2 and passed["quant"] == tried[-1]
    assert [a["status"] for a in passed["metrics"]["attempts"]][:-1] == ["failed"] * (len(tried) - 1)
    assert passed["requested_quant"] == "tq2_0"
    # Only the delivered quantization stays on disk.
    assert {f["name"] for f in passed["files"]} >= {"model.gguf", "Modelfile"}
    job_dir = stack_root / "export-artifacts" / "exports" / passed["id"]
    assert [p.name for p in job_dir.iterdir()] == [f"gguf-{passed['quant']}"]


def test_merged_export_is_a_standalone_model_that_matches_the_served_version(
        client, export_worker, make_key, tenant, alias_with_version, tiny_model, db_sessions):
    alias, version = alias_with_version
    ops = make_key(tenant, "ops")
    r = client.post(f"/v1/adapters/{alias}/exports", headers=bearer(ops),
                    json={"format": "merged", "version": 1})
    done = wait_export(client, ops, alias, r.json()["id"], export_worker)
    assert done["status"] == "passed", done["failure_reason"]
    names = {f["name"] for f in done["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "lineage.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # safetensors only
    [attempt] = done["metrics"]["attempts"]
    assert attempt["metrics"]["exact_match"] == 1.0 and attempt["metrics"]["token_agreement"] == 1.0

    # Ops free the disk: the files go, the record stays (deleted) and downloads say so.
    url = f"/v1/adapters/{alias}/exports/{done['id']}"
    assert client.delete(url, headers=bearer(make_key(tenant, "product"))).status_code == 403
    with db_sessions() as s:
        path = Path(s.get(Export, uuid.UUID(done["id"])).path)
    assert path.is_dir()
    link = client.post(f"{url}/links", headers=bearer(ops), json={"name": "config.json"}).json()
    assert client.get(link["url"]).status_code == 200
    r = client.request("DELETE", url, headers=bearer(ops), json={"reason": "disk"})
    assert r.status_code == 200 and r.json()["status"] == "deleted" and r.json()["files"] == []
    assert not path.exists() and not path.parent.exists()
    r = client.get(f"{url}/files/config.json", headers=bearer(ops))
    assert r.status_code == 409 and "deleted" in r.json()["error"]["message"]
    gone = client.get(link["url"])  # a link made before the delete opens nothing now
    assert gone.status_code == 409 and gone.json()["error"]["code"] == "export_not_passed"
    assert client.delete(url, headers=bearer(ops)).status_code == 200  # idempotent


def test_export_requests_are_validated_and_scoped(client, make_key, tenant, make_alias,
                                                  alias_with_version, db_sessions, tiny_model,
                                                  tmp_path):
    alias, _ = alias_with_version
    ops, product = make_key(tenant, "ops"), make_key(tenant, "product")
    url = f"/v1/adapters/{alias}/exports"
    ok = {"format": "gguf", "quant": "q8_0", "version": 1}
    assert client.post(url, headers=bearer(product), json=ok).status_code == 403
    assert client.get(url, headers=bearer(product)).status_code == 403
    assert client.post(url, headers=bearer(make_key(f"{tenant}-x", "ops")), json=ok).status_code == 404

    def error(body):
        r = client.post(url, headers=bearer(ops), json=body)
        return r.status_code, r.json()["error"]

    status, e = error({"format": "onnx", "version": 1})
    assert status == 422 and e["param"] and "format" in e["param"]
    status, e = error({"format": "gguf", "quant": "q9", "version": 1})
    assert status == 422 and "quant" in e["param"]
    status, e = error({"format": "gguf", "version": 1})
    assert status == 422 and e["param"] == "quant" and "needs a quant" in e["message"]
    status, e = error({"format": "merged", "quant": "q8_0", "version": 1})
    assert status == 422 and "not quantized" in e["message"]
    status, e = error({"format": "merged", "version": 0})
    assert status == 422 and "version" in e["param"]
    status, e = error({"format": "merged", "version": 1, "extra": 1})
    assert status == 422
    status, e = error({"format": "merged", "version": 7})
    assert status == 404 and e["code"] == "version_not_found"
    status, e = error({"format": "merged"})  # the alias serves the base model
    assert status == 409 and e["code"] == "nothing_to_export" and "base model" in e["message"]

    with session_scope(db_sessions) as s:  # a version the gate refused is not exported
        v = s.scalars(select(AdapterVersion).join(Adapter, Adapter.id == AdapterVersion.adapter_id)
                      .where(Adapter.alias == alias, Adapter.tenant_id == tenant)).one()
        v.status, v.failure_reason = "failed", "golden case failed"
    status, e = error({"format": "merged", "version": 1})
    assert status == 409 and e["code"] == "version_failed" and "golden" in e["message"]

    missing = uuid.uuid4()
    assert client.get(f"{url}/{missing}", headers=bearer(ops)).status_code == 404
    assert client.get(f"{url}/not-a-uuid", headers=bearer(ops)).status_code == 422
    assert client.get(f"{url}/{missing}/files/model.gguf", headers=bearer(ops)).status_code == 404
    with db_sessions() as s:
        assert s.scalars(select(Export).where(Export.tenant_id == tenant)).all() == []


def test_concurrent_identical_requests_queue_one_job(client, make_key, tenant, alias_with_version,
                                                     db_sessions, api, export_worker):
    alias, _ = alias_with_version
    ops = make_key(tenant, "ops")

    def post(_):
        with httpx.Client(base_url=api.url, timeout=30) as c:
            return c.post(f"/v1/adapters/{alias}/exports", headers=bearer(ops),
                          json={"format": "gguf", "quant": "f16", "version": 1})

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(post, range(12)))
    assert sorted(r.status_code for r in results) == [200] * 11 + [202]
    assert len({r.json()["id"] for r in results}) == 1
    with db_sessions() as s:
        assert len(s.scalars(select(Export).where(Export.tenant_id == tenant)).all()) == 1
    # Settled here, so no job is left queued for another module's worker.
    wait_export(client, ops, alias, results[0].json()["id"], export_worker)


def test_a_tampered_adapter_is_refused_before_it_is_loaded(client, export_worker, make_key, tenant,
                                                           make_alias, db_sessions, tiny_model,
                                                           tmp_path):
    alias = make_alias(tenant)
    _add_version(db_sessions, tiny_model, tenant, alias, tmp_path / "v1", seed=1, sha256="0" * 64)
    ops = make_key(tenant, "ops")
    r = client.post(f"/v1/adapters/{alias}/exports", headers=bearer(ops),
                    json={"format": "merged", "version": 1})
    done = wait_export(client, ops, alias, r.json()["id"], export_worker)
    assert done["status"] == "error" and "failed verification" in done["failure_reason"]
    assert "sha256" in done["failure_reason"] and done["files"] == []


def test_promotion_queues_the_policys_exports(client, export_worker, make_key, tenant, make_alias,
                                              db_sessions, tiny_model, tmp_path, broker_url, vllm):
    """An approved run deployed by the real worker: export.on_promotion queues a merged and a GGUF
    export of the now-live version, and the merged one answers as the served version does."""
    alias = make_alias(tenant)
    version = _add_version(db_sessions, tiny_model, tenant, alias, tmp_path / "v1", seed=9)
    policy = Policy.model_validate({"export": {"on_promotion": [
        {"format": "merged"}, *([{"format": "gguf", "quant": "q8_0"}] if llama_cpp_available()
                                else [])]}})
    with session_scope(db_sessions) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.tenant_id == tenant,
                                                  Adapter.alias == alias)).one()
        run = TrainingRun(tenant_id=tenant, adapter_id=adapter.id, state="approved",
                          policy=json.loads(policy.model_dump_json()),
                          candidate_version_id=version.id, trigger={}, progress={},
                          dataset_stats={}, metrics={}, verdict={"passed": True})
        s.add(run)
        s.flush()
        run_id, adapter_id = run.id, adapter.id
    try:
        assert wake_run(broker_url, run_id)
        ops = make_key(tenant, "ops")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            exports = client.get(f"/v1/adapters/{alias}", headers=bearer(ops)).json()["exports"]
            if len(exports) == len(policy.export.on_promotion):
                break
            time.sleep(0.5)
        assert len(exports) == len(policy.export.on_promotion), export_worker.log.read_text()[-3000:]
        with db_sessions() as s:
            assert s.get(TrainingRun, run_id).state == "live"
        results = {e["format"]: wait_export(client, ops, alias, e["id"], export_worker)
                   for e in exports}
        assert all(r["status"] == "passed" for r in results.values()), results
        assert {r["requested_by"] for r in results.values()} == {"promotion"}
        assert {r["version"] for r in results.values()} == {1}

        # The merged model, downloaded and run standalone, answers greedily as vLLM serves it.
        merged = results["merged"]
        out = tmp_path / "download"
        out.mkdir()
        for f in merged["files"]:
            body = client.get(f"/v1/adapters/{alias}/exports/{merged['id']}/files/{f['name']}",
                              headers=bearer(ops)).content
            assert hashlib.sha256(body).hexdigest() == f["sha256"]
            (out / f["name"]).write_bytes(body)
        prompt = [{"role": "user", "content": "Where is Paris?"}]
        served = httpx.post(f"{vllm.url}/v1/chat/completions", timeout=60, json={
            "model": version.lora_name, "messages": prompt, "max_tokens": 8, "temperature": 0,
            "return_token_ids": True}).json()["choices"][0]["token_ids"]
        ids, gaps = _greedy(out, prompt, 8)
        # Compared up to the first near-tie: there fp32 kernels (vLLM CPU vs torch) may flip.
        sure = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), len(gaps))
        assert sure >= 2 and served[:sure] == ids[:sure], (served, ids, gaps)
    finally:
        with session_scope(db_sessions) as s:  # leave the shared engine's sizing budget as found
            a = s.get(Adapter, adapter_id)
            a.serving_version_id = a.previous_version_id = None


NEAR_TIE = 1e-3  # logits


def _greedy(model_dir: Path, messages: list[dict], max_new_tokens: int
            ) -> tuple[list[int], list[float]]:
    """Greedy token ids of a standalone (merged) model, and each step's top-1/top-2 logit gap."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    gaps = [float(torch.topk(score[0], 2).values.diff().abs()) for score in out.scores]
    return out.sequences[0, ids.shape[1]:].tolist(), gaps


def _cli(env: dict, *args: str):
    return flywheel({**env, "COLUMNS": "200"}, *args, timeout=300)


@needs_llama_cpp
def test_cli_export_waits_for_the_gate_and_reports_it(export_worker, api_settings, tenant,
                                                      alias_with_version, stack_root):
    alias, _ = alias_with_version
    env = flywheel_env(**api_settings)
    r = _cli(env, "export", alias, "--tenant", tenant, "--version", "1", "--format", "gguf",
             "--quant", "f16", "--wait", "--reason", "from the cli")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" in r.stdout and "file model.gguf" in r.stdout and "sha256" in r.stdout
    assert "gate gguf/f16" in r.stdout and "agreement" in r.stdout
    listing = _cli(env, "exports", alias, "--tenant", tenant)
    assert listing.returncode == 0 and "gguf" in listing.stdout and "passed" in listing.stdout
    export_id = r.stdout.split()[1]
    r = _cli(env, "export-delete", export_id, "--reason", "disk")
    assert r.returncode == 0 and "deleted" in r.stdout and "bytes freed" in r.stdout
    assert "deleted" in _cli(env, "exports", alias).stdout
    assert _cli(env, "export-delete", "nope").returncode == 2

    # A failing gate exits 1 with the numbers and the suggestion.
    r = _cli(env, "export", alias, "--tenant", tenant, "--version", "1", "--format", "gguf",
             "--quant", "tq2_0", "--no-fallback", "--wait")
    assert r.returncode == 1 and "failed" in r.stdout and "q2_k" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--format", "gguf", "--version", "1"], "needs a quant"),
    (["--format", "gguf", "--quant", "q9", "--version", "1"], "'q9' is not one of"),
    (["--format", "merged", "--version", "5"], "no version 5"),
    (["--format", "merged"], "serves the base model"),
    (["--format", "tar"], "'tar' is not one of"),
])
def test_cli_export_refuses_bad_arguments(args, needle, api_settings, tenant, alias_with_version):
    alias, _ = alias_with_version
    r = _cli(flywheel_env(**api_settings), "export", alias, "--tenant", tenant, *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    r = _cli(flywheel_env(**api_settings), "export", "no-such-alias", "--tenant", tenant,
             "--format", "merged")
    assert r.returncode == 2 and "no alias" in r.stderr


def test_cli_export_needs_the_tenant_only_when_the_alias_is_ambiguous(api_settings, tenant,
                                                                      make_alias, export_worker,
                                                                      alias_with_version):
    alias, _ = alias_with_version
    env = flywheel_env(**api_settings)
    # A unique name implies the tenant (version 1 is named: the alias serves the base model).
    r = _cli(env, "export", alias, "--format", "merged", "--version", "1", "--wait")
    assert r.returncode == 0 and "passed" in r.stdout, r.stdout + r.stderr
    make_alias(f"{tenant}-b", alias)
    r = _cli(env, "export", alias, "--format", "merged")
    assert r.returncode == 2 and "pass --tenant" in r.stderr and f"{tenant}-b" in r.stderr
    r = _cli(env, "exports", alias, "--tenant", tenant)
    assert r.returncode == 0 and "merged" in r.stdout
