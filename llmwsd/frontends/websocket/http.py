"""Plain HTTP on the WebSocket port: the web page, /healthz and /metrics.

A connection whose first request is under ``/v1/`` goes to the HTTP APIs
(:class:`PublicConnection`). websockets hands every other request to
:func:`HttpRoutes.process_request` first; a WebSocket upgrade goes on to the
handshake, anything else is answered here.
Static files are served from a listing made at start, so no request path is
ever joined to a filesystem path. Only GET is answered (405 otherwise), and a
request websockets cannot parse gets a 400 (:class:`PublicConnection`).
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import logging
import mimetypes
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage
from websockets.http11 import Request, Response

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
# Takes a connection whose first request is for the HTTP APIs: its transport, the bytes read.
HandOver = Callable[[asyncio.Transport, bytes], None]

log = logging.getLogger("llmwsd.http")

_METHOD = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+) ")


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


def method_not_allowed() -> Response:
    body = b"method not allowed: this port answers GET (pages, /healthz, /metrics, WebSocket)\n"
    return response(405, body, "text/plain; charset=utf-8", Allow="GET")


def check_method(request: Request) -> Response | None:
    """None for GET, the only method served; 405 for any other."""
    return None if request.method == "GET" else method_not_allowed()


class _Released:
    """The transport of a connection handed to the HTTP APIs, as websockets then sees it.

    websockets aborts the transport of a connection whose handshake never came; once
    the connection belongs to the API server, that must not touch the socket.
    """

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True


def api_request_line(head: bytes) -> bool | None:
    """Whether a request starting with ``head`` is for the HTTP APIs (its path under /v1/);
    None while too little of its request line has come to tell."""
    line = head.split(b"\n", 1)
    _method, space, rest = line[0].partition(b" ")
    if not space:
        return None if len(line) == 1 and len(head) < 16 else False
    if len(rest) < 4:
        return None if len(line) == 1 else False
    return rest[:3] == b"/v1" and rest[3:4] in (b"/", b"?", b" ")


class PublicConnection(ServerConnection):
    """A connection on the public port: websockets' unless its first request is for /v1/.

    **The HTTP APIs.** websockets serves only GET (the WebSocket handshake and the
    routes here); the OpenAI- and Anthropic-compatible APIs need POST. The request line
    says which server a connection is for: one under ``/v1/`` is handed, with the bytes
    read so far, to the API server (``hand_over``: llmwsd.frontends.http), on the same
    TCP or TLS connection, before websockets has parsed anything; every other request
    stays websockets' exactly as before.

    **Requests websockets cannot parse** are answered with 400 (or 405). websockets 17
    parses the request line and headers in ``ServerProtocol.parse``; on a failure there
    (a garbled request line, an HTTP version other than 1.0/1.1, a malformed header, a
    request body) it sets ``handshake_exc`` to an ``InvalidMessage`` and queues only an
    EOF: ``process_request`` never runs, and the client would see the connection just
    close. ``send_data`` is where this class sees that EOF before it reaches the socket,
    so it writes the answer first. A parsed request with another method than GET goes
    on to ``process_request``, which answers 405 itself (:func:`check_method`).
    """

    _head = b""  # the first bytes received: whose request it is, and the method of a failure
    _decided = False
    _answered = False

    def __init__(self, *args: Any, hand_over: HandOver | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hand_over = hand_over

    def data_received(self, data: bytes) -> None:
        if self._decided:
            super().data_received(data)
            return
        self._head += data
        for_api = api_request_line(self._head)
        if for_api is None:
            return  # held until the request line says whose it is
        self._decided = True
        if for_api and self.hand_over is not None:
            transport, self.transport = self.transport, _Released()  # type: ignore[assignment]
            self.hand_over(transport, self._head)
            # Ends websockets' wait for a handshake: its handler returns without a word.
            self.connection_lost(None)
            return
        super().data_received(self._head)
        self._head = self._head[:32]

    def send_data(self) -> None:
        failure = self.protocol.handshake_exc
        if (
            self.request is None
            and not self._answered
            and isinstance(failure, InvalidMessage)
            # A client that left before a whole request arrived needs no answer.
            and not isinstance(failure.__cause__, EOFError)
        ):
            self._answered = True
            method = _METHOD.match(self._head)
            if method is not None and method.group(1) != b"GET":
                answer = method_not_allowed()
            else:
                reason = str(failure.__cause__ or failure)[:200]
                answer = response(
                    400, f"bad request: {reason}\n".encode(), "text/plain; charset=utf-8"
                )
            log.info(
                "%s: answered %d to a request that is not HTTP/1.1 GET: %r",
                self.remote_address[0] if self.remote_address else "?",
                answer.status_code,
                self._head,
            )
            self.transport.write(answer.serialize())
        super().send_data()


def find_web_root(configured: str) -> Path | None:
    """The web page's folder: the configured one, the installed one, or the source tree's."""
    candidates = [Path(configured)] if configured else []
    candidates += [
        Path("/usr/share/llmws/web"),
        Path(__file__).resolve().parents[3] / "share" / "web",  # the source tree
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
        return self.route(request.path)

    def route(self, target: str) -> Response:
        """The answer to a GET of ``target`` (a path, maybe with a query)."""
        path = target.split("?", 1)[0]
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
