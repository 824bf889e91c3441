"""One error envelope for every failure, in OpenAI's shape so its SDKs surface the message."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg import DataError as PgDataError
from psycopg import OperationalError as PgOperationalError
from psycopg_pool import PoolTimeout as PgPoolTimeout
from sqlalchemy.exc import DataError as SqlDataError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """Raise from routes and deps to answer with a clear error."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None, details: Any = None) -> JSONResponse:
    error: dict[str, Any] = {"message": message, "type": _TYPES.get(status, "api_error"),
                             "param": param, "code": code}
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def unavailable(reason: str, retry_after_s: int, code: str) -> ApiError:
    return ApiError(503, reason, code=code, headers={"Retry-After": str(retry_after_s)})


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI, retry_after_s: int) -> None:
    """Register the handlers that turn every failure into the envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"field": _field(tuple(e.get("loc", ()))), "reason": e.get("msg", "")}
                   for e in exc.errors()]
        first = details[0] if details else {"field": "body", "reason": "invalid"}
        return error_response(422, f"{first['field']}: {first['reason']}", param=first["field"],
                              code="validation_error", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    async def _db_down(_: Request, exc: Exception) -> JSONResponse:
        return error_response(503, "database unavailable; retry shortly", code="database_unavailable",
                              headers={"Retry-After": str(retry_after_s)})

    for exc_type in (OperationalError, PoolTimeout, PgOperationalError, PgPoolTimeout):
        app.add_exception_handler(exc_type, _db_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback here, never sent to the client.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; it has been logged", code="internal_error")

    async def _unstorable(request: Request, exc: Exception) -> JSONResponse:
        # Validation should have caught it; still bad input, not a server fault.
        log.warning("value refused by the database on %s: %s", request.url.path, type(exc).__name__)
        return error_response(422, "a value in the request cannot be stored", code="invalid_value")

    @app.exception_handler(DBAPIError)
    async def _dbapi(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or isinstance(exc.orig, OSError):
            return await _db_down(request, exc)
        if isinstance(exc, SqlDataError):
            return await _unstorable(request, exc)
        return await _unexpected(request, exc)

    app.add_exception_handler(PgDataError, _unstorable)
