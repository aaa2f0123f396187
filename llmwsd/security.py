"""What the public port lets in: TLS, browser origins, connection counts, tokens, message rates.

The handshake checks (:meth:`Gatekeeper.check_handshake`) run before any
WebSocket frame is read, and answer with a plain HTTP status a person can
read; the per-message rate limit runs inside a connection.
"""

from __future__ import annotations

import logging
import ssl
import time
import weakref
from collections import Counter
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from llmwsd.auth import Authenticator, Identity
from llmwsd.config import Config
from llmwsd.http import response

log = logging.getLogger("llmwsd.security")


def build_ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    """A server TLS context for ``cert``/``key``; None when TLS is not configured."""
    if not cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def client_address(connection: ServerConnection) -> str:
    address = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) else str(address)


def _forbidden(status: int, text: str) -> Response:
    return response(status, (text + "\n").encode(), "text/plain; charset=utf-8")


class MessageRate:
    """A token bucket: ``rate`` messages a second on average, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Gatekeeper:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.auth = Authenticator(
            config.api.tokens_file, config.api.admin_tokens_file, config.api.max_auth_failures
        )
        self.open_by_address: Counter[str] = Counter()
        self._handshake_tokens: weakref.WeakKeyDictionary[ServerConnection, str] = (
            weakref.WeakKeyDictionary()
        )

    # -- the handshake ---------------------------------------------------------------

    def check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """None to let a WebSocket upgrade go on; an HTTP answer to refuse it."""
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, request.headers.get("Host", "")):
            log.info("refused a browser connection from origin %r", origin[:200])
            return _forbidden(403, "origin not allowed: add it to [api] allowed_origins")
        address = client_address(connection)
        limits = self.config.limits
        if sum(self.open_by_address.values()) >= limits.max_connections:
            return _forbidden(503, "too many connections: try again later")
        if self.open_by_address[address] >= limits.max_connections_per_address:
            return _forbidden(429, "too many connections from this address")
        token = bearer_token(request)
        if token is not None:
            self._handshake_tokens[connection] = token
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        if origin in self.config.api.allowed_origins or "*" in self.config.api.allowed_origins:
            return True
        # Same origin as the page: the Origin's host:port is the Host the browser asked for.
        return urlsplit(origin).netloc.lower() == host.lower() != ""

    def opened(self, connection: ServerConnection) -> None:
        self.open_by_address[client_address(connection)] += 1

    def closed(self, connection: ServerConnection) -> None:
        address = client_address(connection)
        self.open_by_address[address] -= 1
        if self.open_by_address[address] <= 0:
            del self.open_by_address[address]

    # -- tokens ----------------------------------------------------------------------

    def identify(self, connection: ServerConnection, hello_token: object) -> Identity | str:
        """The connection's identity, or the reason to refuse it (a sentence)."""
        address = client_address(connection)
        wait = self.auth.limiter.retry_after(address)
        if wait:
            return f"too many failed token attempts from this address; retry in {wait:g} s"
        token = self._handshake_tokens.get(connection)
        if token is None and isinstance(hello_token, str):
            token = hello_token
        identity = self.auth.identify(token)
        if identity is None:
            self.auth.limiter.failed(address)
            return "a valid access token is required" if token else "an access token is required"
        return identity

    def message_rate(self) -> MessageRate:
        return MessageRate(self.config.limits.messages_per_second, self.config.limits.message_burst)


def bearer_token(request: Request) -> str | None:
    """The token from ``Authorization: Bearer …`` or, for browsers, ``?token=…``."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    values = parse_qs(urlsplit(request.path).query).get("token")
    return values[0] if values else None
