"""The public port's gate: what it lets in, and what a refused client reads.

Written against the mutants `make mutate` found alive (docs/testing.md). Requests to a
daemon go over real sockets on 127.0.0.1, each wait with its own short timeout.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.datastructures import Headers
from websockets.http11 import Request

from llmwsd.auth import Authenticator
from llmwsd.config import ApiConfig, Config, LimitsConfig, ServerConfig
from llmwsd.errors import ConfigError
from llmwsd.frontends.websocket.security import (
    Gatekeeper,
    HostAllowList,
    MessageRate,
    bearer_token,
    build_ssl_context,
    client_address,
    host_name,
)
from tests.conftest import Clock
from tests.test_protocol import WS_UPGRADE, http_exchange


def gatekeeper(
    tls: bool = False, allowed_origins: tuple[str, ...] = (), **settings: Any
) -> Gatekeeper:
    server = {k: v for k, v in settings.items() if k in ("host", "allowed_hosts")}
    limits = {k: v for k, v in settings.items() if k.startswith("max_conn")}
    api = {k: v for k, v in settings.items() if k in ("tokens_file", "max_auth_failures")}
    config = Config(
        server=ServerConfig(tls_cert="cert.pem" if tls else "", **server),
        api=ApiConfig(allowed_origins=list(allowed_origins), **api),
        limits=LimitsConfig(**limits),
    )
    api_config = config.api
    authenticator = Authenticator(
        api_config.tokens_file, api_config.admin_tokens_file, api_config.max_auth_failures
    )
    return Gatekeeper(config, authenticator)


class Connection:
    """What the checks read of a connection: where it comes from."""

    def __init__(self, address: Any = ("10.0.0.1", 40000)) -> None:
        self.remote_address = address


def get(path: str = "/", protocol: str = "HTTP/1.1", **headers: str) -> Request:
    fields = Headers()
    for name, value in headers.items():
        fields[name.replace("_", "-")] = value
    return Request(path, fields, protocol=protocol)


async def test_a_refusal_is_one_line_of_plain_utf8_text(fake_daemon):
    port = fake_daemon.server.port
    request = f"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode()
    status, headers, body = await http_exchange(port, request, timeout=5)
    assert status == 421
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert body == (
        b"llmwsd does not answer to the name 'evil.example': add it to [server] allowed_hosts\n"
    )


async def test_a_foreign_origin_is_told_where_to_allow_it(fake_daemon):
    port = fake_daemon.server.port
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n"
        + WS_UPGRADE
        + "\r\n"
    ).encode()
    status, headers, body = await http_exchange(port, request, timeout=5)
    assert status == 403
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert body == b"origin not allowed: add it to [api] allowed_origins\n"


def test_a_burst_of_one_still_lets_one_message_through():
    rate = MessageRate(rate=0.001, burst=1)
    assert rate.allow()
    assert not rate.allow()


def test_a_burst_allows_exactly_its_size_at_once():
    rate = MessageRate(rate=0.001, burst=3)
    assert [rate.allow() for _ in range(4)] == [True, True, True, False]


def test_the_page_s_own_origin_has_the_port_s_scheme():
    plain, tls = gatekeeper(), gatekeeper(tls=True)
    assert plain.origin_allowed("http://llm.example:8765", "llm.example:8765")
    assert not plain.origin_allowed("https://llm.example:8765", "llm.example:8765")
    assert tls.origin_allowed("https://llm.example:8765", "LLM.example:8765")
    assert not tls.origin_allowed("http://llm.example:8765", "llm.example:8765")


def test_no_host_means_no_same_origin():
    assert not gatekeeper().origin_allowed("http://", "")
    assert not gatekeeper(tls=True).origin_allowed("https://", "")


def test_a_star_allows_every_origin_and_a_listed_one_matches_whole():
    assert gatekeeper(allowed_origins=("*",)).origin_allowed("http://evil.example", "x")
    listed = gatekeeper(allowed_origins=("https://Chat.example",))
    assert listed.origin_allowed("https://chat.example", "llm.example")
    assert not listed.origin_allowed("https://chat.example.evil", "llm.example")


def test_the_bucket_refills_at_the_rate_up_to_the_burst(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("llmwsd.frontends.websocket.security.time", clock)
    rate = MessageRate(rate=2.0, burst=2)
    assert [rate.allow() for _ in range(3)] == [True, True, False]
    clock.now += 0.5  # one message's worth
    assert [rate.allow() for _ in range(2)] == [True, False]
    clock.now += 60  # a long pause refills only up to the burst
    assert [rate.allow() for _ in range(3)] == [True, True, False]


def test_host_names_are_parsed_strictly():
    assert host_name(" Example.COM:8080 ") == "example.com"
    assert host_name("localhost.") == "localhost"
    assert host_name("[::1]:8765") == "::1"
    assert host_name("[::1]") == "::1"
    assert host_name("[::1]:") == "::1"
    for bad in ("[::1", "[::1]x", "[::1]:80x", "[1.2.3.4]", "[nope:]", "a:b", "a b", "a..b"):
        assert host_name(bad) is None, bad


def test_the_allow_list_from_the_configuration():
    hosts = HostAllowList.from_config(
        Config(server=ServerConfig(host="llm.lan", allowed_hosts=["Chat.Example.", "[::2]"]))
    )
    assert {"localhost", "llm.lan", "chat.example"} <= hosts.names
    assert "[::2]" not in hosts.names and "::2" not in hosts.names  # addresses pass anyway
    assert hosts.allows("chat.example") and hosts.allows("::2") and hosts.allows("192.0.2.1")
    assert not hosts.allows("evil.example") and not hosts.any_host
    assert "0.0.0.0" not in HostAllowList.from_config(Config()).names
    with pytest.raises(ConfigError) as bad:
        HostAllowList.from_config(Config(server=ServerConfig(allowed_hosts=["ok", "a b"])))
    assert bad.value.message == (
        "<defaults>: [server] allowed_hosts[1]: 'a b' is not a host name "
        '(a name such as llm.example.org, or "*")'
    )
    assert HostAllowList.from_config(Config(server=ServerConfig(allowed_hosts=[" * "]))).any_host


def test_localhost_is_always_allowed(monkeypatch):
    monkeypatch.setattr("llmwsd.frontends.websocket.security.machine_names", lambda: frozenset())
    hosts = HostAllowList.from_config(Config())
    assert hosts.names == {"localhost"}
    assert hosts.allows("localhost") and not hosts.allows("my-laptop")


def test_every_allowed_hosts_entry_counts_after_an_address_or_a_star():
    hosts = HostAllowList.from_config(
        Config(server=ServerConfig(allowed_hosts=["[::2]", "10.0.0.1", "llm.example.org"]))
    )
    assert hosts.allows("llm.example.org")
    with pytest.raises(ConfigError):  # a star does not make the rest of the list unread
        HostAllowList.from_config(Config(server=ServerConfig(allowed_hosts=["*", "a b"])))


def test_only_http_1_0_may_leave_out_the_host():
    gate = gatekeeper()
    assert gate.check_host(Connection(), get(protocol="HTTP/1.0")) is None
    refused = gate.check_host(Connection(), get())
    assert refused is not None and refused.status_code == 400
    assert refused.body == b"bad request: HTTP/1.1 needs one Host header, host[:port]\n"


def test_connection_caps_in_all_and_per_address():
    gate = gatekeeper(max_connections=3, max_connections_per_address=2)
    first, second, third = Connection(), Connection(), Connection(("10.0.0.2", 1))
    for connection in (first, second):
        assert gate.check_handshake(connection, get()) is None
        gate.opened(connection)
    per_address = gate.check_handshake(Connection(), get())
    assert per_address is not None and per_address.status_code == 429
    assert per_address.body == b"too many connections from this address\n"
    assert gate.check_handshake(third, get()) is None
    gate.opened(third)
    in_all = gate.check_handshake(Connection(("10.0.0.3", 1)), get())
    assert in_all is not None and in_all.status_code == 503
    assert in_all.body == b"too many connections: try again later\n"
    gate.closed(first)
    assert gate.check_handshake(Connection(), get()) is None
    gate.closed(second)
    assert "10.0.0.1" not in gate.open_by_address  # nothing left behind per address


def test_the_token_comes_from_the_header_or_the_query():
    assert bearer_token(get(Authorization="BEARER  abc ")) == "abc"
    assert bearer_token(get(Authorization="bearer x")) == "x"
    assert bearer_token(get("/?token=q&token=r", Authorization="Basic x")) == "q"
    assert bearer_token(get("/?token=q", Authorization="Bearer h")) == "h"
    assert bearer_token(get("/?other=1")) is None


def test_what_a_client_without_a_good_token_is_told(tmp_path: Path):
    gate = gatekeeper(tokens_file=str(tmp_path / "tokens.json"), max_auth_failures=2)
    _, token = gate.auth.access.add("alice")
    connection = Connection()
    assert gate.identify(connection, None) == "an access token is required"
    assert gate.identify(connection, "llmws_wrong") == "a valid access token is required"
    assert gate.identify(connection, token) == (
        "too many failed token attempts from this address; retry in 60 s"
    )
    other = Connection(("10.0.0.9", 1))
    assert gate.identify(other, token).token.name == "alice"
    # A token sent in the handshake counts, whatever the hello says.
    handshake = Connection(("10.0.0.8", 1))
    assert gate.check_handshake(handshake, get(Authorization=f"Bearer {token}")) is None
    assert gate.identify(handshake, "llmws_wrong").token.name == "alice"


def test_where_a_connection_comes_from():
    assert client_address(Connection(("192.0.2.1", 5))) == "192.0.2.1"
    assert client_address(Connection("/run/llmws/sock")) == "/run/llmws/sock"


def test_tls_needs_at_least_1_2(tmp_path: Path):
    assert build_ssl_context("", "") is None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = build_ssl_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
