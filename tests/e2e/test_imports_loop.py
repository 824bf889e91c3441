"""Imports through the API as background jobs → the trigger → the real Celery worker trains each
import's run → eval gate → waiting for ops approval, with lineage naming the import."""

from __future__ import annotations

import io
import json
import tarfile

import httpx
import pytest
from sqlalchemy import select

from service.db.models import AdapterVersion, Interaction
from tests.helpers.auth import bearer
from tests.helpers.data import wait_import
from tests.helpers.loop import api_and_worker, loop_policy, policy_dir, served_by
from tests.helpers.runs import wait_run
from tests.helpers.stack import REPO

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DATA = REPO / "tests" / "data" / "imports"
SAMPLES = {"openwebui": "openwebui-feedback-export.json", "langfuse": "langfuse-traces.json",
           "jsonl": "chats.jsonl"}
IMPORT_MAX_BYTES = 300_000  # above the stack's max_body_bytes (200 000): the route's own limit

POLICY = loop_policy(min_new_ratings=10, max_steps=4, heldout_fraction=0.3)


@pytest.fixture(scope="module")
def import_stack(api_settings, stack_root, tmp_path_factory):
    policies = policy_dir(tmp_path_factory.mktemp("import-loop-policies"), POLICY)
    with api_and_worker(api_settings, stack_root, policies, "imports",
                        import_max_bytes=str(IMPORT_MAX_BYTES)) as stack:
        yield stack


def _post(c, alias, key, source, body: bytes, **params):
    return c.post(f"/v1/adapters/{alias}/imports", headers=bearer(key), content=body,
                  params={"source": source, **params})


