"""VllmAdmin against a fake vLLM (httpx.MockTransport) whose bodies copy vLLM 0.32's.

Status codes and messages mirror vllm/entrypoints/openai/models/serving.py and
vllm/entrypoints/serve/lora/api_router.py; paths in error messages are replaced by "<path>"
as vLLM's sanitize_message does.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
import time
from typing import Any

import httpx
import pytest

from service.engine.vllm_admin import (
    AdapterPathMissing,
    AlreadyLoaded,
    ModelCard,
    ReplicaError,
    ReplicaUnreachable,
    VllmAdmin,
)

URL = "http://replica-0:8100"


def _error(status: int, message: str, err_type: str, param: str | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return httpx.Response(status, json=body)


class FakeVllm:
    """Just enough of vLLM's OpenAI server for the admin client, with faithful bodies."""

    def __init__(self, *, runtime_lora: bool = True) -> None:
        self.base_name = "base"
        self.base_root = "/models/tiny"
        self.loras: dict[str, str] = {}
        self.paths_on_disk: set[str] = {"/artifacts/a1", "/artifacts/a2"}
        self.refuse: dict[str, str] = {}  # path -> engine ValueError text (500)
        self.runtime_lora = runtime_lora
        self.healthy = True
        self.calls: list[tuple[str, str]] = []
        self.completion_text: str | None = "Hi there"
        self.no_choices = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        route = (request.method, request.url.path)
        if route == ("GET", "/health"):
            return httpx.Response(200 if self.healthy else 503)
        if route == ("GET", "/v1/models"):
            return httpx.Response(200, json=self._models())
        if route == ("GET", "/metrics"):
            running = ",".join(self.loras)
            return httpx.Response(200, text=(
                "# HELP vllm:lora_requests_info Running stats on lora requests.\n"
                "# TYPE vllm:lora_requests_info gauge\n"
                f'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{running}",'
                f'waiting_lora_adapters=""}} 1.7e9\n'),
                headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})
        if route == ("POST", "/v1/load_lora_adapter") and self.runtime_lora:
            return self._json_only(request) or self._load(json.loads(request.content))
        if route == ("POST", "/v1/unload_lora_adapter") and self.runtime_lora:
            return self._json_only(request) or self._unload(json.loads(request.content))
        if route == ("POST", "/v1/chat/completions"):
            return self._chat(json.loads(request.content))
        # FastAPI's own 404 for an unknown route (vLLM's handler only covers fastapi's subclass).
        return httpx.Response(404, json={"detail": "Not Found"})

    @staticmethod
    def _json_only(request: httpx.Request) -> httpx.Response | None:
        # validate_json_request: anything but application/json is a 400 validation error.
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            return _error(400, "1 validation error:\n  Unsupported Media Type: Only "
                          "'application/json' is allowed", "Bad Request")
        return None

    def _models(self) -> dict[str, Any]:
        now = int(time.time())
        perm = [{"id": "modelperm-1", "object": "model_permission", "created": now,
                 "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                 "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                 "organization": "*", "group": None, "is_blocking": False}]
        data = [{"id": self.base_name, "object": "model", "created": now, "owned_by": "vllm",
                 "root": self.base_root, "parent": None, "max_model_len": 256,
                 "permission": perm}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "vllm", "root": p,
                  "parent": self.base_name, "max_model_len": None, "permission": perm}
                 for n, p in self.loras.items()]
        return {"object": "list", "data": data}

    def _load(self, body: dict[str, Any]) -> httpx.Response:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.",
                          "InvalidUserInput")
        if name == self.base_name:
            return _error(400, f"The lora adapter '{name}' conflicts with a served base model.",
                          "InvalidUserInput")
        if name in self.loras and not body.get("load_inplace"):
            return _error(400, f"The lora adapter '{name}' has already been loaded. If you want "
                          "to load the adapter in place, set 'load_inplace' to True.",
                          "InvalidUserInput")
        if path not in self.paths_on_disk:
            return _error(404, f"Loading lora {name} failed: No adapter found for <path>",
                          "NotFoundError")
        if path in self.refuse:
            return _error(500, self.refuse[path], "InternalServerError")
        self.loras[name] = path
        # api_router returns Response(content=str): plain text, no JSON.
        return httpx.Response(200, content=f"Success: LoRA adapter '{name}' added successfully."
                              .encode())

    def _unload(self, body: dict[str, Any]) -> httpx.Response:
        name = body.get("lora_name")
        if name not in self.loras:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.loras[name]
        return httpx.Response(200, content=f"Success: LoRA adapter '{name}' removed "
                              "successfully.".encode())

    def _chat(self, body: dict[str, Any]) -> httpx.Response:
        model = body.get("model")
        if model != self.base_name and model not in self.loras:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        choices = [] if self.no_choices else [{
            "index": 0, "logprobs": None, "finish_reason": "length", "stop_reason": None,
            "message": {"role": "assistant", "content": self.completion_text,
                        "reasoning_content": None, "tool_calls": []}}]
        return httpx.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": 5, "total_tokens": 9, "completion_tokens": 4}})


