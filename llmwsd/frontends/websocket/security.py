"""What the public port lets in: TLS, Host names, browser origins, connections, tokens, rates.

The Host check (:meth:`Gatekeeper.check_host`) runs on every request, plain
HTTP too; the handshake checks (:meth:`Gatekeeper.check_handshake`) run before any
WebSocket frame is read, and answer with a plain HTTP status a person can
read; the per-message rate limit runs inside a connection.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import re
import socket
import ssl
import time
import weakref
from collections import Counter
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from llmwsd.auth import Authenticator, Identity
from llmwsd.config import Config
from llmwsd.errors import ConfigError
from llmwsd.frontends.websocket.http import response

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


# An HTTP status and the sentence that says why: what a check refuses a request with.
Refusal = tuple[int, str]


def _forbidden(status: int, text: str) -> Response:
    return response(status, (text + "\n").encode(), "text/plain; charset=utf-8")


# A DNS name as it appears in a Host header (IDNs come punycoded); lower case by then.
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def _ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_name(value: str) -> str | None:
    """The name in a Host header: lower case, without the port, IPv6 brackets or final dot.

    None when ``value`` is not ``host[:port]`` (an IPv6 address must be in brackets).
    """
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        if not bracket or not re.fullmatch(r"(:[0-9]*)?", port) or ":" not in name:
            return None
        return name if _ip_address(name) else None
    name, _, port = value.partition(":")
    if not re.fullmatch(r"[0-9]*", port):
        return None
    name = name.removesuffix(".")  # "localhost." is the same name, fully qualified
    return name if _HOST_NAME.fullmatch(name) else None


@functools.cache
def machine_names() -> frozenset[str]:
    """This machine's own names (cached: getfqdn may ask DNS, and they do not change)."""
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(n for n in (host_name(name) for name in names) if n)


