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
        counted = False

        async def send_wrapper(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start":
                # Counted before the client can see the response, so a follow-up scrape sees it.
                HTTP_REQUESTS.labels(_route(scope), scope["method"], str(message["status"])).inc()
                counted = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not counted:
                HTTP_REQUESTS.labels(_route(scope), scope["method"], "500").inc()
            HTTP_LATENCY.labels(_route(scope)).observe(time.perf_counter() - started)


def _route(scope: Scope) -> str:
    # The template, not the raw path, so ids do not explode label cardinality.
    return getattr(scope.get("route"), "path", "unmatched")
