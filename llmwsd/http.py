"""Plain HTTP on the WebSocket port: the web page, /healthz and /metrics.

websockets hands every request to :func:`HttpRoutes.process_request` first; a
WebSocket upgrade goes on to the handshake, anything else is answered here.
Static files are served from a listing made at start, so no request path is
ever joined to a filesystem path.
"""

from __future__ import annotations

import email.utils
import http
import json
import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


def response(status: int, body: bytes, content_type: str, **headers: str) -> Response:
    status_ = http.HTTPStatus(status)
    all_headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-cache"),
        ]
    )
    for name, value in headers.items():
        all_headers[name.replace("_", "-")] = value
    return Response(status_.value, status_.phrase, all_headers, body)


def json_response(status: int, data: dict[str, Any]) -> Response:
    return response(status, json.dumps(data).encode(), "application/json")


def find_web_root(configured: str) -> Path | None:
    """The web page's folder: the configured one, the installed one, or the source tree's."""
    candidates = [Path(configured)] if configured else []
    candidates += [
        Path("/usr/share/llmws/web"),
        Path(__file__).resolve().parent.parent / "share" / "web",
    ]
    for candidate in candidates:
        if (candidate / "index.html").is_file():
            return candidate
    return None


class HttpRoutes:
    def __init__(self, web_root: Path | None, health: HealthFn, metrics: Callable[[], bytes]):
        self.health = health
        self.metrics = metrics
        self.files: dict[str, Path] = {}
        if web_root is not None:
            for file in web_root.rglob("*"):
                if file.is_file() and not file.name.startswith("."):
                    self.files["/" + file.relative_to(web_root).as_posix()] = file
            if "/index.html" in self.files:
                self.files["/"] = self.files["/index.html"]

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            ready, body = self.health()
            return json_response(200 if ready else 503, body)
        if path == "/metrics":
            return response(200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        file = self.files.get(path)
        if file is not None:
            content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            if content_type.startswith("text/") or content_type.endswith("javascript"):
                content_type += "; charset=utf-8"
            return response(
                200,
                file.read_bytes(),
                content_type,
                Content_Security_Policy="default-src 'self'; connect-src 'self' ws: wss:; "
                "img-src 'self' data:; style-src 'self' 'unsafe-inline'",
            )
        if path == "/":
            page = (
                b"<!doctype html><title>llmws</title><p>llmwsd is running: connect over WebSocket."
            )
            return response(200, page, "text/html; charset=utf-8")
        return response(404, b"not found\n", "text/plain; charset=utf-8")
