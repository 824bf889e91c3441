"""Short-lived download links for export files: a browser or curl can then stream a multi-GB GGUF
straight to disk, which a fetch with an Authorization header (held in memory) cannot.

A link is a random token; Redis keeps only its sha256 (like API keys), with what it opens and a
TTL, so every API process honours every link and an expired one simply is not found. A one-time
link is kept under its own prefix and taken with GETDEL: of two concurrent downloads exactly one
gets the file.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

_PREFIX = "fw:dl:"
_ONCE = "fw:dl1:"


@dataclass(frozen=True)
class LinkTarget:
    export_id: uuid.UUID
    name: str
    tenant_id: str


def _key(token: str, prefix: str = _PREFIX) -> str:
    return prefix + hashlib.sha256(token.encode()).hexdigest()


async def create_link(redis: Redis, target: LinkTarget, ttl_s: int, *, one_time: bool = False) -> str:
    """A new token opening ``target`` for ``ttl_s`` seconds, or for one download within them
    (raises RedisError when Redis is down)."""
    token = secrets.token_urlsafe(32)
    await redis.set(_key(token, _ONCE if one_time else _PREFIX),
                    json.dumps({"export_id": str(target.export_id), "name": target.name,
                                "tenant_id": target.tenant_id}), ex=ttl_s)
    return token


async def resolve_link(redis: Redis, token: str) -> LinkTarget | None:
    """What the token opens, or None when it is unknown, expired or (one-time) already used."""
    raw = await redis.getdel(_key(token, _ONCE))
    if raw is None:
        raw = await redis.get(_key(token))
    if raw is None:
        return None
    data = json.loads(raw)
    return LinkTarget(uuid.UUID(data["export_id"]), data["name"], data["tenant_id"])
