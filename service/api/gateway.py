"""Forwarding chat completions to vLLM replicas and capturing what was served.

Plain async functions: the route only parses, authorises and hands over.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from service.db.repositories import Route
from service.engine.replicas import Replica, ReplicaPool
from service.metrics import UPSTREAM_ERRORS


class UpstreamUnavailable(Exception):
    """No replica could take the request (none configured, all down, or none holds the model)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamRejected(Exception):
    """A replica answered with an error status (e.g. 400 for a prompt over the context)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"upstream {status}")
        self.status = status
        self.body = body


@dataclass
class Served:
    """Which model answered, under which version, and whether it was the canary."""

    model: str
    version_id: Any
    canary: bool = False


def pick_served(route: Route, user: str | None, rng: random.Random | None = None) -> Served:
    """Choose serving vs canary version: sticky per `user` when given, else random per request."""
    if route.canary_model and route.canary_share > 0:
        if user:
            digest = hashlib.sha256(f"{route.alias}\x00{user}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") / 2**64
        else:
            draw = (rng or random).random()
        if draw < route.canary_share:
            return Served(route.canary_model, route.canary_version_id, canary=True)
    return Served(route.served_model, route.version_id)


@dataclass
class Capture:
    """What the gateway learned while serving one completion."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    text: str = ""
    # OpenAI's `tool_calls` list when the answer called tools (None for a text answer).
    tool_calls: list[dict] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    replica: str | None = None
    error: str | None = None
    # A stream's calls by their index while their pieces arrive.
    _streamed_calls: dict[int, dict] = field(default_factory=dict, init=False, repr=False)

    def add_tool_call_deltas(self, deltas: list) -> None:
        """Fold one stream chunk's `delta.tool_calls` into tool_calls."""
        merge_tool_call_deltas(self._streamed_calls, deltas)
        self.tool_calls = [self._streamed_calls[i] for i in sorted(self._streamed_calls)] or None

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started) * 1000


def merge_tool_call_deltas(calls: dict[int, dict], deltas: list) -> None:
    """Merge streamed tool-call pieces into `calls` by index (OpenAI's streaming format): id,
    type and the function's name arrive once, the arguments in pieces to concatenate."""
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        call = calls.setdefault(delta.get("index", 0), {
            "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        function = delta.get("function") or {}
        # Servers that repeat the id or name on later pieces must not double them.
        call["id"] = call["id"] or delta.get("id")
        call["type"] = delta.get("type") or call["type"]
        call["function"]["name"] = call["function"]["name"] or function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""


def message_tool_calls(message: dict) -> list[dict] | None:
    """A non-streamed answer's `tool_calls` (None when it called none)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return None
    return [c for c in calls if isinstance(c, dict)] or None


def _error_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:500], "type": "upstream_error"}}


async def _send(pool: ReplicaPool, model: str, payload: dict, *, stream: bool
                ) -> tuple[httpx.Response, Replica]:
    """Send to the first replica that accepts the connection; retries only unsent requests."""
    replicas = pool.candidates(model)
    if not pool.replicas:
        raise UpstreamUnavailable("no vLLM replicas configured (set FLYWHEEL_VLLM_URLS)")
    if not replicas:
        raise UpstreamUnavailable(f"no healthy vLLM replica holds model {model!r}")
    last = "unknown"
    for replica in replicas:
        request = replica.client.build_request("POST", "/v1/chat/completions", json=payload)
        try:
            response = await replica.client.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached the replica: safe to try the next one.
            UPSTREAM_ERRORS.labels(replica.url, "connect").inc()
            pool.mark_down(replica, repr(exc))
            last = f"{replica.url}: {type(exc).__name__}"
            continue
        except httpx.HTTPError as exc:
            UPSTREAM_ERRORS.labels(replica.url, "transport").inc()
            raise UpstreamUnavailable(f"vLLM replica {replica.url} failed: {type(exc).__name__}") from exc
        if response.status_code == 404 and len(replicas) > 1:
            # The replica does not hold the adapter (mid-reconcile): another may.
            await response.aclose()
            if replica.loaded is not None:
                replica.loaded.discard(model)
            last = f"{replica.url}: model not loaded"
            continue
        if response.status_code >= 400:
            if stream:
                await response.aread()
                await response.aclose()
            UPSTREAM_ERRORS.labels(replica.url, f"http_{response.status_code}").inc()
            if response.status_code >= 500:
                raise UpstreamUnavailable(f"vLLM replica {replica.url} answered {response.status_code}")
            raise UpstreamRejected(response.status_code, _error_body(response))
        return response, replica
    raise UpstreamUnavailable(f"no vLLM replica reachable ({last})")


async def complete(pool: ReplicaPool, model: str, payload: dict, capture: Capture) -> dict:
    """Non-streaming completion; fills capture from the response."""
    response, replica = await _send(pool, model, {**payload, "model": model, "stream": False},
                                    stream=False)
    capture.replica = replica.url
    body = response.json()
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    capture.text = message.get("content") or ""
    capture.tool_calls = message_tool_calls(message)
    capture.finish_reason = choice.get("finish_reason")
    usage = body.get("usage") or {}
    capture.prompt_tokens = usage.get("prompt_tokens")
    capture.completion_tokens = usage.get("completion_tokens")
    return body


async def open_stream(pool: ReplicaPool, model: str, payload: dict, capture: Capture
                      ) -> httpx.Response:
    """Start a streaming completion; raises before any byte is sent to the client on failure."""
    upstream = {**payload, "model": model, "stream": True,
                "stream_options": {**(payload.get("stream_options") or {}), "include_usage": True}}
    response, replica = await _send(pool, model, upstream, stream=True)
    capture.replica = replica.url
    return response


async def relay_stream(response: httpx.Response, capture: Capture, *, alias: str,
                       interaction_id: str, client_wants_usage: bool) -> AsyncIterator[str]:
    """Yield the client's SSE data payloads, rewriting model and tagging the first chunk."""
    first = True
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage")
            if usage:
                capture.prompt_tokens = usage.get("prompt_tokens")
                capture.completion_tokens = usage.get("completion_tokens")
            choices = chunk.get("choices") or []
            for choice in choices:
                delta = choice.get("delta") or {}
                content, calls = delta.get("content"), delta.get("tool_calls")
                if (content or calls) and capture.first_token_at is None:
                    capture.first_token_at = time.perf_counter()  # a tool call is an answer too
                if content:
                    capture.text += content
                if isinstance(calls, list):
                    capture.add_tool_call_deltas(calls)
                if choice.get("finish_reason"):
                    capture.finish_reason = choice["finish_reason"]
            if not choices and usage and not client_wants_usage:
                continue  # the usage-only chunk we asked for on our own account
            chunk["model"] = alias
            if first:
                chunk["interaction_id"] = interaction_id
                first = False
            yield json.dumps(chunk, separators=(",", ":"))
        yield "[DONE]"
    except httpx.HTTPError as exc:
        capture.error = f"upstream stream broke: {type(exc).__name__}"
        capture.finish_reason = capture.finish_reason or "error"
        yield json.dumps({"error": {"message": "the engine stopped mid-stream; retry",
                                    "type": "upstream_error", "code": "engine_unavailable"}})
    finally:
        await response.aclose()
