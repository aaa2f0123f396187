"""The public listener: HTTP routes, the hello timeout, and the two connection modes.

The first frame decides the mode (protocol.md): a JSON object starts JSON mode
(:class:`~llmwsd.frontends.websocket.connection.JsonConnection`); anything else is a legacy text
prompt, answered with plain text frames and a close with 1000.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from llmwsd.engines.interface import Failed, Finished, GenerationEvent, GenerationRequest, TokenText
from llmwsd.errors import LLMWSError, NoModel, Unauthorized
from llmwsd.frontends.http.anthropic import AnthropicApi
from llmwsd.frontends.http.openai import OpenAiApi
from llmwsd.frontends.http.responses import ResponsesApi
from llmwsd.frontends.http.server import ApiServer
from llmwsd.frontends.websocket.connection import JsonConnection
from llmwsd.frontends.websocket.http import (
    HttpRoutes,
    PublicConnection,
    check_method,
    find_web_root,
)
from llmwsd.frontends.websocket.security import Gatekeeper, build_ssl_context
from llmwsd.protocol import messages, wire
from llmwsd.protocol.close_codes import CloseCode

if TYPE_CHECKING:
    from llmwsd.service.services import Services

log = logging.getLogger("llmwsd.server")


def peer_name(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class PublicServer:
    def __init__(self, services: Services) -> None:
        self.services = services
        config = services.config()
        self.config = config.server  # [server] applies at start only
        self.routes = HttpRoutes(
            find_web_root(self.config.web_root), services.reports.health, services.metrics.render
        )
        self.gate = Gatekeeper(config, services.auth)
        self.api = ApiServer(services, self.gate, self.routes)
        for api in (OpenAiApi(services), ResponsesApi(services), AnthropicApi(services)):
            self.api.add(api.routes())
        self.ssl_context = build_ssl_context(self.config.tls_cert, self.config.tls_key)
        self.server: Server | None = None

    @property
    def scheme(self) -> str:
        return "wss" if self.ssl_context else "ws"

    def reload_credentials(self) -> None:
        """SIGHUP: re-read the token files and the TLS files; new connections use them."""
        self.gate.auth.reload()
        if self.ssl_context is not None:
            self.ssl_context.load_cert_chain(self.config.tls_cert, self.config.tls_key)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        # Every request, WebSocket or not: a Host this daemon answers to, then GET only.
        refusal = self.gate.check_host(connection, request) or check_method(request)
        if refusal is not None:
            return refusal
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return self.gate.check_handshake(connection, request)
        return self.routes.process_request(connection, request)

    async def bind(self) -> None:
        """Take the port, accepting nobody yet (:meth:`start_serving` opens the door)."""
        self.server = await serve(
            self.handle,
            self.config.host,
            self.config.port,
            ssl=self.ssl_context,
            process_request=self.process_request,
            # /v1/ to the HTTP APIs; 400/405 for requests websockets cannot parse
            create_connection=functools.partial(  # type: ignore[arg-type]  # a factory is fine
                PublicConnection, hand_over=self.api.hand_over
            ),
            max_size=self.config.max_message_size,
            ping_interval=self.config.ping_interval or None,
            ping_timeout=self.config.ping_timeout or None,
            open_timeout=self.config.hello_timeout or None,
            logger=logging.getLogger("websockets.server"),
            start_serving=False,
        )

    async def start_serving(self) -> None:
        assert self.server is not None
        await self.server.start_serving()

    @property
    def page_url(self) -> str:
        """The web page's address as a browser on this machine would open it."""
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"  # every address: this machine's own is one of them
        elif ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}/"

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(next(iter(self.server.sockets)).getsockname()[1])

    async def close(self, drain_timeout: float = 0) -> None:
        """Stop listening and close every WebSocket client with 1001 (going away); HTTP
        requests running get up to ``drain_timeout`` s to finish, then are cancelled."""
        if self.server is not None:
            self.server.close(close_connections=True)
            await self.server.wait_closed()
        await self.api.close(drain_timeout)

    async def handle(self, ws: ServerConnection) -> None:
        peer = peer_name(ws)
        self.services.metrics.connections.inc()
        self.gate.opened(ws)
        try:
            first = await self._first_frame(ws, peer)
            if first is None:
                return
            hello: dict[str, Any] | None = None
            hello_error: LLMWSError | None = None
            if first.lstrip().startswith("{"):
                try:
                    hello = wire.decode_message(first)
                except LLMWSError as e:
                    # Meant as JSON but broken: JSON mode, with the error after the welcome.
                    hello, hello_error = {}, e
            identity = self.gate.identify(ws, hello.get("token") if hello else None)
            if isinstance(identity, str):
                await self._refuse(ws, peer, identity, json_mode=hello is not None)
            elif hello is not None:
                connection = JsonConnection(
                    self.services, ws, peer, identity, self.gate.message_rate()
                )
                await connection.run(hello, hello_error)
            else:
                await self._text_mode(ws, peer, first)
        except ConnectionClosed:
            pass
        except Exception:
            log.error("%s: connection failed", peer, exc_info=True)
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self.gate.closed(ws)
            self.services.metrics.connections.dec()
            log.info("%s: closed (%s)", peer, ws.close_code)

    async def _refuse(self, ws: ServerConnection, peer: str, reason: str, json_mode: bool) -> None:
        """No valid token: say so (as JSON to JSON clients) and close with 1008."""
        log.warning("%s: unauthorized: %s", peer, reason)
        if json_mode:
            refusal = messages.Error.from_exception(Unauthorized(reason))
            await ws.send(wire.encode_message(refusal.to_wire()))
        await ws.close(CloseCode.POLICY, reason[:120])

    async def _first_frame(self, ws: ServerConnection, peer: str) -> str | None:
        timeout = self.config.hello_timeout
        try:
            async with asyncio.timeout(timeout or None):
                frame = await ws.recv()
        except TimeoutError:
            log.info("%s: no first frame within %s s", peer, timeout)
            await ws.close(CloseCode.POLICY, f"no first frame within {timeout:g} s")
            return None
        if isinstance(frame, bytes):
            try:
                return frame.decode("utf-8")
            except UnicodeDecodeError:
                await ws.close(
                    CloseCode.INVALID_DATA, "the first frame must be UTF-8 text or a JSON object"
                )
                return None
        return frame

    async def _text_mode(self, ws: ServerConnection, peer: str, text: str) -> None:
        """A legacy client: one prompt, plain text frames back, then close 1000."""
        prompt = wire.parse_legacy_prompt(text)
        if not prompt["user"]:
            await ws.close(CloseCode.POLICY, "empty prompt")
            return
        log.info("%s: text-mode prompt (%d characters)", peer, len(text))
        messages = [{"role": "system", "content": prompt["system"]}] if prompt["system"] else []
        messages.append({"role": "user", "content": prompt["user"]})
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        request = GenerationRequest(messages, self.services.defaults().settings)
        try:
            handle = await self.services.generation.submit(
                request, events.put_nowait, who=f"{peer}: text-mode request"
            )
        except NoModel as e:
            await ws.send(f"error: {e.message}")
            await ws.close(CloseCode.TRY_AGAIN_LATER, "no model loaded")
            return
        except LLMWSError as e:  # refused before any compute: context_too_long, busy
            await ws.send(f"error: {e.message}")
            await ws.close(CloseCode.NORMAL)
            return
        try:
            while True:
                event = await events.get()
                if isinstance(event, TokenText) and event.text:
                    await ws.send(event.text)
                elif isinstance(event, Failed):
                    await ws.send(f"error: {event.error.message}")
                    break
                elif isinstance(event, Finished):
                    break
        finally:
            handle.cancel()  # no-op when finished; frees the slot when the client left
        await ws.close(CloseCode.NORMAL)
