"""Request body checks before any route sees it: the size limit, enforced on the bytes actually
received (chunked bodies too), and text that is not Unicode (service.api.text_check)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.text_check import invalid_text


class BodyLimitMiddleware:
    """Answer 413 for bodies over max_bytes, whether Content-Length says so or the stream does,
    and 422 naming the field for a body whose text is not valid Unicode. `path_limits` gives
    routes whose body is a file (a feedback import) a limit of their own: (path regex, bytes)."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 path_limits: Sequence[tuple[str, int]] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = [(re.compile(pattern), limit) for pattern, limit in path_limits]

    def _limit(self, path: str) -> int:
        return next((limit for pattern, limit in self.path_limits if pattern.match(path)),
                    self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope.get("path", ""))
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._reject(send, limit)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await self._reject(send, limit)
                return
            if not message.get("more_body", False):
                break
        if (bad := invalid_text(bytes(body))) is not None:
            await self._send(send, 422, {"message": f"{bad[0]}: {bad[1]}",
                                         "type": "invalid_request_error", "param": bad[0],
                                         "code": "invalid_text"})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send, limit: int) -> None:
        await self._send(send, 413, {
            "message": f"request body exceeds the limit of {limit} bytes",
            "type": "request_too_large", "param": "body", "code": "body_too_large"})

    @staticmethod
    async def _send(send: Send, status: int, error: dict) -> None:
        payload = json.dumps({"error": error}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
