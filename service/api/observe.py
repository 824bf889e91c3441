"""Request count and latency by route template, as a pure ASGI middleware (no body buffering)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import HTTP_LATENCY, HTTP_REQUESTS


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The template, not the raw path, so ids do not explode label cardinality.
            path = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(path, scope["method"], str(status)).inc()
            HTTP_LATENCY.labels(path).observe(time.perf_counter() - started)