def admin_for(handler: Any, **kw: Any) -> VllmAdmin:
    return VllmAdmin(URL, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
                     retry_wait_s=0.0, **kw)


@pytest.fixture
def fake() -> FakeVllm:
    return FakeVllm()


@pytest.fixture
async def admin(fake: FakeVllm):
    a = admin_for(fake)
    yield a
    await a._client.aclose()


# -- reads --------------------------------------------------------------------------------------

async def test_health(fake: FakeVllm, admin: VllmAdmin) -> None:
    assert await admin.health() is True
    fake.healthy = False
    assert await admin.health() is False


async def test_list_models_and_loaded_loras(fake: FakeVllm, admin: VllmAdmin) -> None:
    assert await admin.list_models() == [ModelCard("base", "/models/tiny", None, max_model_len=256)]
    assert await admin.loaded_loras() == set()
    await admin.load_lora("v1-abc", "/artifacts/a1")
    models = await admin.list_models()
    assert ModelCard("v1-abc", "/artifacts/a1", "base") in models
    assert await admin.loaded_loras() == {"v1-abc"}


async def test_metrics_text(fake: FakeVllm, admin: VllmAdmin) -> None:
    await admin.load_lora("v1", "/artifacts/a1")
    text = await admin.metrics_text()
    assert 'running_lora_adapters="v1"' in text and text.startswith("# HELP")


async def test_bad_models_bodies_raise_replica_error() -> None:
    for resp in (httpx.Response(200, text="<html>proxy</html>"),
                 httpx.Response(200, json={"object": "list"}),
                 httpx.Response(200, json={"data": [{"root": "x"}]}),
                 httpx.Response(502, text="Bad Gateway")):
        admin = admin_for(lambda r, resp=resp: resp)
        with pytest.raises(ReplicaError) as ei:
            await admin.list_models()
        assert ei.value.op == "list_models" and ei.value.url == URL
        assert ei.value.status == resp.status_code


# -- load / unload -------------------------------------------------------------------------------