def test_each_format_imported_through_the_api_is_trained_by_the_real_worker(
        import_stack, make_key, make_alias, tenant, db_sessions):
    api, worker, _ = import_stack
    ops, product = make_key(tenant, "ops"), make_key(tenant, "product")
    other_ops = make_key(f"{tenant}-b", "ops")
    aliases = {source: make_alias(tenant) for source in SAMPLES}
    jobs = {}
    with httpx.Client(base_url=api.url, timeout=60) as c:
        alias = aliases["langfuse"]
        body = (DATA / SAMPLES["langfuse"]).read_bytes()
        # Roles and tenants: a product key cannot import; another tenant's alias is not found.
        assert _post(c, alias, product, "langfuse", body).status_code == 403
        r = _post(c, alias, other_ops, "langfuse", body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "alias_not_found"
        # A file that is not the named format: 422 naming it, nothing written.
        r = _post(c, alias, ops, "openwebui", body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_import_file"
        r = _post(c, alias, ops, "langfuse", body, up_min=0, down_max=1)
        assert r.status_code == 422 and "below up_min" in r.json()["error"]["message"]
        # Dry run: the counts, nothing written.
        r = _post(c, alias, ops, "langfuse", body, dry_run="true")
        assert r.status_code == 200, r.text
        assert (r.json()["imported"], r.json()["skipped"], r.json()["errors"]) == (10, 1, 1)
        assert c.get(f"/v1/adapters/{alias}/imports", headers=bearer(ops)).json() == []
        # The import route takes bodies over the chat limit, up to its own.
        big = "".join(json.dumps({"id": f"big-{n}", "rating": "up", "messages": [
            {"role": "user", "content": f"question {n} " + "x" * 200},
            {"role": "assistant", "content": "answer"}]}) + "\n" for n in range(1000)).encode()
        assert 200_000 < len(big[:250_000]) <= IMPORT_MAX_BYTES < len(big)
        assert _post(c, alias, ops, "jsonl", big[:big.rindex(b"\n", 0, 250_000) + 1],
                     dry_run="true").status_code == 200
        r = _post(c, alias, ops, "jsonl", big, dry_run="true")
        assert r.status_code == 413 and str(IMPORT_MAX_BYTES) in r.json()["error"]["message"]

        for source, alias in aliases.items():
            r = _post(c, alias, ops, source, (DATA / SAMPLES[source]).read_bytes(),
                      file_name=SAMPLES[source])
            assert r.status_code == 202, r.text
            assert r.json()["status"] == "running" and r.json()["total"] >= 12
            job = wait_import(c, alias, ops, r.json()["id"])
            assert job["status"] == "done", job
            assert (job["imported"], job["skipped_reasons"]) == (10, {"no_rating": 1})
            assert job["errors"] == len(job["error_samples"]) >= 1 and job["run_id"]
            jobs[source] = job
        listed = c.get(f"/v1/adapters/{aliases['jsonl']}/imports", headers=bearer(ops)).json()
        assert [j["id"] for j in listed] == [jobs["jsonl"]["id"]]
        # The ops chart shows imported ratings as their own series, not as the base model's.
        stats = c.get(f"/v1/adapters/{aliases['jsonl']}/stats", headers=bearer(ops)).json()
        assert set(stats["series"]) == {"import:jsonl"} and stats["feedback"] == 10

        for source, job in jobs.items():
            run = wait_run(db_sessions, job["run_id"], {"awaiting_approval", "rejected"},
                           timeout=600, log=worker.log)
            assert run.state == "awaiting_approval", (source, run.verdict)
            assert run.dataset_stats["train_items"] > 0
            with db_sessions() as s:
                version = s.get(AdapterVersion, run.candidate_version_id)
                iid = s.scalars(select(Interaction.id).where(
                    Interaction.import_id == job["id"])).first()
            [entry] = version.lineage["dataset"]["imports"]
            assert entry["import_id"] == job["id"] and entry["source"] == source
            assert entry["train"] + entry["heldout"] == 10
            # The run's detail shows the same lineage; the interaction shows where it came from.
            detail = c.get(f"/v1/runs/{run.id}", headers=bearer(ops)).json()
            assert detail["lineage"]["dataset"]["imports"][0]["import_id"] == job["id"]
            got = c.get(f"/v1/interactions/{iid}", headers=bearer(ops)).json()
            assert (got["source"], got["import_id"]) == (source, job["id"])
            assert got["served_model"] == f"import:{source}" and got["version_id"] is None
            # A product key sees only its own interactions: not an import's.
            assert c.get(f"/v1/interactions/{iid}", headers=bearer(product)).status_code == 404


def _tar(directory, names=("adapter_config.json", "adapter_model.safetensors")) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in names:
            tar.add(directory / name, arcname=f"my-adapter/{name}")
    return buf.getvalue()


def test_an_adapter_trained_elsewhere_is_gated_approved_and_served(
        import_stack, make_key, make_alias, tenant, db_sessions, tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    api, worker, _ = import_stack
    ops, product = make_key(tenant, "ops"), make_key(tenant, "product")
    alias = make_alias(tenant)
    # PEFT's default init (B = 0): a real adapter that changes nothing, so the gate can pass.
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    task_type="CAUSAL_LM")).save_pretrained(tmp_path / "lora")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((tmp_path / "lora" / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with httpx.Client(base_url=api.url, timeout=120) as c:
        # Some ratings first (below the trigger): the gate scores the adapter on their held-out part.
        lines = (DATA / SAMPLES["jsonl"]).read_bytes().splitlines(keepends=True)[:7]
        r = _post(c, alias, ops, "jsonl", b"".join(lines))
        assert r.status_code == 202 and wait_import(c, alias, ops, r.json()["id"])["run_id"] is None

        url = f"/v1/adapters/{alias}/versions"
        assert c.post(url, headers=bearer(product), content=_tar(tmp_path / "lora")).status_code == 403
        r = c.post(url, headers=bearer(ops), content=_tar(pickled, ("adapter_config.json", "adapter_model.bin")))
        assert r.status_code == 422 and r.json()["error"]["code"] == "pickle", r.text
        r = c.post(url, headers=bearer(ops), content=b"not a tar")
        assert r.status_code == 422 and r.json()["error"]["code"] == "bad_archive"
        r = c.post(url, headers=bearer(ops), content=_tar(tmp_path / "lora"),
                   params={"note": "LoRA from a notebook"})
        assert r.status_code == 202, r.text
        out = r.json()
        assert out["lora_name"] == f"{tenant}--{alias}--v1" and out["base_check"] == "same model"
        # One run at a time: a second adapter waits for this one to settle.
        again = c.post(url, headers=bearer(ops), content=_tar(tmp_path / "lora"))
        assert again.status_code == 409 and again.json()["error"]["code"] == "run_active"

        run = wait_run(db_sessions, out["run_id"], {"awaiting_approval", "rejected"}, timeout=300,
                       log=worker.log)
        assert run.state == "awaiting_approval", run.verdict
        assert run.method == "import" and run.dataset_stats["rated"] == 6
        # Scored on the alias's held-out ratings, split as every training splits them (by a hash
        # of each interaction's random id: how many of the 6 is not fixed).
        assert run.dataset_stats["heldout_items"] < 6
        assert run.metrics["gate"]["n_heldout"] <= run.dataset_stats["heldout_items"]
        r = c.post(f"/v1/runs/{run.id}/approve", headers=bearer(ops), json={"reason": "reviewed"})
        assert r.status_code == 200, r.text
        run = wait_run(db_sessions, run.id, {"live"}, timeout=180, log=worker.log)
        with db_sessions() as s:
            version = s.get(AdapterVersion, run.candidate_version_id)
        assert version.status == "live" and version.lineage["source"]["note"] == "LoRA from a notebook"
        served = served_by(c, product, alias, version.lora_name, timeout=15)
        assert served["served_model"] == version.lora_name
