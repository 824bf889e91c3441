"""OpenAI-compatible chat completions and model listing."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from service.api import context_window, gateway, storing
from service.api.deps import Caller, State
from service.api.errors import ApiError, unavailable
from service.api.schemas import ChatCompletionRequest, ModelCard, ModelList
from service.db import repositories as repo
from service.metrics import GATEWAY_LATENCY, GATEWAY_TTFT

router = APIRouter(tags=["gateway"])


def _request_values(iid: uuid.UUID, caller, body: ChatCompletionRequest, route,
                    served) -> dict[str, Any]:
    return {
        "id": iid, "tenant_id": caller.tenant_id, "api_key_id": caller.key_id,
        "alias": body.model, "adapter_id": route.adapter_id, "version_id": served.version_id,
        "served_model": served.model, "user": body.user,
        "messages": [m.model_dump(exclude_none=True) for m in body.messages],
        "params": body.stored_params(), "stream": body.stream,
    }


def _answer_values(capture: gateway.Capture) -> dict[str, Any]:
    return {
        "replica": capture.replica, "response_text": capture.text,
        "response_tool_calls": capture.tool_calls, "finish_reason": capture.finish_reason,
        "prompt_tokens": capture.prompt_tokens, "completion_tokens": capture.completion_tokens,
        "latency_ms": capture.latency_ms, "ttft_ms": capture.ttft_ms,
    }


def _not_stored(exc: storing.NotStored, retry_after_s: int) -> ApiError:
    if exc.status == 503:
        return unavailable(exc.message, retry_after_s, exc.code)
    return ApiError(exc.status, exc.message, code=exc.code)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, caller: Caller, state: State):
    """Serve a chat completion through the alias's current version and log it."""
    route = await state.route(caller.tenant_id, body.model)
    if route is None:
        raise ApiError(404, f"unknown model or alias {body.model!r}", param="model",
                       code="model_not_found")
    served = gateway.pick_served(route, body.user)
    iid = uuid.uuid4()
    capture = gateway.Capture()
    headers = {"X-Interaction-Id": str(iid)}
    labels = (body.model, served.model)
    retry = state.settings.retry_after_s
    payload = body.upstream_payload()
    try:
        # Counted with the base model's template: an adapter never changes it.
        await context_window.check_fits(state.pool, state.settings.base_model_name, payload)
    except context_window.ContextTooLong as exc:
        raise ApiError(400, exc.message(), param="messages", code="context_length_exceeded") from exc
    # Stored while vLLM generates: the answer waits for whichever finishes last.
    write = storing.InteractionWrite(state, _request_values(iid, caller, body, route, served))
    try:
        if body.stream:
            upstream = await gateway.open_stream(state.pool, served.model, payload, capture)
        else:
            result = await gateway.complete(state.pool, served.model, payload, capture)
    except gateway.UpstreamUnavailable as exc:
        write.abandon()
        raise unavailable(f"engine unavailable: {exc.reason}", retry, "engine_unavailable") from exc
    except gateway.UpstreamRejected as exc:
        write.abandon()
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)
    except BaseException:
        write.abandon()
        raise

    if not body.stream:
        GATEWAY_LATENCY.labels(*labels).observe(capture.latency_ms / 1000)
        try:
            await write.finish(_answer_values(capture), wait=False)
        except storing.NotStored as exc:
            raise _not_stored(exc, retry) from exc
        result["model"] = body.model
        result["interaction_id"] = str(iid)
        return JSONResponse(result, headers=headers)

    wants_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events():
        stored = False
        try:
            async for data in gateway.relay_stream(upstream, capture, alias=body.model,
                                                   interaction_id=str(iid),
                                                   client_wants_usage=wants_usage):
                if data == "[DONE]":
                    # Stored before [DONE] so feedback posted right after finds the interaction.
                    stored = True
                    try:
                        await write.finish(_answer_values(capture), wait=True)
                    except storing.NotStored as exc:
                        yield {"data": json.dumps({"error": {
                            "message": exc.message, "type": "server_error", "code": exc.code}})}
                yield {"data": data}
        finally:
            GATEWAY_LATENCY.labels(*labels).observe(capture.latency_ms / 1000)
            if capture.ttft_ms is not None:
                GATEWAY_TTFT.labels(*labels).observe(capture.ttft_ms / 1000)
            if not stored:  # client went away or the engine broke: keep what was served
                capture.finish_reason = capture.finish_reason or "disconnected"
                state.spawn(_finish_quietly(write, _answer_values(capture)))

    return EventSourceResponse(events(), headers=headers, sep="\n", ping=30)


async def _finish_quietly(write: storing.InteractionWrite, answer: dict[str, Any]) -> None:
    try:
        await write.finish(answer, wait=True)
    except storing.NotStored:
        pass  # counted and logged by finish(); nobody is left to tell


@router.get("/v1/models", response_model=ModelList)
async def list_models(caller: Caller, state: State) -> ModelList:
    """The base model and the caller tenant's aliases, in OpenAI's format."""
    async with state.sessions() as session:
        aliases = await repo.list_routes(session, caller.tenant_id)
    now = int(time.time())
    cards = [ModelCard(id=state.settings.base_model_name, created=now, owned_by="flywheel")]
    cards += [ModelCard(id=a, created=int(c.timestamp()), owned_by=caller.tenant_id)
              for a, c in aliases]
    return ModelList(data=cards)
