"""The WebSocket protocol against an in-process daemon with the fake engine (fast)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import websockets

from llmwsd.daemon import Daemon
from tests.conftest import FAST, ROOT, answer_text, collect, recv_json, recv_until, ws_url

WS_UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def http_exchange(
    port: int, data: bytes, timeout: float = 5
) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes to 127.0.0.1:port; the answer's status, headers and body.

    (None, {}, b"") when the server closed without answering. Reads up to the end of
    the headers and Content-Length bytes of body, so a 101 does not wait for a close.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(data)
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as e:
            assert e.partial == b"", e.partial
            return None, {}, b""
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()


async def hello(daemon: Daemon, **fields):
    ws = await websockets.connect(ws_url(daemon), max_size=None, open_timeout=FAST)
    await ws.send(json.dumps(fields))
    welcome = await recv_json(ws, what="welcome")
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def test_welcome_shape(fake_daemon: Daemon):
    ws, welcome = await hello(fake_daemon)
    assert welcome["protocol"] == 1
    assert welcome["resumed"] is False
    assert welcome["last_seq"] == 0
    assert welcome["model"] == "fake-model"
    assert welcome["capabilities"]["max_context"] == 4096
    resources = welcome["resources"]
    assert resources["device"] == "cpu"
    assert 0 < resources["free_gb"] <= resources["total_gb"], resources
    await ws.close()


async def test_inference_events_have_seq_and_request_id(fake_daemon: Daemon):
    ws, _ = await hello(fake_daemon)
    await ws.send(json.dumps({"type": "inference", "prompt": {"system": "", "user": "hi there"}}))
    events = await recv_until(ws, {"done"})
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    assert [e["seq"] for e in events] == list(
        range(events[0]["seq"], events[0]["seq"] + len(events))
    )
    assert {e["request_id"] for e in events} == {events[0]["request_id"]}
    assert answer_text(events) == "echo: hi there"
    assert events[-1]["finish_reason"] == "stop"
    await ws.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "bad_request"),
        ('{"type": "bogus"}', "unknown_type"),
        ('{"no_type": 1}', "unknown_type"),
        ('{"type": "inference"}', "bad_request"),
        ('{"type": "inference", "prompt": {"user": 5}}', "bad_request"),
        ('{"type": "inference", "prompt": {"user": "x"}, "config": {"top_p": 0}}', "bad_request"),
        ('{"type": "config", "data": {"temperature": -1}}', "bad_request"),
        ('{"type": "config", "data": {"nonsense": 1}}', "bad_request"),
        ('{"type": "ack", "seq": "x"}', "bad_request"),
        ('{"type": "subscribe_resources", "interval": -3}', "bad_request"),
        ('{"type": "train"}', "unsupported"),
        ('{"type": "save_snapshot"}', "unsupported"),
        ('{"type": "switch_model", "model": "x"}', "forbidden"),
        ('{"type": "delete_model", "model_name": "x"}', "forbidden"),
        ('{"type": "download_model", "repo": "a/b", "target_dir": "b"}', "forbidden"),
    ],
)
async def test_bad_messages_get_an_error_and_the_connection_stays(fake_daemon, frame, code):
    ws, _ = await hello(fake_daemon)
    await ws.send(frame)
    error = await recv_json(ws)
    assert error["type"] == "error" and error["code"] == code, error
    assert error["message"]
    await ws.send(json.dumps({"type": "ping"}))
    assert (await recv_json(ws))["type"] == "pong"
    await ws.close()


async def test_binary_frame_after_hello(fake_daemon):
    ws, _ = await hello(fake_daemon)
    await ws.send(b"\xff\x00binary")
    error = await recv_json(ws)
    assert error["code"] == "bad_request"
    await ws.send(json.dumps({"type": "ping"}))
    assert (await recv_json(ws))["type"] == "pong"
    await ws.close()


async def test_broken_first_frame_still_gets_welcome_first(fake_daemon):
    ws = await websockets.connect(ws_url(fake_daemon))
    await ws.send('{"session_id": ')
    assert (await recv_json(ws))["type"] == "welcome"
    assert (await recv_json(ws))["code"] == "invalid_json"
    await ws.close()


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "", None, "x" * 10_000, 42, "not-a-uuid"])
async def test_bad_session_ids(fake_daemon, tmp_path, bad_id):
    fields = {"session_id": bad_id} if bad_id is not None else {"session_id": None, "x": 1}
    ws, welcome = await hello(fake_daemon, **fields)
    if bad_id is not None:
        error = await recv_json(ws)
        assert error["code"] == "bad_request"
    assert welcome["resumed"] is False
    assert len(welcome["session_id"]) == 36
    await ws.close()


async def test_config_history_reset_status(fake_daemon):
    ws, _ = await hello(fake_daemon)
    await ws.send(json.dumps({"type": "config", "data": {"temperature": 0.2, "stop": ["x"]}}))
    ack = await recv_json(ws)
    assert ack["type"] == "config_ack"
    assert (ack["config"]["temperature"], ack["config"]["stop"]) == (0.2, ["x"])
    await ws.send(json.dumps({"type": "inference", "prompt": {"system": "be brief", "user": "a"}}))
    await recv_until(ws, {"done"})
    await ws.send(json.dumps({"type": "history"}))
    history = await recv_json(ws)
    assert history["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "echo: a"},
    ]
    await ws.send(json.dumps({"type": "reset"}))
    assert (await recv_json(ws))["type"] == "reset_done"
    await ws.send(json.dumps({"type": "history"}))
    assert (await recv_json(ws))["messages"] == []
    await ws.send(json.dumps({"type": "get_status"}))
    status = await recv_json(ws)
    assert status["type"] == "status" and status["model"] == "fake-model"
    assert status["sessions"] == 1  # this test's own: the daemon is new
    assert (status["queue"], status["active"]) == (0, 0)
    await ws.close()


async def test_cancel_ends_with_cancelled(fake_daemon):
    fake_daemon.slot.engine.token_delay = 0.05
    ws, _ = await hello(fake_daemon)
    prompt = " ".join(["word"] * 200)
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": prompt}}))
    await recv_until(ws, {"token"})
    await ws.send(json.dumps({"type": "cancel"}))
    events = await recv_until(ws, {"done"})
    assert events[-1]["finish_reason"] == "cancelled"
    await ws.close()


async def test_second_inference_while_running_is_busy(fake_daemon):
    fake_daemon.slot.engine.token_delay = 0.05
    ws, _ = await hello(fake_daemon)
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "one two three four"}}))
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "again"}}))
    events = await recv_until(ws, {"done"})
    errors = [e for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["busy"], events
    assert answer_text(events) == "echo: one two three four"
    await ws.close()


async def test_resources_and_models(fake_daemon):
    ws, _ = await hello(fake_daemon)
    await ws.send(json.dumps({"type": "get_resources"}))
    res = await recv_json(ws)
    assert res["type"] == "resources" and res["device"] == "cpu"
    assert 0 < res["free_gb"] <= res["total_gb"], res
    assert res["engine"]["model"] == "fake-model"
    await ws.send(json.dumps({"type": "list_models"}))
    models = await recv_json(ws)
    assert [m["name"] for m in models["models"]] == ["fake-model"]
    assert models["models"][0]["loaded"] is True
    await ws.send(json.dumps({"type": "subscribe_resources", "interval": 0.5}))
    assert await recv_json(ws) == {"type": "subscribed", "interval": 0.5}
    kinds = [(await recv_json(ws))["type"] for _ in range(2)]
    assert kinds == ["resources", "resources"]
    await ws.send(json.dumps({"type": "subscribe_resources", "interval": 0}))
    await ws.close()


async def test_text_mode(fake_daemon):
    ws = await websockets.connect(ws_url(fake_daemon))
    await ws.send("<|system|>You are helpful<|end|>\n<|user|>Hello world<|end|>\n<|assistant|>\n")
    frames = await collect(ws, FAST, "text answer ending in a close")
    assert "".join(frames) == "echo: Hello world"
    assert ws.close_code == 1000
    assert fake_daemon.slot.engine.submitted[-1].messages[0] == {
        "role": "system",
        "content": "You are helpful",
    }


async def test_hello_timeout_closes_1008(fake_daemon):
    ws = await websockets.connect(ws_url(fake_daemon))
    await asyncio.wait_for(ws.wait_closed(), 10)
    assert ws.close_code == 1008


async def test_huge_frame_closes_1009_and_daemon_serves_on(fake_daemon):
    ws, _ = await hello(fake_daemon)
    await ws.send(json.dumps({"type": "ping", "pad": "x" * (20 * 1024 * 1024)}))
    await asyncio.wait_for(ws.wait_closed(), 10)
    assert ws.close_code == 1009
    ws2, _ = await hello(fake_daemon)
    await ws2.send(json.dumps({"type": "ping"}))
    assert (await recv_json(ws2))["type"] == "pong"
    await ws2.close()


async def test_http_routes(fake_daemon):
    base = f"http://127.0.0.1:{fake_daemon.server.port}"

    async def get(path: str) -> tuple[int, str, bytes]:
        def fetch():
            try:
                with urllib.request.urlopen(base + path, timeout=5) as r:
                    return r.status, r.headers["Content-Type"], r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers["Content-Type"], e.read()

        return await asyncio.to_thread(fetch)

    async def check():
        status, kind, body = await get("/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok", "model": "fake-model"})
        assert kind.startswith("application/json"), kind
        # The chat page itself (share/web/index.html), not the plain fallback page.
        status, kind, body = await get("/")
        assert (status, kind) == (200, "text/html; charset=utf-8")
        assert body == (ROOT / "share" / "web" / "index.html").read_bytes()
        assert b"<title>llmws</title>" in body and b'id="status"' in body
        status, kind, body = await get("/metrics")
        assert (status, kind) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert b"\nllmws_sessions 0.0\n" in body and b"\nllmws_max_context_tokens 4096.0\n" in body
        for path in ("/nope", "/../etc/passwd", "/%2e%2e/etc/passwd", "/share/web/../../x"):
            status, kind, body = await get(path)
            assert (status, kind, body) == (404, "text/plain; charset=utf-8", b"not found\n"), path

    await check()


@pytest.mark.parametrize(
    "request_head",
    [
        "POST / HTTP/1.1",
        "POST /healthz HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2",
        "PUT /metrics HTTP/1.1",
        "DELETE / HTTP/1.1",
        "HEAD / HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked",
        f"POST / HTTP/1.1\r\n{WS_UPGRADE}".removesuffix("\r\n"),
    ],
)
async def test_other_methods_than_get_get_405(fake_daemon, request_head):
    port = fake_daemon.server.port
    request = f"{request_head}\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    if "Content-Length: 2" in request_head:
        request += "{}"
    status, headers, body = await http_exchange(port, request.encode())
    assert status == 405, (status, body)
    assert headers["allow"] == "GET"
    assert b"method not allowed" in body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Name: x\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc",
    ],
)
async def test_malformed_requests_get_400(fake_daemon, request_bytes):
    status, headers, body = await http_exchange(fake_daemon.server.port, request_bytes)
    assert status == 400, (status, body)
    assert body.startswith(b"bad request") and headers["connection"] == "close"
    # And the daemon answers the next request as usual.
    status, _, body = await http_exchange(
        fake_daemon.server.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    assert (status, json.loads(body)) == (200, {"status": "ok", "model": "fake-model"})


async def test_a_client_that_leaves_mid_request_gets_no_answer(fake_daemon):
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_daemon.server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    status, _, _ = await http_exchange(
        fake_daemon.server.port, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    assert status == 405


async def test_resume_welcome_names_the_last_seq(fake_daemon):
    ws, welcome = await hello(fake_daemon)
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "a b c"}}))
    events = await recv_until(ws, {"done"})
    await ws.close()
    ws, again = await hello(
        fake_daemon, session_id=welcome["session_id"], last_seq=events[1]["seq"]
    )
    assert again["resumed"] is True and again["last_seq"] == events[-1]["seq"]
    replayed = await recv_until(ws, {"done"}, timeout=FAST)
    assert replayed == events[2:]
    await ws.close()
