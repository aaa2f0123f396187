"""Tokens, TLS, origins and limits on the public port."""

from __future__ import annotations

import asyncio
import datetime
import hmac
import ipaddress
import json
import socket
import ssl
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import InvalidStatus

from llmwsd import auth
from llmwsd.errors import ConfigError
from llmwsd.frontends.websocket.security import host_name
from tests.conftest import (
    FAST,
    REAL,
    answer_text,
    collect,
    eventually,
    recv_json,
    recv_until,
    ws_url,
)
from tests.test_protocol import WS_UPGRADE, http_exchange


async def open_json(url: str, hello: dict | None = None, **kwargs):
    ws = await websockets.connect(url, **{"open_timeout": FAST, **kwargs})
    await ws.send(json.dumps(hello or {}))
    return ws, await recv_json(ws, what="welcome or refusal")


@pytest.fixture
async def tokens_daemon(fake_daemon_factory, tmp_path: Path):
    return await fake_daemon_factory(
        api={
            "tokens_file": str(tmp_path / "tokens.json"),
            "admin_tokens_file": str(tmp_path / "admin-tokens.json"),
            "max_auth_failures": 10,
        }
    )


async def test_tokens_required(tokens_daemon, tmp_path: Path):
    _, alice = tokens_daemon.server.gate.auth.access.add("alice")
    url = ws_url(tokens_daemon)
    for hello in ({}, {"token": "llmws_wrong"}):
        ws, first = await open_json(url, hello)
        assert first["type"] == "error" and first["code"] == "unauthorized"
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1008
    # The three ways to present a token.
    ws, welcome = await open_json(url, {"token": alice})
    assert welcome["type"] == "welcome"
    await ws.close()
    ws, welcome = await open_json(url, additional_headers={"Authorization": f"Bearer {alice}"})
    assert welcome["type"] == "welcome"
    await ws.close()
    ws, welcome = await open_json(url + f"?token={alice}")
    assert welcome["type"] == "welcome"
    await ws.close()
    # Text clients present it on the handshake.
    async with websockets.connect(url) as ws:
        await ws.send("hello")
        await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1008
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {alice}"}
    ) as ws:
        await ws.send("hello")
        frames = await collect(ws, FAST, "text answer ending in a close")
    assert "".join(frames) == "echo: hello"


async def test_token_file_keeps_no_plain_token(tokens_daemon, tmp_path: Path):
    _, token = tokens_daemon.server.gate.auth.access.add("bob")
    path = tmp_path / "tokens.json"
    assert token not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = json.loads(path.read_text())["tokens"][0]
    assert entry["name"] == "bob" and len(entry["salt"]) == 32


async def test_revoked_token_is_refused_after_reload(tokens_daemon):
    store = tokens_daemon.server.gate.auth.access
    _, token = store.add("carol")
    ws, welcome = await open_json(ws_url(tokens_daemon), {"token": token})
    assert welcome["type"] == "welcome"
    await ws.close()
    auth.TokenStore(store.path).revoke("carol")  # as llmwsctl does, through the file
    tokens_daemon.reload()
    ws, first = await open_json(ws_url(tokens_daemon), {"token": token})
    assert first["code"] == "unauthorized"
    await ws.close()


async def test_another_token_cannot_resume_a_session(tokens_daemon):
    store = tokens_daemon.server.gate.auth.access
    _, alice = store.add("alice")
    _, mallory = store.add("mallory")
    ws, welcome = await open_json(ws_url(tokens_daemon), {"token": alice})
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "secret plans"}}))
    await recv_until(ws, {"done"})
    await ws.close()
    session_id = welcome["session_id"]
    ws, stolen = await open_json(
        ws_url(tokens_daemon), {"token": mallory, "session_id": session_id}
    )
    assert stolen["resumed"] is False and stolen["session_id"] != session_id
    await ws.send(json.dumps({"type": "history"}))
    assert (await recv_json(ws))["messages"] == []
    await ws.close()
    ws, mine = await open_json(ws_url(tokens_daemon), {"token": alice, "session_id": session_id})
    assert mine["resumed"] is True
    await ws.close()


