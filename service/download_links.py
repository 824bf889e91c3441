"""Short-lived download links for export files: a browser or curl can then stream a multi-GB GGUF
straight to disk, which a fetch with an Authorization header (held in memory) cannot.

A link is a random token; Redis keeps only its sha256 (like API keys), with what it opens and a
TTL, so every API process honours every link and an expired one simply is not found.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

_PREFIX = "fw:dl:"


@dataclass(frozen=True)
class LinkTarget:
    export_id: uuid.UUID
    name: str
    tenant_id: str


def _key(token: str) -> str:
    return _PREFIX + hashlib.sha256(token.encode()).hexdigest()


async def create_link(redis: Redis, target: LinkTarget, ttl_s: int) -> str:
    """A new token opening ``target`` for ``ttl_s`` seconds (raises RedisError when Redis is down)."""
    token = secrets.token_urlsafe(32)
    await redis.set(_key(token), json.dumps({"export_id": str(target.export_id),
                                             "name": target.name, "tenant_id": target.tenant_id}),
                    ex=ttl_s)
    return token


async def resolve_link(redis: Redis, token: str) -> LinkTarget | None:
    """What the token opens, or None when it is unknown or expired."""
    raw = await redis.get(_key(token))
    if raw is None:
        return None
    data = json.loads(raw)
    return LinkTarget(uuid.UUID(data["export_id"]), data["name"], data["tenant_id"])
