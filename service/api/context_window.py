"""A chat request must fit the engine's context: refused by the gateway, before vLLM is called.

The engines report their context (`max_model_len` on the base model's card in GET /v1/models;
the replica observer keeps it). Counting tokens exactly takes a round trip to vLLM's /tokenize,
so it is done only when a request could be too long: a byte-level BPE or byte-fallback tokenizer
never makes more tokens than the rendered text has bytes, so when the messages' UTF-8 bytes plus
room for the chat template's own text plus the answer's max_tokens fit, the request fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from service.engine.replicas import ReplicaPool

# Room for what a chat template adds around the messages (role markers, a default system prompt:
# SmolLM2's is ~70 bytes, Llama 3.1's date header ~100), per request and per message.
TEMPLATE_BYTES = 1024
TEMPLATE_BYTES_PER_MESSAGE = 64


@dataclass
class ContextTooLong(Exception):
    """The prompt (plus the answer's token budget) does not fit the engine's context."""

    limit: int
    prompt_tokens: int
    completion_tokens: int

    def message(self) -> str:
        asked = (f"{self.prompt_tokens} in the messages and {self.completion_tokens} for the "
                 f"completion" if self.completion_tokens else f"{self.prompt_tokens} in the messages")
        return (f"This model's maximum context length is {self.limit} tokens. However, you "
                f"requested {self.prompt_tokens + self.completion_tokens} tokens ({asked}). "
                "Please reduce the length of the messages or max_tokens.")


def completion_budget(payload: dict[str, Any]) -> int:
    """The answer's token budget the caller asked for (0: as much as fits)."""
    return int(payload.get("max_completion_tokens") or payload.get("max_tokens") or 0)


def byte_bound(payload: dict[str, Any]) -> int | None:
    """An upper bound on the prompt's tokens, or None when the template may expand unknown text
    (tools and template kwargs are rendered by the template in ways bytes do not bound)."""
    if payload.get("tools") or payload.get("chat_template_kwargs") or payload.get("chat_template"):
        return None
    messages = payload.get("messages") or []
    text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return (len(text.encode("utf-8", "surrogatepass")) + TEMPLATE_BYTES
            + TEMPLATE_BYTES_PER_MESSAGE * len(messages))


async def count_prompt_tokens(pool: ReplicaPool, model: str, payload: dict[str, Any]) -> int | None:
    """The prompt's tokens as vLLM renders them (POST /tokenize), or None if no replica answers."""
    body = {"model": model, "messages": payload.get("messages") or [], "add_generation_prompt": True}
    for key in ("tools", "chat_template_kwargs", "chat_template"):
        if payload.get(key) is not None:
            body[key] = payload[key]
    for replica in pool.up():
        try:
            r = await replica.client.post("/tokenize", json=body)
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            count = r.json().get("count")
            return int(count) if isinstance(count, int) else None
        return None  # vLLM refused the messages: it will say why when the request is sent
    return None


async def check_fits(pool: ReplicaPool, model: str, payload: dict[str, Any]) -> int | None:
    """Raise ContextTooLong when the request cannot fit; return the exact count when one was
    made (None when the cheap bound settled it, or the engines' context is not known yet)."""
    limit = pool.context_len()
    if limit is None:
        return None  # not observed yet: vLLM still refuses what does not fit
    budget = completion_budget(payload)
    bound = byte_bound(payload)
    if bound is not None and bound + max(budget, 1) <= limit:
        return None
    count = await count_prompt_tokens(pool, model, payload)
    if count is not None and count + max(budget, 1) > limit:
        raise ContextTooLong(limit=limit, prompt_tokens=count, completion_tokens=budget)
    return count