async def test_load_success_and_request_shape(admin: VllmAdmin) -> None:
    seen: list[httpx.Request] = []
    fake = FakeVllm()

    def spy(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return fake(request)

    a = admin_for(spy)
    assert await a.load_lora("v1", "/artifacts/a1") is None
    req = seen[0]
    assert req.url == httpx.URL(f"{URL}/v1/load_lora_adapter")
    assert json.loads(req.content) == {"lora_name": "v1", "lora_path": "/artifacts/a1"}
    assert fake.loras == {"v1": "/artifacts/a1"}


async def test_load_already_loaded(admin: VllmAdmin) -> None:
    await admin.load_lora("v1", "/artifacts/a1")
    with pytest.raises(AlreadyLoaded) as ei:
        await admin.load_lora("v1", "/artifacts/a2")
    assert isinstance(ei.value, ReplicaError)
    assert ei.value.status == 400 and "already been loaded" in ei.value.message


async def test_load_missing_path(admin: VllmAdmin) -> None:
    with pytest.raises(AdapterPathMissing) as ei:
        await admin.load_lora("v1", "/artifacts/gone")
    assert ei.value.status == 404 and "No adapter found" in ei.value.message
    assert "/artifacts/gone" in ei.value.message  # vLLM hides the path; we add it back


async def test_load_refused_by_engine_is_plain_replica_error(fake: FakeVllm,
                                                             admin: VllmAdmin) -> None:
    fake.refuse["/artifacts/a2"] = "LoRA rank 32 is greater than max_lora_rank 16."
    with pytest.raises(ReplicaError) as ei:
        await admin.load_lora("v2", "/artifacts/a2")
    assert type(ei.value) is ReplicaError
    assert ei.value.status == 500 and "max_lora_rank" in ei.value.message


async def test_load_name_of_base_model_is_replica_error(admin: VllmAdmin) -> None:
    with pytest.raises(ReplicaError) as ei:
        await admin.load_lora("base", "/artifacts/a1")
    assert type(ei.value) is ReplicaError and "conflicts" in ei.value.message


async def test_runtime_lora_disabled_is_not_mistaken() -> None:
    """Without VLLM_ALLOW_RUNTIME_LORA_UPDATING the routes 404 with FastAPI's body."""
    fake = FakeVllm(runtime_lora=False)
    a = admin_for(fake)
    with pytest.raises(ReplicaError) as ei:
        await a.load_lora("v1", "/artifacts/a1")
    assert type(ei.value) is ReplicaError and ei.value.status == 404
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in ei.value.message
    with pytest.raises(ReplicaError) as ei:
        await a.unload_lora("v1")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in ei.value.message


async def test_unload_is_idempotent(fake: FakeVllm, admin: VllmAdmin) -> None:
    await admin.load_lora("v1", "/artifacts/a1")
    assert await admin.unload_lora("v1") is True
    assert fake.loras == {}
    assert await admin.unload_lora("v1") is False
    assert await admin.unload_lora("never-loaded") is False


async def test_unload_older_400_not_found_counts_as_unloaded() -> None:
    a = admin_for(lambda r: _error(400, "The lora adapter 'v1' cannot be found.",
                                   "InvalidUserInput"))
    assert await a.unload_lora("v1") is False


async def test_unload_other_errors_raise() -> None:
    a = admin_for(lambda r: _error(500, "engine dead", "InternalServerError"))
    with pytest.raises(ReplicaError) as ei:
        await a.unload_lora("v1")
    assert ei.value.status == 500 and ei.value.op == "unload_lora"


# -- smoke ---------------------------------------------------------------------------------------

async def test_smoke(fake: FakeVllm, admin: VllmAdmin) -> None:
    seen: list[dict[str, Any]] = []

    def spy(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            seen.append(json.loads(request.content))
        return fake(request)

    a = admin_for(spy)
    await a.load_lora("v1", "/artifacts/a1")
    assert await a.smoke("v1") == "Hi there"
    assert seen[0] == {"model": "v1", "messages": [{"role": "user", "content": "Hello"}],
                       "max_tokens": 4, "temperature": 0, "stream": False}
    fake.completion_text = None
    assert await a.smoke("base") == ""


async def test_complete_replays_the_request_fields(fake: FakeVllm) -> None:
    # The gate's answer check asks with the stored request's tools and template kwargs; the
    # model, messages and greedy settings stay its own.
    seen: list[dict[str, Any]] = []

    def spy(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return fake(request)

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    request = {"tools": tools, "tool_choice": "none", "chat_template_kwargs": {"enable_thinking": False},
               "model": "other", "temperature": 1.0}
    messages = [{"role": "user", "content": "Weather?"}]
    assert await admin_for(spy).complete("base", messages, 8, request=request) == "Hi there"
    assert seen == [{"tools": tools, "tool_choice": "none",
                     "chat_template_kwargs": {"enable_thinking": False}, "model": "base",
                     "messages": messages, "max_tokens": 8, "temperature": 0, "stream": False}]


async def test_smoke_errors(fake: FakeVllm, admin: VllmAdmin) -> None:
    with pytest.raises(ReplicaError) as ei:
        await admin.smoke("not-loaded")
    assert ei.value.status == 404 and "does not exist" in ei.value.message
    fake.no_choices = True
    with pytest.raises(ReplicaError) as ei:
        await admin.smoke("base")
    assert "no choices" in ei.value.message


# -- transport failures ----------------------------------------------------------------------------

def _failing(exc: Exception, then: FakeVllm | None = None, failures: int = 10**9):
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise exc
        assert then is not None
        return then(request)

    return handler, calls


async def test_get_retries_connect_errors_then_succeeds() -> None:
    handler, calls = _failing(httpx.ConnectError("Connection refused"), FakeVllm(), failures=2)
    assert await admin_for(handler).loaded_loras() == set()
    assert calls["n"] == 3


async def test_get_gives_up_after_retries() -> None:
    handler, calls = _failing(httpx.ConnectError("Connection refused"))
    a = admin_for(handler)
    with pytest.raises(ReplicaUnreachable) as ei:
        await a.list_models()
    assert calls["n"] == 3 and ei.value.status is None and "Connection refused" in ei.value.message
    assert await a.health() is False


async def test_connect_timeout_not_retried() -> None:
    handler, calls = _failing(httpx.ConnectTimeout("timed out"))
    with pytest.raises(ReplicaUnreachable):
        await admin_for(handler).metrics_text()
    assert calls["n"] == 1


async def test_load_never_retried() -> None:
    handler, calls = _failing(httpx.ConnectError("Connection refused"))
    with pytest.raises(ReplicaUnreachable) as ei:
        await admin_for(handler).load_lora("v1", "/artifacts/a1")
    assert calls["n"] == 1 and ei.value.op == "load_lora"


@pytest.mark.parametrize("exc", [httpx.ReadTimeout("t"), httpx.RemoteProtocolError("eof"),
                                 httpx.ReadError("reset"), httpx.WriteTimeout("t")])
async def test_transport_errors_become_replica_error(exc: Exception) -> None:
    handler, calls = _failing(exc)
    a = admin_for(handler)
    for call in (a.list_models(), a.load_lora("v1", "/p"), a.unload_lora("v1"), a.smoke("base")):
        with pytest.raises(ReplicaError) as ei:
            await call
        assert not isinstance(ei.value, httpx.HTTPError) and ei.value.status is None
    assert calls["n"] == 4  # read-side failures are never retried
    assert await a.health() is False


async def test_timeouts_are_explicit_even_on_a_shared_client(fake: FakeVllm) -> None:
    seen: list[dict[str, float]] = []

    def spy(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return fake(request)

    shared = httpx.AsyncClient(transport=httpx.MockTransport(spy), timeout=999)
    a = VllmAdmin(URL, client=shared, timeout_s=7)
    await a.health()
    await a.load_lora("v1", "/artifacts/a1")
    assert all(t["connect"] == 2.0 and t["read"] == 7 for t in seen) and len(seen) == 2
    await a.aclose()
    assert not shared.is_closed  # not ours to close
    await shared.aclose()


# -- real sockets: a refused port and a server that never answers --------------------------------

async def test_real_connection_refused() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    async with VllmAdmin(f"http://127.0.0.1:{port}/", retry_wait_s=0.0) as a:
        assert await a.health() is False
        with pytest.raises(ReplicaUnreachable):
            await a.load_lora("v1", "/p")


async def test_real_read_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with VllmAdmin(f"http://127.0.0.1:{port}", timeout_s=0.2) as a:
            t0 = time.monotonic()
            with pytest.raises(ReplicaError) as ei:
                await a.load_lora("v1", "/p")
            assert time.monotonic() - t0 < 2
            assert "ReadTimeout" in ei.value.message and "unknown" in ei.value.message
            assert await a.health() is False
            assert a._client.is_closed is False
        assert a._client.is_closed  # we created it, we closed it
    finally:
        server.close()


async def test_bad_url_is_replica_error() -> None:
    async with VllmAdmin("ftp://replica") as a:
        with pytest.raises(ReplicaError):
            await a.list_models()


def test_replica_errors_survive_pickling() -> None:
    for cls in (ReplicaError, AlreadyLoaded, AdapterPathMissing, ReplicaUnreachable):
        e = pickle.loads(pickle.dumps(cls(URL, "load_lora", 400, "msg")))
        assert type(e) is cls
        assert (e.url, e.op, e.status, e.message) == (URL, "load_lora", 400, "msg")