async def test_failed_attempts_are_rate_limited(fake_daemon_factory, tmp_path: Path):
    tokens_daemon = await fake_daemon_factory(
        api={"tokens_file": str(tmp_path / "tokens.json"), "max_auth_failures": 3}
    )
    _, token = tokens_daemon.server.gate.auth.access.add("dave")
    for _ in range(3):
        ws, first = await open_json(ws_url(tokens_daemon), {"token": "llmws_guess"})
        assert first["code"] == "unauthorized"
        await ws.close()
    # Locked out for a while, even with the right token.
    ws, first = await open_json(ws_url(tokens_daemon), {"token": token})
    assert first["code"] == "unauthorized" and "too many failed" in first["message"]
    await ws.close()


def test_verify_compares_every_entry_in_constant_time(tmp_path: Path, monkeypatch):
    store = auth.TokenStore(tmp_path / "t.json")
    tokens = [store.add(f"user{i}")[1] for i in range(5)]
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert store.verify(tokens[0]).name == "user0"
    assert len(calls) == 5  # the match on the first entry did not stop the loop
    calls.clear()
    assert store.verify("llmws_nope") is None
    assert len(calls) == 5


@pytest.mark.parametrize("name", ["", "../x", "a b", "x" * 65, "name/with/slash"])
def test_bad_token_names(tmp_path: Path, name: str):
    with pytest.raises(auth.BadRequest):
        auth.TokenStore(tmp_path / "t.json").add(name)


async def test_model_management_needs_permission_and_admin_token(fake_daemon_factory, tmp_path):
    daemon = await fake_daemon_factory(
        api={
            "allow_model_management": True,
            "tokens_file": str(tmp_path / "tokens.json"),
            "admin_tokens_file": str(tmp_path / "admin.json"),
        }
    )
    _, user = daemon.server.gate.auth.access.add("user")
    _, admin = daemon.server.gate.auth.admin.add("admin")
    downloaded = daemon.config.state_dir / "models" / "downloaded"
    downloaded.mkdir(parents=True)
    (downloaded / "config.json").write_text("{}")
    (downloaded / "model.safetensors").write_bytes(b"w" * 100)
    ws, _ = await open_json(ws_url(daemon), {"token": user})
    await ws.send(json.dumps({"type": "delete_model", "model_name": "downloaded"}))
    error = await recv_json(ws)
    assert error["code"] == "forbidden" and "admin token" in error["message"]
    assert downloaded.is_dir()
    await ws.close()
    # The admin token passes the check: the model manager decides, as for llmwsctl rm.
    ws, _ = await open_json(ws_url(daemon), {"token": admin})
    await ws.send(json.dumps({"type": "delete_model", "model_name": "x"}))
    error = await recv_json(ws)
    assert error["type"] == "error" and error["code"] == "not_found", error
    assert error["message"].startswith("no model named 'x' in ")
    await ws.send(json.dumps({"type": "delete_model", "model_name": "downloaded"}))
    assert await recv_json(ws) == {
        "type": "model_deleted",
        "removed": "downloaded",
        "path": str(downloaded),
        "size_bytes": 102,
    }
    assert not downloaded.exists()
    await ws.close()


async def test_origin_check(fake_daemon_factory):
    daemon = await fake_daemon_factory(api={"allowed_origins": ["https://chat.example"]})
    url = ws_url(daemon)
    with pytest.raises(InvalidStatus) as e:
        await websockets.connect(url, origin="http://evil.example")
    assert e.value.response.status_code == 403
    for origin in (f"http://127.0.0.1:{daemon.server.port}", "https://chat.example", None):
        ws, welcome = await open_json(url, origin=origin)
        assert welcome["type"] == "welcome"
        await ws.close()


