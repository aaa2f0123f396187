"""The HTTP APIs on the public port: OpenAI's and Anthropic's, beside the WebSocket API.

Why aiohttp's low-level server, taking over connections from websockets: websockets stays
the port's listener, so the WebSocket API, its close codes, frame and rate limits, TLS,
origin checks and the plain GET routes stay exactly what they were; a connection whose
first request is under ``/v1/`` is handed over (websocket/http.py, PublicConnection) to
aiohttp's HTTP/1.1 protocol, which parses requests and bodies in C, keeps connections
alive for the SDKs' clients, streams server-sent events and cancels a request's handler
when its client hangs up. uvicorn (what vLLM and SGLang run) would have meant moving the
WebSocket API onto ASGI: a second implementation of everything the first wave tested.

Every request goes through one pipeline (:meth:`ApiServer.handle`): the Host check, the
browser Origin (as for WebSocket), the route, the token (``Authorization: Bearer`` or
``x-api-key``), the per-address request rate, a body no larger than ``[server]
max_message_size`` read within ``[server] hello_timeout``, then the route's handler; the
connection caps apply when a connection is handed over. Every error is answered in the
API's own shape (errors.py) and counted in /metrics by API and status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from llmwsd.auth import Identity
from llmwsd.errors import (
    BadRequest,
    Forbidden,
    InternalError,
    InvalidJSON,
    LLMWSError,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    RequestTimeout,
    TooLarge,
    Unauthorized,
)
from llmwsd.frontends.http.errors import anthropic_error, openai_error, status_of
from llmwsd.frontends.websocket.http import HttpRoutes, response
from llmwsd.frontends.websocket.security import Gatekeeper, MessageRate, bearer_of

if TYPE_CHECKING:
    from llmwsd.service.services import Services

log = logging.getLogger("llmwsd.http")

B = TypeVar("B", bound=BaseModel)

# Set on a request whose answer is a stream that has begun (generation.EventStream).
STREAMING = web.RequestKey("llmws_streaming", bool)


@dataclass
class Call:
    """One request on its way through: who sent it, for which API, and its body."""

    request: web.BaseRequest
    address: str
    api: str  # "openai" or "anthropic": the shape of its errors
    endpoint: str  # for the log and /metrics
    params: dict[str, str]  # the route's named parts
    identity: Identity | None = None
    raw_body: bytes = b""

    def body(self, model: type[B]) -> B:
        """The body as ``model``, or BadRequest naming the first field that is wrong."""
        try:
            data = json.loads(self.raw_body)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidJSON(f"the request body is not JSON: {e}") from None
        except RecursionError:
            raise InvalidJSON("the request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise InvalidJSON("the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(part) for part in first["loc"])
            raise BadRequest(f"{param or 'body'}: {first['msg']}", param=param or None) from None

    @property
    def who(self) -> str:
        return f"{self.address}: {self.endpoint}"


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    endpoint: str
    api: str = "openai"


def route(method: str, path: str, handler: Handler, endpoint: str, api: str = "openai") -> Route:
    """``path`` with ``{name}`` parts, each matching one segment of letters, digits, - and _."""
    pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[A-Za-z0-9_-]{1,200})", path)
    return Route(method, re.compile(pattern + "/?"), handler, endpoint, api)


class _Connections(web.Server):
    """aiohttp's server, counting each connection against the port's caps while it is open."""

    def __init__(self, gate: Gatekeeper, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.addresses: dict[Any, str] = {}

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.addresses[handler] = peer_address(transport)
        self.gate.opened(self.addresses[handler])

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        address = self.addresses.pop(handler, None)
        if address is not None:
            self.gate.closed(address)


def peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class ApiServer:
    def __init__(self, services: Services, gate: Gatekeeper, plain: HttpRoutes) -> None:
        self.services = services
        self.gate = gate
        self.plain = plain  # /healthz, /metrics and the page, on a connection kept alive
        config = services.config()
        self.server_config = config.server
        self.limits = config.limits
        self.rates: dict[str, MessageRate] = {}
        self.routes: list[Route] = []
        self._web: _Connections | None = None

    def add(self, routes: list[Route]) -> None:
        self.routes += routes

    # -- connections -------------------------------------------------------------------

    def hand_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """Take a connection whose first request is for /v1/, with what was read of it."""
        address = peer_address(transport)
        refusal = self.gate.connection_refusal(address)
        if refusal is not None:
            status, reason = refusal
            body = json.dumps(openai_error(RateLimited(reason))).encode()
            answer = response(status, body, "application/json")
            transport.write(answer.serialize())
            transport.close()
            return
        if self._web is None:
            self._web = _Connections(
                self.gate,
                self.handle,
                handler_cancellation=True,  # a client that hangs up cancels its request
                keepalive_timeout=self.limits.idle_timeout or 3600,
                max_line_size=8190,
                max_field_size=8190,
                access_log=None,
            )
        protocol = self._web()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    async def close(self, timeout: float) -> None:
        """Close idle connections; requests running get up to ``timeout`` s, then are cancelled."""
        if self._web is not None:
            self._web.pre_shutdown()
            await self._web.shutdown(timeout)

    # -- requests ----------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        address = peer_address(request.transport) if request.transport else "?"
        found, params = self._match(request)
        api = (
            found.api
            if found
            else ("anthropic" if request.path.startswith("/v1/messages") else "openai")
        )
        call = Call(request, address, api, found.endpoint if found else "unknown", params)
        try:
            answer = await self._serve(call, found)
        except LLMWSError as e:
            answer = self.error(call, e)
        except ConnectionError:
            raise  # the client left mid-answer: nobody to answer
        except Exception:
            log.exception("%s: failed", call.who)
            if STREAMING in call.request:
                raise  # its 200 went out: aiohttp ends the connection
            answer = self.error(call, InternalError("internal error: the daemon's log says more"))
        self.services.metrics.http_request(call.api, call.endpoint, answer.status)
        return answer

    def _match(self, request: web.BaseRequest) -> tuple[Route | None, dict[str, str]]:
        allowed = False
        for candidate in self.routes:
            match = candidate.pattern.fullmatch(request.path)
            if match is None:
                continue
            if candidate.method == request.method:
                return candidate, match.groupdict()
            allowed = True
        if allowed:
            return Route(request.method, re.compile(""), _not_allowed, "wrong-method"), {}
        return None, {}

    async def _serve(self, call: Call, found: Route | None) -> web.StreamResponse:
        request = call.request
        refusal = self.gate.host_refusal(
            call.address, request.headers.getall("Host", []), http10=request.version < (1, 1)
        )
        if refusal is not None:
            return web.Response(status=refusal[0], text=refusal[1] + "\n")
        origin = request.headers.get("Origin")
        if origin is not None and not self.gate.origin_allowed(origin, request.host):
            # A page elsewhere may send a "simple" POST without asking first: refused here.
            raise Forbidden("origin not allowed: add it to [api] allowed_origins")
        if not request.path.startswith("/v1/") and request.path != "/v1":
            return self._plain(request)  # a kept-alive connection asking for a page
        if found is None:
            raise NotFound(f"no route {request.method} {request.path[:200]}")
        self._authenticate(call)
        rate = self.rates.setdefault(
            call.address, MessageRate(self.limits.messages_per_second, self.limits.message_burst)
        )
        if not rate.allow():
            raise RateLimited(
                f"more than {self.limits.messages_per_second:g} requests a second from this "
                "address: slow down"
            )
        if len(self.rates) > 4 * self.limits.max_connections:  # forget the quiet addresses
            for quiet in [a for a in self.rates if a not in self.gate.open_by_address]:
                del self.rates[quiet]
        call.raw_body = await self._read_body(request)
        return await found.handler(call)

    def _authenticate(self, call: Call) -> None:
        headers = call.request.headers
        token = bearer_of(headers.get("Authorization", ""))
        if token is None and "x-api-key" in headers:  # Anthropic's header
            token = headers["x-api-key"].strip()
        identity = self.gate.identify_token(call.address, token)
        if isinstance(identity, str):
            log.warning("%s: unauthorized: %s", call.who, identity)
            raise Unauthorized(identity)
        call.identity = identity

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.server_config.max_message_size
        if request.content_length is not None and request.content_length > limit:
            raise TooLarge(f"the request body is over {limit} bytes ([server] max_message_size)")
        timeout = self.server_config.hello_timeout or None
        body = bytearray()
        try:
            async with asyncio.timeout(timeout):
                while chunk := await request.content.read(65536):
                    body += chunk
                    if len(body) > limit:
                        raise TooLarge(
                            f"the request body is over {limit} bytes ([server] max_message_size)"
                        )
        except TimeoutError:
            raise RequestTimeout(f"the request body did not come within {timeout:g} s") from None
        return bytes(body)

    def _plain(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "GET":
            raise MethodNotAllowed("this path answers GET")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            raise BadRequest("open WebSocket connections on a connection of their own")
        answer = self.plain.route(request.path)
        return web.Response(
            status=answer.status_code,
            body=answer.body,
            headers={k: v for k, v in answer.headers.raw_items() if k.lower() in _KEPT_HEADERS},
        )

    def error(self, call: Call, error: LLMWSError) -> web.Response:
        status = status_of(error)
        if status >= 500 and error.code not in ("no_model",):
            log.error("%s: %s", call.who, error.message)
        else:
            log.info("%s: answered %d (%s)", call.who, status, error.code)
        body = anthropic_error(error) if call.api == "anthropic" else openai_error(error)
        headers = {"Allow": "POST, GET"} if status == 405 else {}
        if status == 429 or status == 503:
            headers["Retry-After"] = "1"
        return web.json_response(body, status=status, headers=headers)


_KEPT_HEADERS = (
    "content-type",
    "content-security-policy",
    "cache-control",
    "x-content-type-options",
)


async def _not_allowed(call: Call) -> web.StreamResponse:
    raise MethodNotAllowed(f"{call.request.method} is not allowed on {call.request.path[:200]}")
