"""The HTTP APIs on the fake engine: the official SDKs and raw HTTP against an in-process daemon.

The same calls on the real model, on both engines, are in test_http_api_real.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import websockets

from llmwsd.daemon import Daemon
from tests.conftest import FAST, recv_json, recv_until, ws_url


def base(daemon: Daemon) -> str:
    return f"http://127.0.0.1:{daemon.server.port}"


def sdk(daemon: Daemon, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base(daemon) + "/v1", api_key=key, max_retries=0, timeout=FAST
    )


CHAT = [{"role": "user", "content": "hello there world"}]


async def test_models_and_chat_completions_through_the_openai_sdk(fake_daemon: Daemon) -> None:
    client = sdk(fake_daemon)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    whole = await client.chat.completions.create(model="fake-model", messages=CHAT)
    assert whole.choices[0].message.content == "echo: hello there world"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens == 4
    pieces = []
    usage = None
    async for chunk in await client.chat.completions.create(
        model="fake-model", messages=CHAT, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    assert "".join(pieces) == "echo: hello there world"
    assert usage is not None and usage.completion_tokens == 4
    assert usage.prompt_tokens == whole.usage.prompt_tokens


async def test_completions_take_the_raw_prompt(fake_daemon: Daemon) -> None:
    client = sdk(fake_daemon)
    whole = await client.completions.create(model="fake-model", prompt="one two", max_tokens=2)
    assert whole.choices[0].text == "echo: one"
    assert whole.choices[0].finish_reason == "length"
    engine = fake_daemon.slot.engine
    assert engine.submitted[-1].messages == [{"role": "raw_prompt", "content": "one two"}]
    streamed = [
        c.choices[0].text
        async for c in await client.completions.create(
            model="fake-model", prompt="one two", stream=True
        )
    ]
    assert "".join(streamed) == "echo: one two"


async def test_errors_in_openai_shape(fake_daemon: Daemon) -> None:
    client = sdk(fake_daemon)
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as many:
        await client.chat.completions.create(model="fake-model", messages=CHAT, n=2)
    assert many.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as image:
        await client.chat.completions.create(
            model="fake-model",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        )
    assert "text only" in image.value.body["message"]
    with pytest.raises(openai.BadRequestError) as typed:
        await client.chat.completions.create(model="fake-model", messages=CHAT, max_tokens="ten")  # type: ignore[arg-type]
    assert typed.value.body["param"] == "max_tokens"


async def test_anthropic_messages_whole_and_streamed(fake_daemon: Daemon) -> None:
    client = anthropic.AsyncAnthropic(base_url=base(fake_daemon), api_key="none", max_retries=0)
    message = await client.messages.create(
        model="fake-model", max_tokens=10, system="be brief", messages=CHAT
    )
    assert message.content[0].text == "echo: hello there world"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 4
    async with client.messages.stream(model="fake-model", max_tokens=2, messages=CHAT) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: hello"
    assert final.stop_reason == "max_tokens"


async def test_a_background_response_resumes_after_any_event(fake_daemon: Daemon) -> None:
    client = sdk(fake_daemon)
    created = await client.responses.create(
        model="fake-model", input="a b c d e f", background=True
    )
    assert created.status in ("queued", "in_progress")
    events = []
    async for event in await client.responses.retrieve(created.id, stream=True):
        events.append(event)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    whole = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert whole == "echo: a b c d e f"
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers))
    for cut in numbers:
        rest = [
            e
            async for e in await client.responses.retrieve(
                created.id, stream=True, starting_after=cut
            )
        ]
        assert [e.sequence_number for e in rest] == [n for n in numbers if n > cut]
    done = await client.responses.retrieve(created.id)
    assert done.status == "completed" and done.output_text == whole
    follow = await client.responses.create(
        model="fake-model", input="next", previous_response_id=created.id
    )
    assert follow.output_text == "echo: next"
    history = fake_daemon.slot.engine.submitted[-1].messages
    assert history[-3:] == [
        {"role": "user", "content": "a b c d e f"},
        {"role": "assistant", "content": whole},
        {"role": "user", "content": "next"},
    ]


async def raw(daemon: Daemon, data: bytes, timeout: float = FAST) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.server.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(65536)
    finally:
        writer.close()


async def test_malformed_bodies_get_clear_errors_and_the_connection_stays(
    fake_daemon: Daemon,
) -> None:
    url = base(fake_daemon) + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        for body, status, words in (
            (b"{not json", 400, "not JSON"),
            (b"[1, 2]", 400, "JSON object"),
            (b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
            (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
            (json.dumps({"messages": []}).encode(), 400, "messages"),
            (json.dumps({"messages": CHAT, "temperature": "hot"}).encode(), 400, "temperature"),
            (json.dumps({"messages": CHAT, "max_tokens": 0}).encode(), 400, "max_tokens"),
        ):
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                answer = await r.json()
                assert r.status == status, answer
                assert words in answer["error"]["message"], answer
        huge = b'{"messages": [{"role": "user", "content": "' + b"x" * (17 * 2**20) + b'"}]}'
        async with http.post(url, data=huge) as r:
            assert r.status == 413
        async with http.get(base(fake_daemon) + "/v1/nowhere") as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "invalid_request_error"
        async with http.get(url) as r:
            assert r.status == 405
        async with http.get(base(fake_daemon) + "/v1/responses/resp_..%2F..%2Fetc_1") as r:
            assert r.status == 404
        async with http.post(url, json={"messages": CHAT}) as r:  # still serving
            assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]


async def test_a_slow_body_times_out(fake_daemon_factory: Any) -> None:
    daemon = await fake_daemon_factory(server={"hello_timeout": 0.5})
    answer = await raw(
        daemon,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{",
    )
    assert answer.startswith(b"HTTP/1.1 408"), answer


async def test_a_client_hanging_up_mid_stream_cancels_its_generation(
    fake_daemon_factory: Any,
) -> None:
    daemon = await fake_daemon_factory()
    daemon.slot.engine.token_delay = 0.2
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            base(daemon) + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": " ".join(["w"] * 200)}], "stream": True},
        ) as r,
    ):
        await r.content.readline()
    engine = daemon.slot.engine
    for _ in range(100):
        if not engine.tasks:
            break
        await asyncio.sleep(0.05)
    assert not engine.tasks


async def test_websocket_and_http_clients_share_the_engine(fake_daemon: Daemon) -> None:
    client = sdk(fake_daemon)
    async with websockets.connect(ws_url(fake_daemon)) as ws:
        await ws.send(json.dumps({"type": "inference", "prompt": {"user": "over websocket"}}))
        over_http = asyncio.create_task(
            client.chat.completions.create(model="fake-model", messages=CHAT)
        )
        events = await recv_until(ws, {"done"})
        assert "".join(e["data"] for e in events if e["type"] == "token") == "echo: over websocket"
        assert (await over_http).choices[0].message.content == "echo: hello there world"
    metrics = (
        await asyncio.to_thread(
            lambda: (
                __import__("urllib.request").request.urlopen(base(fake_daemon) + "/metrics").read()
            )
        )
    ).decode()
    assert (
        'llmws_http_requests_total{api="openai",endpoint="chat_completions",status="200"}'
        in metrics
    )


async def test_tokens_are_checked(fake_daemon_factory: Any, tmp_path: Any) -> None:
    from llmwsd.auth import TokenStore

    tokens = tmp_path / "tokens"
    _, token = TokenStore(tokens).add("alice")
    daemon = await fake_daemon_factory(api={"tokens_file": str(tokens)})
    with pytest.raises(openai.AuthenticationError):
        await sdk(daemon, "llmws_wrong").models.list()
    assert [m.id for m in (await sdk(daemon, token).models.list()).data] == ["fake-model"]
    client = anthropic.AsyncAnthropic(base_url=base(daemon), api_key=token, max_retries=0)
    message = await client.messages.create(model="fake-model", max_tokens=3, messages=CHAT)
    assert message.content[0].text == "echo: hello there"


async def test_http_and_websocket_requests_wait_in_one_fair_queue(fake_daemon_factory: Any) -> None:
    from tests.test_memory import ask, connect, estimate_for_tests

    daemon = await fake_daemon_factory(limits={"max_queue": 2})
    # Each request: 10 prompt tokens + 30 new = 40 tokens at 2 bytes; one fits at a time.
    daemon.slot.engine.info.memory = estimate_for_tests(budget=80 + 79)
    first, last = await connect(daemon), await connect(daemon)
    await ask(first, 6, max_new_tokens=30, min_new_tokens=30)
    assert (await recv_json(first))["type"] == "start"
    body = {
        "messages": [{"role": "user", "content": " ".join(["word"] * 6)}],
        "max_tokens": 30,
        "min_tokens": 30,
    }
    async with aiohttp.ClientSession() as http:
        url = base(daemon) + "/v1/chat/completions"
        over_http = asyncio.create_task(http.post(url, json=body))
        for _ in range(100):
            if daemon.slot.admission.stats()["waiting_for_memory"] == 1:
                break
            await asyncio.sleep(0.02)
        await ask(last, 6, max_new_tokens=30, min_new_tokens=30)
        queued = await recv_json(last)
        assert queued["type"] == "queued" and queued["position"] == 2  # behind the HTTP one
        async with http.post(url, json=body) as full:  # the queue holds two: one more is busy
            assert full.status == 429 and (await full.json())["error"]["code"] == "busy"
        answer = await over_http
        assert answer.status == 200 and (await answer.json())["usage"]["completion_tokens"] == 7
        assert daemon.slot.admission.stats()["waiting_for_memory"] <= 1
        events = await recv_until(last, {"done"})
        assert events[-1]["total_tokens"] == 7  # "echo:" and the six words


async def test_the_apis_over_tls_and_the_host_check(
    fake_daemon_factory: Any, tmp_path: Any
) -> None:
    import ssl

    import httpx

    from tests.test_security import make_certificates

    ca, cert, key = make_certificates(tmp_path, serial=3)
    daemon = await fake_daemon_factory(server={"tls_cert": str(cert), "tls_key": str(key)})
    context = ssl.create_default_context(cafile=str(ca))
    client = openai.AsyncOpenAI(
        base_url=f"https://127.0.0.1:{daemon.server.port}/v1",
        api_key="none",
        max_retries=0,
        http_client=httpx.AsyncClient(verify=context),
    )
    answer = await client.chat.completions.create(model="fake-model", messages=CHAT)
    assert answer.choices[0].message.content == "echo: hello there world"
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"https://127.0.0.1:{daemon.server.port}/v1/models",
            headers={"Host": "evil.example:8765"},
            ssl=context,
        ) as rebound,
    ):
        assert rebound.status == 421  # DNS rebinding: the Host check applies here too


async def test_a_page_of_another_origin_is_refused(fake_daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as http:
        url = base(fake_daemon) + "/v1/chat/completions"
        # A "simple" cross-origin POST, which a browser sends without asking first.
        body = json.dumps({"messages": CHAT})
        headers = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        async with http.post(url, data=body, headers=headers) as refused:
            assert refused.status == 403
        own = {"Origin": base(fake_daemon), "Content-Type": "text/plain"}
        async with http.post(url, data=body, headers=own) as served:
            assert served.status == 200


async def test_a_response_is_cancelled_by_its_endpoint_or_by_its_client_leaving(
    fake_daemon: Daemon,
) -> None:
    fake_daemon.slot.engine.token_delay = 0.1
    client = sdk(fake_daemon)
    long_input = " ".join(["w"] * 100)
    created = await client.responses.create(model="fake-model", input=long_input, background=True)
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert (await client.responses.retrieve(created.id)).status == "cancelled"
    # Stored but not background: a client that hangs up cancels it.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            base(fake_daemon) + "/v1/responses", json={"input": long_input, "stream": True}
        ) as r,
    ):
        created_line = b""
        while b"response.created" not in created_line:
            created_line = await r.content.readline()
        rid = json.loads((await r.content.readline())[6:])["response"]["id"]
    for _ in range(100):
        if (await client.responses.retrieve(rid)).status == "cancelled":
            break
        await asyncio.sleep(0.05)
    assert (await client.responses.retrieve(rid)).status == "cancelled"


async def test_a_response_longer_than_the_session_buffer_keeps_its_whole_text(
    fake_daemon_factory: Any,
) -> None:
    daemon = await fake_daemon_factory(sessions={"max_buffered_events": 8})
    client = sdk(daemon)
    words = " ".join(f"w{i}" for i in range(30))
    done = await client.responses.create(model="fake-model", input=words)
    assert done.output_text == "echo: " + words
    assert (await client.responses.retrieve(done.id)).output_text == "echo: " + words
    events = [
        e async for e in await client.responses.retrieve(done.id, stream=True, starting_after=1)
    ]
    assert events[0].type == "error" and events[0].code == "events_dropped"
    assert events[-1].type == "response.completed"


async def test_another_tokens_response_is_unknown(fake_daemon_factory: Any, tmp_path: Any) -> None:
    from llmwsd.auth import TokenStore

    tokens = tmp_path / "tokens"
    store = TokenStore(tokens)
    _, alice = store.add("alice")
    _, bob = store.add("bob")
    daemon = await fake_daemon_factory(api={"tokens_file": str(tokens)})
    made = await sdk(daemon, alice).responses.create(model="fake-model", input="secret")
    with pytest.raises(openai.NotFoundError):
        await sdk(daemon, bob).responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        await sdk(daemon, bob).responses.create(input="more", previous_response_id=made.id)
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(
            base_url=base(daemon), api_key="llmws_wrong", max_retries=0
        ).messages.create(model="fake-model", max_tokens=3, messages=CHAT)
    assert (await sdk(daemon, alice).responses.retrieve(made.id)).output_text == "echo: secret"


async def test_the_limits_apply_to_http_requests(fake_daemon_factory: Any) -> None:
    daemon = await fake_daemon_factory(
        limits={"messages_per_second": 0.001, "message_burst": 2, "max_connections_per_address": 1}
    )
    url = base(daemon) + "/v1/models"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        for _ in range(2):
            async with http.get(url) as r:
                assert r.status == 200
        async with http.get(url) as r:
            assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited"
        # The same kept-alive connection also serves the plain routes.
        async with http.get(base(daemon) + "/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        # A second connection from this address is over the cap.
        answer = await raw(daemon, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 429"), answer


async def test_without_a_model_the_apis_say_503(fake_daemon: Daemon) -> None:
    from llmwsd.service.model_slot import ModelState

    fake_daemon.slot.vacate(ModelState.NONE)
    with pytest.raises(openai.InternalServerError) as refused:
        await sdk(fake_daemon).chat.completions.create(model="fake-model", messages=CHAT)
    assert refused.value.status_code == 503 and refused.value.body["code"] == "no_model"


async def test_a_stream_running_at_shutdown_gets_the_drain_timeout(
    fake_daemon_factory: Any,
) -> None:
    daemon = await fake_daemon_factory(server={"drain_timeout": 30})
    daemon.slot.engine.token_delay = 0.05
    client = sdk(daemon)
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": " ".join(["w"] * 20)}],
        stream=True,
    )
    pieces = []
    shutdown = None
    async for chunk in stream:
        pieces += [c.delta.content or "" for c in chunk.choices]
        if shutdown is None and len(pieces) > 3:
            shutdown = asyncio.create_task(daemon.shutdown())
        if chunk.choices and chunk.choices[0].finish_reason:
            reason = chunk.choices[0].finish_reason
    assert reason == "stop" and "".join(pieces) == "echo: " + " ".join(["w"] * 20)
    assert shutdown is not None
    await shutdown