async def ask(port: int, host: str | None, path: str = "/", upgrade: bool = False):
    """A GET with this Host (and, for a WebSocket upgrade, the matching Origin)."""
    lines = [f"GET {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    if upgrade:
        lines.append(f"Origin: http://{host}")
    text = "\r\n".join(lines) + "\r\n" + (WS_UPGRADE if upgrade else "") + "\r\n"
    return await http_exchange(port, text.encode())


async def test_dns_rebinding_is_refused(fake_daemon, caplog):
    """A page on evil.com whose name now points here: its Host and Origin match."""
    port = fake_daemon.server.port
    for path, upgrade in (("/", True), ("/", False), ("/healthz", False), ("/metrics", False)):
        caplog.clear()
        status, _, body = await ask(port, f"evil.com:{port}", path, upgrade)
        assert status == 421, (path, upgrade, status, body)
        assert b"[server] allowed_hosts" in body and b"evil.com" in body
        refusals = [r for r in caplog.records if "allowed_hosts" in r.getMessage()]
        assert len(refusals) == 1 and "evil.com" in refusals[0].getMessage()
    # The same with a real client: evil.com "resolves" to 127.0.0.1.
    with pytest.raises(InvalidStatus) as e:
        await websockets.connect(
            f"ws://evil.com:{port}/",
            host="127.0.0.1",
            port=port,
            origin=f"http://evil.com:{port}",
            open_timeout=5,
        )
    assert e.value.response.status_code == 421


async def test_host_allow_list(fake_daemon_factory):
    daemon = await fake_daemon_factory(server={"allowed_hosts": ["LLM.example.org", "[::2]"]})
    port = daemon.server.port
    me = socket.gethostname()
    allowed = [
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"localhost:{port}",
        f"LOCALHOST:{port}",
        f"localhost.:{port}",
        f"[::1]:{port}",
        "[::1]",
        f"192.0.2.7:{port}",  # any address: a browser sends one only when it was typed
        f"[2001:db8::7]:{port}",
        f"{me}:{port}",
        f"{me.upper()}:{port}",
        f"{socket.getfqdn()}:{port}",
        f"llm.example.org:{port}",
        "Llm.Example.Org.",
    ]
    for host in allowed:
        for path, upgrade in (("/", True), ("/healthz", False), ("/", False)):
            status, _, body = await ask(port, host, path, upgrade)
            assert status == (101 if upgrade else 200), (host, path, status, body)
    refused = [
        f"localhost.evil.com:{port}",
        f"127.0.0.1.evil.com:{port}",
        f"evil.com:{port}",
        f"llm.example.org.evil.com:{port}",
        f"example.org:{port}",
        f"xlocalhost:{port}",
        f"{me}.evil.com:{port}",
        f"evil-{me}:{port}",
    ]
    for host in refused:
        for path, upgrade in (("/", True), ("/healthz", False)):
            status, _, body = await ask(port, host, path, upgrade)
            assert status == 421, (host, path, status, body)
    # Not host[:port] at all: a bad request, whatever the name.
    malformed = [
        f"localhost:{port}@evil.com",
        f"evil.com/localhost:{port}",
        f"localhost:{port}:1",
        "::1",
        f"[::1]x:{port}",
        "[localhost]",
        f"localhost:{port} evil.com",
        "",
        "local host",
    ]
    for host in malformed:
        for path, upgrade in (("/", True), ("/healthz", False)):
            status, _, body = await ask(port, host, path, upgrade)
            assert status == 400, (host, path, status, body)


async def test_host_header_is_required_once(fake_daemon):
    port = fake_daemon.server.port
    for path, upgrade in (("/", True), ("/healthz", False)):
        status, _, body = await ask(port, None, path, upgrade)
        assert status == 400 and b"Host" in body, (path, status, body)
    both = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.com\r\n\r\n"
    status, _, _ = await http_exchange(port, both.encode())
    assert status == 400
    # HTTP/1.0 has no Host header; no browser speaks it.
    status, _, _ = await http_exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 200


async def test_allowed_hosts_star_allows_any_name(fake_daemon_factory):
    daemon = await fake_daemon_factory(server={"allowed_hosts": ["*"]})
    port = daemon.server.port
    for host in (f"evil.com:{port}", "anything.example"):
        status, _, _ = await ask(port, host, "/healthz")
        assert status == 200
        status, _, _ = await ask(port, host, "/", upgrade=True)
        assert status == 101


@pytest.mark.parametrize("entry", ["", "http://llm.example.org", "a b", "*.example.org", "x/y"])
async def test_bad_allowed_hosts_entries_stop_the_start(fake_daemon_factory, entry):
    with pytest.raises(ConfigError) as e:
        await fake_daemon_factory(server={"allowed_hosts": ["ok.example", entry]})
    assert "allowed_hosts[1]" in e.value.message


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("LocalHost:8765", "localhost"),
        ("localhost.", "localhost"),
        ("[::1]:80", "::1"),
        ("[::FFFF:127.0.0.1]", "::ffff:127.0.0.1"),
        ("127.0.0.1:", "127.0.0.1"),
        ("localhost..", None),
        (".localhost", None),
        ("::1", None),
        ("[::1", None),
        ("[evil.com]", None),
        ("localhost:８０", None),  # fullwidth digits are not a port
    ],
)
def test_host_name(value, name):
    assert host_name(value) == name


