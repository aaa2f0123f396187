"""Browser origins: only a listed origin, whole, or the page's own scheme, host and port.

Each variant is a real WebSocket handshake on 127.0.0.1 with that ``Origin``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.conftest import recv_json, ws_url
from tests.test_security import make_certificates

LISTED = "https://chat.example.com"


async def status_for(url: str, origin: str, **kwargs) -> int:
    """101 when the handshake with ``origin`` is let through, else the refusal's status."""
    try:
        ws = await websockets.connect(url, origin=origin, open_timeout=5, **kwargs)
    except InvalidStatus as e:
        return e.response.status_code
    await ws.send("{}")
    assert (await recv_json(ws, timeout=5))["type"] == "welcome"
    await ws.close()
    return 101


@pytest.fixture
async def listing_daemon(fake_daemon_factory):
    return await fake_daemon_factory(api={"allowed_origins": [LISTED]})


async def test_a_listed_origin_is_matched_whole(listing_daemon) -> None:
    url = ws_url(listing_daemon)
    assert await status_for(url, LISTED) == 101
    assert await status_for(url, LISTED.upper()) == 101  # scheme and host are case-blind
    for near in (
        "https://chat.example.com.evil.net",  # a prefix match would let this in
        "https://evil.chat.example.com",
        "https://chat.example.co",
        "http://chat.example.com",  # another scheme
        "https://chat.example.com:8443",  # another port
        "https://chat.example.com/",
        "null",
        "",
    ):
        assert await status_for(url, near) == 403, near


async def test_the_pages_own_origin_needs_its_scheme_host_and_port(listing_daemon) -> None:
    port = listing_daemon.server.port
    url = ws_url(listing_daemon)  # the Host it sends is 127.0.0.1:PORT
    assert await status_for(url, f"http://127.0.0.1:{port}") == 101
    for other in (
        f"https://127.0.0.1:{port}",  # this port speaks http, not https
        f"ws://127.0.0.1:{port}",
        f"http://127.0.0.1:{port + 1}",
        "http://127.0.0.1",
        f"http://localhost:{port}",  # another origin, though the same machine
        f"http://127.0.0.1:{port}.evil.net",
        f"http://evil.net#127.0.0.1:{port}",
    ):
        assert await status_for(url, other) == 403, other


async def test_with_tls_the_pages_origin_is_https(fake_daemon_factory, tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path, serial=1)
    daemon = await fake_daemon_factory(server={"tls_cert": str(cert), "tls_key": str(key)})
    port = daemon.server.port
    context = ssl.create_default_context(cafile=str(ca))
    url = f"wss://127.0.0.1:{port}/"
    assert await status_for(url, f"https://127.0.0.1:{port}", ssl=context) == 101
    assert await status_for(url, f"http://127.0.0.1:{port}", ssl=context) == 403


async def test_a_star_lets_every_origin_in(fake_daemon_factory) -> None:
    daemon = await fake_daemon_factory(api={"allowed_origins": ["*"]})
    assert await status_for(ws_url(daemon), "https://anything.example") == 101