@dataclasses.dataclass(frozen=True)
class HostAllowList:
    """The Host names the public port answers to: its defence against DNS rebinding.

    A page on ``http://evil.example:8765`` whose name the attacker re-points at
    this machine reaches llmwsd with ``Host: evil.example:8765`` (and a matching
    ``Origin``), so the Host, not the Origin, is what tells such a request apart.
    Allowed: any IP address (a browser sends one only when its user typed it, never
    after a DNS lookup), ``localhost``, this machine's names, the name ``[server]
    host`` binds and the names in ``[server] allowed_hosts``; ``"*"`` there allows
    any. Names match exactly, ignoring case, the port and a final dot.
    """

    names: frozenset[str]
    any_host: bool = False

    @classmethod
    def from_config(cls, config: Config) -> HostAllowList:
        names = {"localhost", *machine_names()}
        bound = host_name(config.server.host)
        if bound and not _ip_address(bound):
            names.add(bound)
        any_host = False
        for i, entry in enumerate(config.server.allowed_hosts):
            if entry.strip() == "*":
                any_host = True
                continue
            if _ip_address(entry.strip().strip("[]")):
                continue  # every address is allowed anyway
            name = host_name(entry)
            if name is None:
                raise ConfigError(
                    f"{config.source or '<defaults>'}: [server] allowed_hosts[{i}]: "
                    f'{entry!r} is not a host name (a name such as llm.example.org, or "*")'
                )
            names.add(name)
        return cls(frozenset(names), any_host)

    def allows(self, name: str) -> bool:
        return self.any_host or name in self.names or _ip_address(name)

    def describe(self) -> str:
        if self.any_host:
            return 'any Host name ([server] allowed_hosts has "*")'
        return "IP addresses and the Host names " + ", ".join(sorted(self.names))


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
    def __init__(self, config: Config, auth: Authenticator) -> None:
        self.config = config
        self.auth = auth
        self.hosts = HostAllowList.from_config(config)  # [server] applies at start only
        log.info("the public port answers to %s", self.hosts.describe())
        self.open_by_address: Counter[str] = Counter()
        self._handshake_tokens: weakref.WeakKeyDictionary[ServerConnection, str] = (
            weakref.WeakKeyDictionary()
        )

    # -- every request -----------------------------------------------------------------

    def check_host(self, connection: ServerConnection, request: Request) -> Response | None:
        """None when the request's Host is one llmwsd answers to; a 400 or 421 otherwise."""
        refusal = self.host_refusal(
            client_address(connection),
            request.headers.get_all("Host"),
            http10=request.protocol == "HTTP/1.0",
        )
        return None if refusal is None else _forbidden(*refusal)

    def host_refusal(self, address: str, values: list[str], http10: bool) -> Refusal | None:
        """The Host check on its own, for any HTTP server on the port: a status and a reason."""
        if not values and http10:
            return None  # HTTP/1.0 has no Host; browsers always send one
        name = host_name(values[0]) if len(values) == 1 else None
        if name is not None and self.hosts.allows(name):
            return None
        if name is None:
            log.info(
                "%s: refused a request with Host headers %r", address, [v[:200] for v in values[:3]]
            )
            return 400, "bad request: HTTP/1.1 needs one Host header, host[:port]"
        log.warning(
            "%s: refused a request for Host %r: not in [server] allowed_hosts "
            "(a DNS rebinding attempt, or a name to add there)",
            address,
            values[0][:200],
        )
        return 421, f"llmwsd does not answer to the name {name!r}: add it to [server] allowed_hosts"

    # -- the handshake ---------------------------------------------------------------

    def check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """None to let a WebSocket upgrade go on; an HTTP answer to refuse it."""
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, request.headers.get("Host", "")):
            log.info("refused a browser connection from origin %r", origin[:200])
            return _forbidden(403, "origin not allowed: add it to [api] allowed_origins")
        refusal = self.connection_refusal(client_address(connection))
        if refusal is not None:
            return _forbidden(*refusal)
        token = bearer_token(request)
        if token is not None:
            self._handshake_tokens[connection] = token
        return None

    def connection_refusal(self, address: str) -> Refusal | None:
        """Whether one more connection from ``address`` is over [limits]: a status and a reason."""
        limits = self.config.limits
        if sum(self.open_by_address.values()) >= limits.max_connections:
            return 503, "too many connections: try again later"
        if self.open_by_address[address] >= limits.max_connections_per_address:
            return 429, "too many connections from this address"
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        """A listed origin (whole, never a prefix), or the page's own: scheme, host and port."""
        allowed = self.config.api.allowed_origins
        if "*" in allowed or origin.lower() in (o.lower() for o in allowed):
            return True
        # Same origin as the page: this port's scheme, and the Host the browser asked for.
        scheme = "https" if self.config.server.tls_cert else "http"
        return origin.lower() == f"{scheme}://{host.lower()}" and host != ""

    def opened(self, connection: ServerConnection | str) -> None:
        """Count a connection (a WebSocket one, or an HTTP one by its address)."""
        address = connection if isinstance(connection, str) else client_address(connection)
        self.open_by_address[address] += 1

    def closed(self, connection: ServerConnection | str) -> None:
        address = connection if isinstance(connection, str) else client_address(connection)
        self.open_by_address[address] -= 1
        if self.open_by_address[address] <= 0:
            del self.open_by_address[address]

    # -- tokens ----------------------------------------------------------------------

    def identify(self, connection: ServerConnection, hello_token: object) -> Identity | str:
        """The connection's identity, or the reason to refuse it (a sentence)."""
        token = self._handshake_tokens.get(connection)
        if token is None and isinstance(hello_token, str):
            token = hello_token
        return self.identify_token(client_address(connection), token)

    def identify_token(self, address: str, token: str | None) -> Identity | str:
        """Who ``token`` proves its bearer at ``address`` is, or why it is refused (a sentence)."""
        wait = self.auth.limiter.retry_after(address)
        if wait:
            return f"too many failed token attempts from this address; retry in {wait:g} s"
        identity = self.auth.identify(token)
        if identity is None:
            self.auth.limiter.failed(address)
            return "a valid access token is required" if token else "an access token is required"
        return identity

    def message_rate(self) -> MessageRate:
        return MessageRate(self.config.limits.messages_per_second, self.config.limits.message_burst)


def bearer_of(authorization: str) -> str | None:
    """The token in an ``Authorization: Bearer …`` header's value; None for another scheme."""
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else None


def bearer_token(request: Request) -> str | None:
    """The token from ``Authorization: Bearer …`` or, for browsers, ``?token=…``."""
    token = bearer_of(request.headers.get("Authorization", ""))
    if token is not None:
        return token
    values = parse_qs(urlsplit(request.path).query).get("token")
    return values[0] if values else None