async def test_connection_limits(fake_daemon_factory):
    daemon = await fake_daemon_factory(limits={"max_connections_per_address": 2})
    first = [await open_json(ws_url(daemon)) for _ in range(2)]
    with pytest.raises(InvalidStatus) as e:
        await websockets.connect(ws_url(daemon))
    assert e.value.response.status_code == 429
    await first[0][0].close()
    gate = daemon.server.gate
    await eventually(
        lambda: gate.open_by_address["127.0.0.1"] == 1, FAST, "the daemon to count the close"
    )
    ws, welcome = await open_json(ws_url(daemon))
    assert welcome["type"] == "welcome"
    for w in (ws, first[1][0]):
        await w.close()


async def test_one_client_cannot_push_out_other_sessions(fake_daemon_factory, tmp_path: Path):
    daemon = await fake_daemon_factory(
        sessions={"max_per_client": 2}, api={"tokens_file": str(tmp_path / "tokens.json")}
    )
    url = ws_url(daemon)
    _, alice = daemon.server.gate.auth.access.add("alice")
    _, mallory = daemon.server.gate.auth.access.add("mallory")
    ws, alices = await open_json(url, {"token": alice})
    await ws.close()
    made = []
    for _ in range(3):
        ws, welcome = await open_json(url, {"token": mallory})
        made.append(welcome["session_id"])
        await ws.close()
        session = daemon.sessions.get(welcome["session_id"])
        while session is not None and session.owner is not None:  # the daemon saw the close
            await asyncio.sleep(0.01)
    kept = {s.id for s in daemon.sessions.list()}
    # Mallory's third session replaced Mallory's oldest, not Alice's.
    assert alices["session_id"] in kept and made[0] not in kept and set(made[1:]) <= kept

    # With both of Mallory's sessions connected, a third is refused, and Alice is not.
    held = [(await open_json(url, {"token": mallory, "session_id": i}))[0] for i in made[1:]]
    ws, refused = await open_json(url, {"token": mallory})
    assert refused["type"] == "error" and refused["code"] == "busy", refused
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1013
    ws, welcome = await open_json(url, {"token": alice, "session_id": alices["session_id"]})
    assert welcome["resumed"] is True
    for w in [ws, *held]:
        await w.close()


async def test_message_rate_limit(fake_daemon_factory):
    daemon = await fake_daemon_factory(limits={"messages_per_second": 2.0, "message_burst": 3})
    ws, _ = await open_json(ws_url(daemon))
    for _ in range(8):
        await ws.send(json.dumps({"type": "ping"}))
    answers = [(await recv_json(ws))["type"] for _ in range(8)]
    assert answers.count("pong") == 3
    errors = answers.count("error")
    assert errors == 5
    await asyncio.sleep(1.0)
    await ws.send(json.dumps({"type": "ping"}))
    assert (await recv_json(ws))["type"] == "pong"  # still open, and refilled
    await ws.close()


async def test_prompt_length_limit_and_idle_timeout(fake_daemon_factory):
    daemon = await fake_daemon_factory(limits={"max_prompt_chars": 100, "idle_timeout": 1.0})
    ws, _ = await open_json(ws_url(daemon))
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "x" * 101}}))
    error = await recv_json(ws)
    assert error["code"] == "bad_request" and "101 characters" in error["message"]
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1000 and "idle" in ws.close_reason


