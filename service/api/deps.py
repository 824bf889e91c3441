"""FastAPI dependencies as Annotated aliases: the state, the caller, and role checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.api.errors import ApiError
from service.api.state import AppState
from service.db.repositories import Principal
from service.security import hash_key


# async, though it awaits nothing: FastAPI runs a sync dependency in its thread pool, a
# thread hop on every request (measured in bench/bench_feedback.py).
async def get_state(request: Request) -> AppState:
    return request.app.state.fw


State = Annotated[AppState, Depends(get_state)]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def get_principal(request: Request, state: State,
                        authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The caller, from `Authorization: Bearer <key>`; 401 when missing, malformed or revoked,
    429 for an address past its failed-lookup limit (valid cached keys still pass)."""
    if not authorization:
        raise ApiError(401, "missing API key: send Authorization: Bearer <key>",
                       code="missing_api_key", headers=_CHALLENGE)
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'",
                       code="invalid_api_key", headers=_CHALLENGE)
    key_hash = hash_key(key.strip())
    if (principal := state.cached_principal(key_hash)) is not None:
        return principal
    addr = request.client.host if request.client else "unknown"
    if (wait := state.failed_auth.begin(addr)) is not None:
        raise ApiError(429, f"too many failed authentications from this address; retry in {wait} s",
                       code="auth_rate_limited", headers={"Retry-After": str(wait)})
    principal = await state.principal(key_hash)
    if principal is None:
        raise ApiError(401, "invalid or revoked API key", code="invalid_api_key", headers=_CHALLENGE)
    state.failed_auth.succeeded(addr)
    return principal


Caller = Annotated[Principal, Depends(get_principal)]


async def require_ops(principal: Caller) -> Principal:
    if principal.role != "ops":
        raise ApiError(403, "this endpoint needs an ops key", code="forbidden")
    return principal


OpsCaller = Annotated[Principal, Depends(require_ops)]


def owner_filter(principal: Principal):
    """Product keys see only what they created; ops keys see their whole tenant."""
    return None if principal.role == "ops" else principal.key_id
