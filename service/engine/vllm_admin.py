"""Async client for one vLLM replica's admin and runtime-LoRA endpoints.

Every failure surfaces as :class:`ReplicaError` (or a subclass); no httpx exception leaks out.
Status codes and bodies follow vLLM 0.32 (``vllm/entrypoints/openai/models/serving.py``):

- load: 200 plain text "Success: LoRA adapter 'x' added successfully."; name already loaded
  → 400 "...has already been loaded..."; path missing → 404 "Loading lora x failed: No adapter
  found for <path>"; an adapter the engine refuses (rank, modules_to_save, ...) → 500.
- unload: 200 plain text; unknown name → 404 "The lora adapter 'x' cannot be found."
- errors are JSON ``{"error": {"message", "type", "param", "code"}}``; a route that does not
  exist (runtime LoRA updating disabled) is FastAPI's ``{"detail": "Not Found"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_fixed

from service.config import Settings
from service.engine.discovery import resolve_urls

CONNECT_TIMEOUT_S = 2.0
_TRANSPORT_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError)
_MAX_MESSAGE = 500


class ReplicaError(Exception):
    """A replica call failed. ``status`` is the HTTP status, or None when no response came back."""

    def __init__(self, url: str, op: str, status: int | None, message: str) -> None:
        shown = status if status is not None else "no response"
        super().__init__(f"{op} on {url} failed ({shown}): {message}")
        self.url = url
        self.op = op
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str, int | None, str]]:
        # Keep the four-field signature through pickling (Celery results, multiprocessing).
        return (type(self), (self.url, self.op, self.status, self.message))


class ReplicaUnreachable(ReplicaError):
    """No connection was made (refused, reset, DNS, connect timeout): nothing reached vLLM."""

    # True when the failure was immediate (refused/reset), which makes a GET retry cheap.
    refused: bool = False


class AlreadyLoaded(ReplicaError):
    """vLLM already holds an adapter under this name (400)."""


class AdapterPathMissing(ReplicaError):
    """vLLM found no adapter at the given path (404); the path is as the replica sees it."""


@dataclass(frozen=True)
class ModelCard:
    """One entry of GET /v1/models: the base model has parent None, adapters name their base."""

    id: str
    root: str | None
    parent: str | None
    max_model_len: int | None = None  # the engine's context, on the base model's card


class VllmAdmin:
    """Admin client for one vLLM OpenAI server (base URL without /v1)."""

    def __init__(self, base_url: str, *, client: httpx.AsyncClient | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 get_retries: int = 2, retry_wait_s: float = 0.2) -> None:
        self.base_url = base_url.rstrip("/")
        # Passed on every request so a shared client's own defaults never apply here.
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=self._timeout)
        self._get_retries = get_retries
        self._retry_wait_s = retry_wait_s

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> VllmAdmin:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # -- read-only endpoints ------------------------------------------------------------------

    async def health(self) -> bool:
        """True when GET /health answers 200; any error or other status is False."""
        try:
            resp = await self._get("health", "/health")
        except ReplicaError:
            return False
        return resp.status_code == 200

    async def list_models(self) -> list[ModelCard]:
        """GET /v1/models: the base model and every loaded adapter."""
        resp = self._ok(await self._get("list_models", "/v1/models"), "list_models")
        data = self._json(resp, "list_models")
        try:
            return [ModelCard(id=str(m["id"]), root=m.get("root"), parent=m.get("parent"),
                              max_model_len=m.get("max_model_len")
                              if isinstance(m.get("max_model_len"), int) else None)
                    for m in data["data"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise self._error("list_models", resp.status_code,
                              f"unexpected /v1/models body: {e!r}") from e

    async def loaded_loras(self) -> set[str]:
        """Names of the adapters the replica holds (models with a parent)."""
        return {m.id for m in await self.list_models() if m.parent is not None}

    async def metrics_text(self) -> str:
        """GET /metrics as Prometheus text."""
        return self._ok(await self._get("metrics", "/metrics"), "metrics").text

    # -- runtime LoRA -------------------------------------------------------------------------

    async def load_lora(self, name: str, path: str) -> None:
        """Load an adapter under a new name.

        Raises AlreadyLoaded, AdapterPathMissing, or ReplicaError. Never retried: a timed-out load
        may still complete on the replica, so the caller must look (loaded_loras) before acting.
        """
        op = "load_lora"
        resp = await self._send(op, "POST", "/v1/load_lora_adapter",
                                json={"lora_name": name, "lora_path": path})
        if resp.status_code == 200:
            return
        msg, is_vllm_error = self._error_message(resp)
        low = msg.lower()
        if resp.status_code == 400 and is_vllm_error and "already" in low and "loaded" in low:
            raise AlreadyLoaded(self.base_url, op, 400, msg)
        if resp.status_code == 404 and is_vllm_error:
            raise AdapterPathMissing(self.base_url, op, 404, f"{msg} (path {path!r})")
        if resp.status_code == 404:
            msg += " (is VLLM_ALLOW_RUNTIME_LORA_UPDATING=True set on the replica?)"
        raise self._error(op, resp.status_code, msg)

    async def unload_lora(self, name: str) -> bool:
        """Unload an adapter; True if it was loaded, False if the replica did not know it."""
        op = "unload_lora"
        resp = await self._send(op, "POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if resp.status_code == 200:
            return True
        msg, is_vllm_error = self._error_message(resp)
        low = msg.lower()
        # 0.32 answers 404 "cannot be found"; older versions used 400. A bare route 404 (runtime
        # updating disabled) is not a vLLM error body and must not pass as "already unloaded".
        unknown = ("cannot be found" in low or "not found" in low) and "lora" in low
        if is_vllm_error and resp.status_code in (400, 404) and unknown:
            return False
        if resp.status_code == 404 and not is_vllm_error:
            msg += " (is VLLM_ALLOW_RUNTIME_LORA_UPDATING=True set on the replica?)"
        raise self._error(op, resp.status_code, msg)

    async def smoke(self, model_name: str, prompt: str = "Hello", max_tokens: int = 4) -> str:
        """One non-streaming chat completion at temperature 0; returns the text ("" if none)."""
        return await self.complete(model_name, [{"role": "user", "content": prompt}], max_tokens,
                                   op="smoke")

    async def complete(self, model_name: str, messages: list[dict], max_tokens: int, *,
                       request: dict | None = None, op: str = "complete") -> str:
        """A greedy chat completion of a whole conversation; returns the text ("" if none).
        `request` adds the original request's other fields (tools, chat_template_kwargs, ...)
        so the prompt is rendered as it was served."""
        body = {**(request or {}), "model": model_name, "messages": messages,
                "max_tokens": max_tokens, "temperature": 0, "stream": False}
        resp = self._ok(await self._send(op, "POST", "/v1/chat/completions", json=body), op)
        data = self._json(resp, op)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices:
            raise self._error(op, resp.status_code, f"no choices in completion for {model_name!r}")
        try:
            content = choices[0]["message"].get("content")
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise self._error(op, resp.status_code, f"malformed choice: {e!r}") from e
        return content or ""

    # -- plumbing -----------------------------------------------------------------------------

    async def _get(self, op: str, path: str) -> httpx.Response:
        # Only GETs are retried, and only when the connection was refused/reset: nothing reached
        # the server, and it is quick. A connect timeout has already cost its full budget.
        retrying = AsyncRetrying(
            retry=retry_if_exception(_refused),
            stop=stop_after_attempt(1 + self._get_retries),
            wait=wait_fixed(self._retry_wait_s),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._send(op, "GET", path)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, op: str, method: str, path: str,
                    json: dict[str, Any] | None = None) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            return await self._client.request(method, url, json=json, timeout=self._timeout)
        except httpx.ConnectError as e:
            err = ReplicaUnreachable(self.base_url, op, None,
                                     f"connect failed: {e or type(e).__name__}")
            err.refused = True
            raise err from None
        except httpx.ConnectTimeout:
            raise ReplicaUnreachable(self.base_url, op, None,
                                     f"ConnectTimeout after {self._timeout.connect}s") from None
        except httpx.PoolTimeout:
            raise self._error(op, None, "PoolTimeout: no free connection in the client") from None
        except httpx.TimeoutException as e:
            raise self._error(op, None, f"{type(e).__name__} after {self._timeout.read}s (the "
                              "request was sent: its effect on the replica is unknown)") from None
        except _TRANSPORT_ERRORS as e:
            raise self._error(op, None, f"{type(e).__name__}: {e}") from None

    def _ok(self, resp: httpx.Response, op: str) -> httpx.Response:
        if resp.status_code != 200:
            raise self._error(op, resp.status_code, self._error_message(resp)[0])
        return resp

    def _json(self, resp: httpx.Response, op: str) -> Any:
        try:
            return resp.json()
        except ValueError as e:
            raise self._error(op, resp.status_code, f"response is not JSON: {e}") from None

    @staticmethod
    def _error_message(resp: httpx.Response) -> tuple[str, bool]:
        """(message, whether the body is vLLM's {"error": {...}} shape)."""
        try:
            body = resp.json()
        except ValueError:
            return resp.text[:_MAX_MESSAGE] or resp.reason_phrase, False
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message", ""))[:_MAX_MESSAGE], True
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])[:_MAX_MESSAGE], False
        return resp.text[:_MAX_MESSAGE], False

    def _error(self, op: str, status: int | None, message: str) -> ReplicaError:
        return ReplicaError(self.base_url, op, status, message)


def _refused(e: BaseException) -> bool:
    return isinstance(e, ReplicaUnreachable) and e.refused


@contextlib.asynccontextmanager
async def replica_admins(urls: Sequence[str], *, timeout_s: float = 120.0
                         ) -> AsyncIterator[list[VllmAdmin]]:
    """One admin client per replica URL for an engine operation; all closed on exit."""
    admins = [VllmAdmin(u, timeout_s=timeout_s) for u in urls]
    try:
        yield admins
    finally:
        await asyncio.gather(*(a.aclose() for a in admins), return_exceptions=True)


@contextlib.asynccontextmanager
async def replica_admins_for(settings: Settings, *, timeout_s: float = 120.0
                             ) -> AsyncIterator[list[VllmAdmin]]:
    """Admin clients for the deployment's replicas (FLYWHEEL_VLLM_URLS, each name resolved into
    its replicas: service.engine.discovery); all closed on exit.

    The one way the CLI, the API and the worker open them."""
    async with replica_admins(await resolve_urls(settings.vllm_url_list),
                              timeout_s=timeout_s) as admins:
        yield admins