def make_certificates(folder: Path, serial: int) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmws test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1000 + serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


async def test_tls_and_reload(fake_daemon_factory, tmp_path: Path):
    ca, cert, key = make_certificates(tmp_path, serial=1)
    daemon = await fake_daemon_factory(server={"tls_cert": str(cert), "tls_key": str(key)})
    port = daemon.server.port
    url = f"wss://127.0.0.1:{port}/"

    def client_context(ca_path: Path) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca_path))

    ws, welcome = await open_json(url, ssl=client_context(ca))
    assert welcome["type"] == "welcome"
    served = ws.transport.get_extra_info("ssl_object").getpeercert()
    assert served["serialNumber"] == "01"
    await ws.close()

    def https_health() -> int:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/healthz", context=client_context(ca)
        ) as r:
            return r.status

    assert await asyncio.to_thread(https_health) == 200
    with pytest.raises((OSError, websockets.exceptions.InvalidMessage)):
        await websockets.connect(f"ws://127.0.0.1:{port}/", open_timeout=3)

    # New files in place, SIGHUP's reload: new connections get the new certificate.
    new_folder = tmp_path / "new"
    new_folder.mkdir()
    new_ca, new_cert, new_key = make_certificates(new_folder, serial=2)
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    daemon.reload()
    ws, _ = await open_json(url, ssl=client_context(new_ca))
    assert ws.transport.get_extra_info("ssl_object").getpeercert()["serialNumber"] == "02"
    await ws.close()


async def test_real_model_behind_a_token(daemon_factory, tmp_path: Path):
    tokens = tmp_path / "tokens.json"
    _, token = auth.TokenStore(tokens).add("operator")
    daemon = daemon_factory(api={"tokens_file": str(tokens)})
    ws, first = await open_json(daemon.url, {})
    assert first["code"] == "unauthorized"
    await ws.close()
    ws, welcome = await open_json(daemon.url, {"token": token})
    assert welcome["model"] == "SmolLM2-135M-Instruct"
    await ws.send(
        json.dumps({"type": "inference", "prompt": {"user": "What is the capital of France?"}})
    )
    assert "Paris" in answer_text(await recv_until(ws, {"done"}, timeout=REAL))
    await ws.close()


async def llmwsctl(daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real llmwsctl against an in-process daemon's admin socket (off the loop)."""
    socket_path = str(daemon.config.runtime_dir / "admin.sock")
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "llmwsctl.cli", "--socket", socket_path, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_llmwsctl_tokens_add_list_revoke(tokens_daemon):
    added = await llmwsctl(tokens_daemon, "tokens", "add", "alice")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("llmws_")
    admin = await llmwsctl(tokens_daemon, "--json", "tokens", "add", "root-ui", "--admin")
    assert json.loads(admin.stdout)["admin"] is True
    listing = await llmwsctl(tokens_daemon, "tokens")
    assert "alice" in listing.stdout and "root-ui" in listing.stdout and token not in listing.stdout
    ws, welcome = await open_json(ws_url(tokens_daemon), {"token": token})
    assert welcome["type"] == "welcome"
    await ws.close()
    revoked = await llmwsctl(tokens_daemon, "tokens", "revoke", "alice")
    assert revoked.returncode == 0 and "revoked token alice" in revoked.stdout
    ws, first = await open_json(ws_url(tokens_daemon), {"token": token})
    assert first["code"] == "unauthorized"
    await ws.close()
    for bad in (["tokens", "add", "../evil"], ["tokens", "revoke", "nobody"]):
        result = await llmwsctl(tokens_daemon, *bad)
        assert result.returncode == 1 and result.stderr.strip()


async def test_llmwsctl_tokens_when_off(fake_daemon):
    listing = await llmwsctl(fake_daemon, "tokens")
    assert listing.returncode == 0 and "tokens are off" in listing.stdout
    added = await llmwsctl(fake_daemon, "tokens", "add", "x")
    assert added.returncode == 1 and "tokens_file" in added.stderr
