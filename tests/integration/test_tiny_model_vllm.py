"""The tiny model served by a real vLLM (CPU build): chat, streaming, runtime LoRA load/unload.

One vLLM server for the module: tests/conftest.py's session server when it is there (so the
suite starts one), otherwise our own.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from service.engine.managed import ManagedVllm, VllmStartError
from service.local.embedded import free_port
from service.local.tiny_model import build_tiny_model
from tests.helpers.stack import TINY_MODEL_CACHE
from tests.helpers.vllm import make_random_lora, sse_events

pytestmark = pytest.mark.vllm

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_tiny_model(TINY_MODEL_CACHE, seed=0)


@pytest.fixture(scope="module")
def server(request, model_dir, tmp_path_factory):
    """A healthy vLLM on the tiny model, with runtime LoRA updates enabled."""
    try:
        shared = request.getfixturevalue("vllm")
    except pytest.FixtureLookupError:  # run without tests/conftest.py
        shared = None
    if isinstance(shared, ManagedVllm) and shared.model_dir.resolve() == model_dir:
        yield shared
        return
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    # 64 MiB of KV cache is ample for 16 x 256 tokens and keeps the server near 1.3 GB RSS.
    srv = ManagedVllm(model_dir, free_port(), kv_cache_gb=0.0625, log_path=log, die_with_parent=True)
    srv.start()
    try:
        waited = srv.wait_healthy(timeout=300)
        print(f"\nvLLM healthy in {waited:.1f}s, RSS {srv.rss_bytes() / 2**20:.0f} MiB")
        yield srv
    finally:
        pids = _group_pids(srv.pid)
        srv.stop()
        time.sleep(0.2)
        assert not [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)], "vLLM left processes behind"


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60.0, connect=5.0)) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def chat(http: httpx.Client, model: str, **extra) -> dict:
    body = {"model": model, "messages": QUESTION, "max_tokens": 12, "temperature": 0.0, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --- the model in transformers (no server) ------------------------------------------------------


def test_model_loads_and_chat_template_works(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


# --- the manager without a server ---------------------------------------------------------------


def test_manager_command_and_env(model_dir, tmp_path):
    m = ManagedVllm(model_dir, 8123, max_loras=3, max_cpu_loras=5, max_lora_rank=32, kv_cache_gb=2,
                    log_path=tmp_path / "v.log")
    argv = m.command()
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in {"--model": str(model_dir), "--port": "8123", "--max-loras": "3",
                        "--max-cpu-loras": "5", "--max-lora-rank": "32", "--dtype": "bfloat16",
                        "--served-model-name": "base"}.items():
        assert argv[argv.index(flag) + 1] == value, flag
    assert "--enable-lora" in argv
    env = m.environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(2 * 2**30)
    # A fractional budget cannot go through the integer-only legacy env var.
    assert "VLLM_CPU_KVCACHE_SPACE" not in ManagedVllm(model_dir, 1, kv_cache_gb=0.5).environment()
    assert m.url == "http://127.0.0.1:8123"


def test_manager_reports_early_exit_with_log(model_dir, tmp_path):
    m = ManagedVllm(model_dir, free_port(), python="/bin/false", log_path=tmp_path / "v.log")
    m.start()
    with pytest.raises(VllmStartError, match="exited with code 1"):
        m.wait_healthy(timeout=10, poll_s=0.05)
    assert m.stop() == 1


def test_manager_refuses_busy_port(model_dir, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        m = ManagedVllm(model_dir, sock.getsockname()[1], log_path=tmp_path / "v.log")
        with pytest.raises(VllmStartError, match="in use"):
            m.start()


# --- the real server ----------------------------------------------------------------------------


def test_models_lists_base(http):
    r = http.get("/v1/models")
    assert r.status_code == 200
    assert "base" in [m["id"] for m in r.json()["data"]]


def test_chat_completion(http, tokenizer):
    body = chat(http, "base")
    assert body["model"] == "base"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    usage = body["usage"]
    assert usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # vLLM renders the same template as transformers, with exactly one bos.
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    assert usage["prompt_tokens"] == len(ids)


def test_chat_completion_streaming(http):
    body = {"model": "base", "messages": QUESTION, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    usage = [e["usage"] for e in events if e.get("usage")]
    assert usage and usage[-1]["completion_tokens"] >= 1
    assert isinstance(text, str)
    assert any(c.get("finish_reason") for e in events for c in e.get("choices", []))


def test_runtime_lora_load_serve_unload(http, model_dir, tmp_path):
    adapter = make_random_lora(model_dir, tmp_path / "adapter", r=8)
    assert (adapter / "adapter_model.safetensors").exists()
    name = f"t{uuid.uuid4().hex[:6]}--v1"  # never reuse a name for new weights (vllm #42125)

    r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter)})
    assert r.status_code == 200, r.text
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert name in models and models[name]["parent"] == "base"

    base_out = chat(http, "base")["choices"][0]["message"]["content"]
    lora = chat(http, name)
    assert lora["model"] == name and lora["usage"]["completion_tokens"] >= 1
    # Random, non-zero B: the adapter really changes what the model says.
    assert lora["choices"][0]["message"]["content"] != base_out

    r = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert r.status_code == 200, r.text
    assert name not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    r = http.post("/v1/chat/completions", json={"model": name, "messages": QUESTION, "max_tokens": 2})
    assert r.status_code == 404


def test_load_missing_adapter_is_refused(http, tmp_path):
    r = http.post("/v1/load_lora_adapter",
                  json={"lora_name": f"t{uuid.uuid4().hex[:6]}--v1", "lora_path": str(tmp_path / "nope")})
    assert r.status_code in (400, 404), r.text
    assert http.get("/health").status_code == 200


def _group_pids(pgid: int | None) -> list[int]:
    if pgid is None:
        return []
    out = subprocess.run(["ps", "-o", "pid=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
