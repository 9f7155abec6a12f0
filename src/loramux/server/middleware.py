"""The server's ASGI middleware: a request body over the limit gets 413 before it is read, and every
request leaves one JSON log line (method, path, status, milliseconds until its last byte was sent).

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, which relays each chunk of a streamed
response through a memory stream and an extra task, and would log a stream when its headers leave
rather than when it ends. (Throughput was measured the same either way: docs/benchmarks.md.)
"""

from __future__ import annotations

import json
import logging
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loramux.server.protocol import APIError

log = logging.getLogger("loramux.server")


class LimitsAndLogs:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"")
        try:
            if length.isdigit() and int(length) > self.max_body_bytes:
                error = APIError(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes}")
                await JSONResponse(error.body(), status_code=413)(scope, receive, send_noting_status)
            else:
                await self.app(scope, receive, send_noting_status)
        finally:
            log.info(json.dumps({"method": scope["method"], "path": scope["path"], "status": status,
                                 "ms": round(1000 * (time.perf_counter() - started), 1)}))
