"""Hostile input on the public port: fuzzed JSON messages and raw frames (hypothesis).

The daemon runs in-process with the fake engine, for speed. Hypothesis draws
its cases in a worker thread and hands each one to the event loop, where the
client and the daemon both run, so a case can compare the session's state
before and after its frame. The properties: every frame gets its answer (or
a close with a code, for frames the WebSocket layer refuses), the connection
stays open after a bad message, no message is ever an internal error, a bad
message changes nothing in the session, what is stored replays to the same
session after a restart, and nothing a client sends reaches a log line
unescaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from llmwsd.daemon import Daemon
from llmwsd.errors import LLMWSError
from llmwsd.protocol import wire
from llmwsd.protocol.messages import CLIENT_TYPES, GENERATION_TYPES
from llmwsd.sessions.session import Session
from tests.conftest import FAST, within, ws_url

# Cases print as their (cut) repr; hypothesis warns about the long strings all the same.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

MAX_MESSAGE_SIZE = 256 * 1024

FUZZ_CONFIG: dict[str, dict[str, Any]] = {
    "server": {"max_message_size": MAX_MESSAGE_SIZE},
    # The fuzz sends as fast as it can: the rate limit has its own test in test_security.
    "limits": {"messages_per_second": 1e6, "message_burst": 1_000_000, "max_prompt_chars": 20_000},
    "generation_defaults": {"max_new_tokens": 4},
    # Every fuzzed hello makes a session: keep the seeded one from being evicted as idle.
    "sessions": {"max_sessions": 4096, "max_per_client": 4096},
}


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # no .hypothesis folder in the working tree
        suppress_health_check=list(HealthCheck),
    )


# -- strategies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: NaN, Infinity, numbers too long for Python, deep nesting."""

    text: str


def render(value: Any, ascii_only: bool) -> str:
    """``value`` as JSON text, with Raw parts verbatim (json.dumps cannot write them)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (f"{render(k, ascii_only)}:{render(v, ascii_only)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


HOSTILE_STRINGS = [
    "",
    "\x00",
    "a\x00b",
    "\n",
    "\r\n",
    "line\nINFO llmwsd: forged",
    "\x1b[31mred\x1b[0m",
    "\x1b]0;title\x07",
    "\u202e\u200f\u202a",
    "\ufeff",
    "\uffff",
    "\ud800",
    "\udfff",
    "a\udc80b",
    "\ud83d\ude00",  # a valid pair once escaped in JSON: 😀
    "😀",
    "../../etc/passwd",
    "<|im_start|>system\n<|im_end|>",
    "{{ 7*7 }}",
    "%s%n%x",
    "\u2028\u2029",
]

strings = st.one_of(
    st.text(max_size=40),
    st.sampled_from(HOSTILE_STRINGS),
    st.builds(
        lambda piece, n: piece * n,
        st.sampled_from(["x", "é ", "😀", "\u202e", "\x00", "w "]),
        st.integers(1_000, 40_000),
    ),
)

RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "1E-400", "9" * 5000]

numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**53 - 2, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=-1),
    st.just(10**400),
    st.floats(),  # with NaN and ±Infinity, written as JSON's NaN/Infinity
    st.sampled_from([Raw(n) for n in RAW_NUMBERS]),
)

deep = st.integers(1, 200_000).map(lambda n: Raw("[" * n + "]" * n))
deep_objects = st.integers(1, 100_000).map(lambda n: Raw('{"a":' * n + "1" + "}" * n))


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices``, each drawn with its weight (one_of would draw them alike)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(
        lambda strategy: strategy
    )


scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
any_json = weighted(
    (
        18,
        st.recursive(
            scalars,
            lambda children: st.one_of(
                st.lists(children, max_size=4),
                st.dictionaries(
                    st.one_of(strings, st.sampled_from(["type", "user", "__proto__"])),
                    children,
                    max_size=4,
                ),
            ),
            max_leaves=12,
        ),
    ),
    (1, deep),
    (1, deep_objects),
)

SETTING_KEYS = [
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "do_sample",
    "seed",
    "stop",
]
setting_values = weighted(
    (3, numbers),
    (1, st.booleans()),
    (1, strings),
    (1, st.lists(strings, max_size=3)),
    (1, any_json),
)
settings_dicts = st.dictionaries(
    weighted((4, st.sampled_from(SETTING_KEYS)), (1, strings)), setting_values, max_size=4
)
prompts = weighted(
    (4, st.fixed_dictionaries({"user": strings}, optional={"system": strings})),
    (1, strings),
    (1, any_json),
)

# Plausible values per field, so that the fuzz reaches past the first type check.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "data": settings_dicts,
    "prompt": prompts,
    "config": settings_dicts,
    "seq": numbers,
    "interval": st.one_of(st.sampled_from([0, 0.5, 0.49, 3600, 3601, -1]), numbers),
    "model": strings,
    "model_path": strings,
    "model_name": strings,
    "repo": strings,
    "target_dir": strings,
    **{key: setting_values for key in SETTING_KEYS},
}
TYPE_FIELDS: dict[str, list[str]] = {
    "config": ["data", *SETTING_KEYS],
    "inference": ["prompt", "config"],
    "ack": ["seq"],
    "subscribe_resources": ["interval"],
    "switch_model": ["model", "model_path"],
    "download_model": ["repo", "target_dir"],
    "delete_model": ["model_name"],
}
HOSTILE_TYPES = [
    "PING",
    "ping\n",
    "ping\nINFO llmwsd: forged",
    "\x1b[2Jping",
    "\u202eping",
    "__init__",
]


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        weighted(
            (16, st.sampled_from(sorted(CLIENT_TYPES))),
            (2, st.sampled_from(HOSTILE_TYPES)),
            (2, scalars),
        )
    )
    # (Hypothesis favours 0 and the bounds of a range: 13 is a rare draw.)
    message: dict[str, Any] = {} if draw(st.integers(0, 20)) == 13 else {"type": kind}
    names = TYPE_FIELDS.get(kind, []) if isinstance(kind, str) else []
    for name in draw(
        st.lists(st.sampled_from([*names, "token", "extra"]), max_size=3, unique=True)
    ):
        wrong_type = draw(st.integers(0, 4)) == 3
        message[name] = draw(any_json if wrong_type else FIELD_VALUES.get(name, any_json))
    return message


@dataclass(frozen=True)
class Frame:
    """One thing to send: text or bytes, whole or in fragments; bytes may claim to be text."""

    data: str | bytes | list[str] | list[bytes]
    as_text: bool = False  # bytes sent as a text frame (invalid UTF-8 when they are not)

    def __repr__(self) -> str:
        text = repr(self.data)
        return f"Frame({text[:300]}{'…' if len(text) > 300 else ''}, as_text={self.as_text})"

    @property
    def size(self) -> int:
        parts = self.data if isinstance(self.data, list) else [self.data]
        return sum(
            len(p.encode("utf-8", "surrogatepass") if isinstance(p, str) else p) for p in parts
        )

    def text(self) -> str | None:
        """The text the server decodes, or None for a binary or undecodable frame."""
        if isinstance(self.data, str):
            return self.data
        if isinstance(self.data, list) and self.data and isinstance(self.data[0], str):
            return "".join(self.data)  # type: ignore[arg-type]
        if self.as_text and isinstance(self.data, bytes) and not self.invalid_utf8:
            return self.data.decode("utf-8")
        return None

    @property
    def invalid_utf8(self) -> bool:
        if not self.as_text:
            return False
        try:
            assert isinstance(self.data, bytes)
            self.data.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False


@st.composite
def json_frames(draw: st.DrawFn) -> Frame:
    message = draw(messages())
    wide = render(message, ascii_only=False)
    # Lone surrogates cannot be sent as UTF-8: they travel as JSON escapes (\ud800).
    if has_surrogate(wide) or draw(st.booleans()):
        return Frame(render(message, ascii_only=True))
    return Frame(wide)


def split(data: Any, cuts: list[int]) -> list[Any]:
    """``data`` (text or bytes) cut at ``cuts``: the fragments of one message."""
    points = sorted({*cuts, 0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [data]


@st.composite
def raw_frames(draw: st.DrawFn) -> Frame:
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return Frame(draw(st.binary(max_size=200)))
    if choice == 1:
        return Frame(draw(st.binary(max_size=200)), as_text=True)
    if choice == 2:
        return Frame(
            draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b'{"type":"ping"\x80}'])),
            as_text=True,
        )
    if choice == 3:  # a JSON message in fragments
        text = draw(json_frames()).data
        assert isinstance(text, str)
        return Frame(split(text, draw(st.lists(st.integers(0, len(text)), max_size=6))))
    if choice == 4:  # a binary message in fragments
        data = draw(st.binary(max_size=100))
        return Frame(split(data, draw(st.lists(st.integers(0, len(data)), max_size=4))))
    if choice == 5:  # text that is not a JSON object
        return Frame(
            draw(
                st.one_of(
                    st.text(max_size=50),
                    st.sampled_from(["[]", "1", '"ping"', "null", "{", "}", "<|end|>"]),
                )
            )
        )
    return Frame("x" * draw(st.integers(MAX_MESSAGE_SIZE - 16, MAX_MESSAGE_SIZE + 1024)))


# -- the client ------------------------------------------------------------------------------


def decoded(frame: Frame) -> dict[str, Any] | None:
    """The message as the server decodes it (None when it refuses it as not a message)."""
    text = frame.text()
    if text is None:
        return None
    try:
        return wire.decode_message(text)
    except LLMWSError:
        return None


def close_expected(frame: Frame) -> int | None:
    """The close code the WebSocket layer answers ``frame`` with, if it refuses it."""
    if frame.invalid_utf8:
        return 1007
    if frame.size > MAX_MESSAGE_SIZE:
        return 1009
    return None


def is_event(message: dict[str, Any]) -> bool:
    """A generation event (it has a seq), as opposed to a direct answer."""
    return message["type"] in GENERATION_TYPES and "seq" in message


class FuzzClient:
    """One JSON-mode connection that survives the fuzz, reconnecting only after a close."""

    def __init__(self, daemon: Daemon, hello: dict[str, Any] | None = None) -> None:
        self.daemon = daemon
        self.hello = hello or {}
        self.ws: Any = None
        self.session_id = ""
        self.last_seq = 0
        self.finished: set[str] = set()  # request ids whose done or error came
        self.subscribed = False

    @property
    def session(self) -> Session:
        session = self.daemon.sessions.get(self.session_id)
        assert session is not None
        return session

    async def connect(self) -> dict[str, Any]:
        self.ws = await websockets.connect(ws_url(self.daemon), max_size=None, ping_interval=None)
        hello = dict(self.hello)
        if self.session_id:
            hello.update(session_id=self.session_id, last_seq=self.last_seq)
        await self.ws.send(json.dumps(hello))
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        if self.session_id:
            assert welcome["resumed"] is True
        self.session_id = welcome["session_id"]
        self.subscribed = False
        return welcome

    async def recv(self) -> dict[str, Any]:
        """The next message; generation events must come in seq order, none missing."""
        message = json.loads(await within(self.ws.recv(), FAST, "message from the server"))
        assert message.get("code") != "internal", message
        if is_event(message):
            assert message["seq"] == self.last_seq + 1, (self.last_seq, message)
            self.last_seq = message["seq"]
            if message["type"] in ("done", "error"):
                self.finished.add(message["request_id"])
        return message

    async def send(self, frame: Frame) -> None:
        if frame.as_text:
            await self.ws.send(frame.data, text=True)
        else:
            await self.ws.send(frame.data)

    async def exchange(self, frame: Frame) -> list[dict[str, Any]]:
        """Send ``frame`` and a marker ping; return the direct answers that came between."""
        await self.send(frame)
        message = decoded(frame)
        kind = message.get("type") if message is not None else None
        await self.ws.send('{"type":"ping"}')
        pongs = 2 if kind == "ping" else 1
        answers = []
        while True:
            answer = await self.recv()
            if is_event(answer) or (answer["type"] == "resources" and kind != "get_resources"):
                continue  # generation events, and a subscription's reports
            answers.append(answer)
            if answer["type"] == "pong":
                pongs -= 1
                if not pongs:
                    return answers[:-1]

    async def refused(self, frame: Frame, code: int) -> None:
        """``frame`` must close the connection with ``code``; then resume the session."""
        await self.send(frame)
        with pytest.raises(ConnectionClosed):
            while True:
                await self.recv()
        assert self.ws.close_code == code
        await self.connect()

    async def settle(self, accepted: str | None = None) -> None:
        """End what the last frame started: a generation (cancelled) and a subscription.

        ``accepted``: the request id of an inference the last frame started. It ends in
        a done or error event, or, refused while it was being admitted, in an error
        without a seq that may follow the ping's pong (docs/protocol.md, Order).
        """
        if accepted is not None:
            if self.session.running is not None:
                await self.ws.send('{"type":"cancel"}')
            while accepted not in self.finished:
                message = await self.recv()
                if message["type"] == "error" and not is_event(message):
                    break  # its late refusal
        if self.subscribed:
            await self.ws.send('{"type":"subscribe_resources","interval":0}')
            while (await self.recv())["type"] != "subscribed":
                pass
            self.subscribed = False


def comparable(session: Session) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in session.snapshot().items() if k != "last_active"})


async def check_frame(client: FuzzClient, frame: Frame) -> None:
    """The properties of one frame on a connection that is open and idle."""
    try:
        async with asyncio.timeout(60):
            await check_frame_answer(client, frame)
    except BaseException:
        # Start the next case in step: a fresh connection to the same session.
        await client.ws.close()
        await client.connect()
        raise


async def check_frame_answer(client: FuzzClient, frame: Frame) -> None:
    code = close_expected(frame)
    if code is not None:
        before = comparable(client.session)
        await client.refused(frame, code)
        assert comparable(client.session) == before
        return
    before = comparable(client.session)
    requests = client.session.requests
    answers = await client.exchange(frame)
    accepted = client.session.requests > requests and not answers
    assert len(answers) == 1 or accepted, (frame, answers)
    answer = answers[0] if answers else {"type": "start"}
    if answer["type"] == "error":
        # A bad message never changes what the session had.
        assert comparable(client.session) == before, answer
    elif answer["type"] == "subscribed":
        client.subscribed = answer["interval"] != 0
    await client.settle(f"r{client.session.requests}" if accepted else None)


def run_cases(
    loop: asyncio.AbstractEventLoop,
    strategy: st.SearchStrategy[Any],
    examples: int,
    case: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[], None]:
    """A hypothesis test to run in a worker thread; each case runs on ``loop``."""

    @fuzz_settings(examples)
    @given(strategy)
    def run(value: Any) -> None:
        asyncio.run_coroutine_threadsafe(case(value), loop).result(120)

    return run


# -- the log ---------------------------------------------------------------------------------


class LogLines(logging.Handler):
    """Every record's message, checked: one printable line (control characters escaped)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bad: list[str] = []
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        message = record.getMessage()
        if not message.isprintable():
            self.bad.append(f"{record.name}: {message!r}")


@pytest.fixture
def log_lines():
    """Collect llmwsd's and websockets' log records as the daemon would log them (INFO)."""
    handler = LogLines()
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # as llmwsd's logsetup does
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)
    assert handler.count, "no log records were seen"
    assert not handler.bad, "log lines with unescaped client data:\n" + "\n".join(handler.bad[:10])


@pytest.fixture
async def fuzz_daemon(fake_daemon_factory) -> Daemon:
    return await fake_daemon_factory(**FUZZ_CONFIG)


# -- the tests -------------------------------------------------------------------------------


async def seeded(client: FuzzClient) -> None:
    """Give the session a conversation and buffered events to lose."""
    await client.connect()
    for text in ("my name is Alice", "remember the number 42"):
        await client.exchange(Frame(json.dumps({"type": "inference", "prompt": {"user": text}})))
        while f"r{client.session.requests}" not in client.finished:
            await client.recv()
    assert len(client.session.messages) == 4


async def check_stored_session(
    fake_daemon_factory: Any,
    daemon: Daemon,
    client: FuzzClient,
    config: dict[str, Any] = FUZZ_CONFIG,
) -> None:
    """What the fuzzed session holds survives a restart and a resume, event for event."""
    expected = comparable(client.session)
    await client.ws.close()
    await daemon.shutdown()
    restarted = await fake_daemon_factory(**config)
    session = restarted.sessions.get(client.session_id)
    assert session is not None
    assert comparable(session) == expected
    client.daemon = restarted
    replay = FuzzClient(restarted, client.hello)
    replay.session_id = client.session_id
    replay.last_seq = expected["events"][0]["seq"] - 1 if expected["events"] else 0
    await replay.connect()
    replayed = []
    while len(replayed) < len(expected["events"]):
        replayed.append(await replay.recv())
    assert replayed == expected["events"]
    assert (await replay.exchange(Frame('{"type":"history"}')))[0]["messages"] == session.history()
    await replay.ws.close()


async def test_fuzzed_messages(fuzz_daemon: Daemon, fake_daemon_factory, log_lines) -> None:
    client = FuzzClient(fuzz_daemon)
    await seeded(client)
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(
        run_cases(loop, json_frames(), 2500, lambda frame: check_frame(client, frame))
    )
    assert client.ws.close_code is None  # one connection took every bad message
    await check_stored_session(fake_daemon_factory, fuzz_daemon, client)


async def test_fuzzed_raw_frames(fuzz_daemon: Daemon, fake_daemon_factory, log_lines) -> None:
    client = FuzzClient(fuzz_daemon)
    await seeded(client)
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(
        run_cases(loop, raw_frames(), 800, lambda frame: check_frame(client, frame))
    )
    await check_stored_session(fake_daemon_factory, fuzz_daemon, client)


hellos = st.fixed_dictionaries(
    {},
    optional={
        "session_id": st.one_of(strings, any_json, st.uuids().map(str), st.just("KNOWN")),
        "last_seq": st.one_of(numbers, any_json),
        "token": st.one_of(strings, any_json),
        "type": st.one_of(st.sampled_from(sorted(CLIENT_TYPES)), scalars),
    },
)


async def check_hello(daemon: Daemon, known: str, hello: dict[str, Any], valid: str = "") -> None:
    """A fuzzed first frame: welcome first, then its answers; the connection stays open.

    With tokens on (``valid`` is the one good token), a hello without it is refused
    with ``unauthorized`` and close 1008.
    """
    if hello.get("session_id") == "KNOWN":
        hello = {**hello, "session_id": known}
    text = render(hello, ascii_only=True)
    async with websockets.connect(ws_url(daemon), max_size=None, ping_interval=None) as ws:
        await ws.send(text)
        code = close_expected(Frame(text))
        if code is not None:
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == code
            return
        first = json.loads(await within(ws.recv(), FAST, "welcome or refusal"))
        parsed = decoded(Frame(text))  # a hello the server cannot read presents no token
        if valid and (parsed is None or parsed.get("token") != valid):
            assert first["code"] == "unauthorized", first
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 1008
            return
        assert first["type"] == "welcome", first
        await ws.send('{"type":"ping"}')
        while (answer := json.loads(await within(ws.recv(), FAST, "pong")))["type"] != "pong":
            assert answer.get("code") != "internal", answer
        if first["resumed"]:
            assert first["session_id"] == known
        session = daemon.sessions.get(first["session_id"])
        if session is not None and session.running is not None:
            await ws.send('{"type":"cancel"}')
            while session.running is not None:
                await within(ws.recv(), FAST, "end of the cancelled answer")


async def test_fuzzed_hellos(fuzz_daemon: Daemon, log_lines) -> None:
    client = FuzzClient(fuzz_daemon)
    await seeded(client)
    await client.ws.close()
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(
        run_cases(
            loop, hellos, 400, lambda hello: check_hello(fuzz_daemon, client.session_id, hello)
        )
    )


async def test_fuzz_with_tokens_on(fake_daemon_factory, tmp_path: Path, log_lines) -> None:
    """A subset of the above with access tokens required (the failure lockout off)."""
    api = {"tokens_file": str(tmp_path / "tokens.json"), "max_auth_failures": 0}
    daemon = await fake_daemon_factory(**{**FUZZ_CONFIG, "api": api})
    _, token = daemon.server.gate.auth.access.add("fuzzer")
    client = FuzzClient(daemon, {"token": token})
    await seeded(client)
    await client.ws.close()  # the hellos below resume its session now and then
    loop = asyncio.get_running_loop()
    tokens = st.one_of(st.just(token), st.just(token[:-1]), st.just(token + "x"), strings, any_json)
    authed_hellos = st.tuples(hellos, tokens).map(lambda pair: {**pair[0], "token": pair[1]})
    await asyncio.to_thread(
        run_cases(
            loop,
            authed_hellos,
            300,
            lambda hello: check_hello(daemon, client.session_id, hello, valid=token),
        )
    )
    await client.connect()
    await asyncio.to_thread(
        run_cases(loop, json_frames() | raw_frames(), 400, lambda frame: check_frame(client, frame))
    )
    await check_stored_session(fake_daemon_factory, daemon, client, {**FUZZ_CONFIG, "api": api})


legacy_frames = st.one_of(
    st.text(max_size=60).filter(lambda t: not t.lstrip().startswith("{")),
    st.sampled_from(["<|system|>\x1b[2J<|end|><|user|>hi\nINFO forged<|end|>", "<|end|>", " "]),
    st.binary(max_size=40),
)


async def check_text_mode(daemon: Daemon, first: str | bytes) -> None:
    """A first frame that is not JSON: a legacy prompt, answered in text, then a close."""
    async with websockets.connect(ws_url(daemon), max_size=None, ping_interval=None) as ws:
        await ws.send(first)
        with contextlib.suppress(ConnectionClosed):  # iteration ends so only on code 1000
            async with asyncio.timeout(30):
                async for frame in ws:
                    assert isinstance(frame, str) and not frame.startswith("error: internal")
    assert ws.close_code in (1000, 1007, 1008), (first, ws.close_code, ws.close_reason)


async def test_fuzzed_text_mode_first_frames(fuzz_daemon: Daemon, log_lines) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(
        run_cases(loop, legacy_frames, 150, lambda first: check_text_mode(fuzz_daemon, first))
    )


# -- pull arguments: nothing a client sends becomes an option of git or git-lfs ---------------

# Options git would act on (reading files, running commands); drawn with one or two dashes.
GIT_OPTIONS = [
    "pathspec-from-file=/etc/passwd",
    "orphan=x",
    "upload-pack=touch pwned",
    "config=core.sshCommand=touch pwned",
    "template=/tmp",
    "exec=x",
    "end-of-options",
    "b",
    "c",
    "oProxyCommand=touch pwned",
    "",
]
option_like = st.builds(
    lambda dashes, body: dashes + body,
    st.sampled_from(["-", "--"]),
    st.one_of(st.sampled_from(GIT_OPTIONS), st.text(max_size=20)),
)
pull_sources = st.one_of(
    st.sampled_from(["http://127.0.0.1:9/x.git", "https://127.0.0.1:9/x", "file:///tmp", "/tmp"]),
    option_like,
    option_like.map(lambda o: f"ssh://{o}/repo"),
    option_like.map(lambda o: f"{o}@host:repo"),
    option_like.map(lambda o: f"https://{o}/repo.git"),
    strings,
)
pull_revisions = st.one_of(
    st.none(), option_like, st.sampled_from(["main", "v1.0", "refs/pr/1", "a" * 40]), strings
)
pull_names = st.one_of(st.none(), option_like, st.just("x"), strings)
# The daemon's own flags; an argument beginning with '-' that is not one came from a client.
OWN_FLAGS = {"--depth", "--quiet", "--", "--gguf", "-m", "-z"}


@fuzz_settings(300)
@given(source=pull_sources, revision=pull_revisions, name=pull_names)
def test_fuzzed_pull_arguments_never_become_options(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    source,
    revision,
    name,
) -> None:
    from llmwsd.catalogue import fetch
    from llmwsd.catalogue.pull import Pulls
    from llmwsd.config import parse_config

    started: list[list[str]] = []

    class Child:
        """Every step "succeeds" at once, so that a revision reaches its checkout; git's
        ls-files then fails (its output is empty), which ends the pull."""

        pid, returncode = 0, 0

        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            self.args = argv  # what subprocess.run's CalledProcessError names
            started.append(list(argv))
            self.returncode = 1 if "ls-files" in argv else 0

        def poll(self) -> int:
            return self.returncode

        def wait(self, timeout: float | None = None) -> int:
            return self.returncode

        def communicate(self, *args: Any, **kwargs: Any) -> tuple[bytes, bytes]:
            return b"", b"no git in this test"

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

    monkeypatch.setattr(fetch.subprocess, "Popen", Child)
    state = tmp_path_factory.mktemp("pulls")
    config = parse_config({"paths": {"state_dir": str(state)}, "models": {"dirs": []}})

    async def pull() -> None:
        pulls = Pulls(lambda: config)
        pulls.open()
        try:
            started_pull = await pulls.start(source, name, revision)
        except LLMWSError as e:
            assert e.code in ("bad_request", "not_found"), e
            return
        assert started_pull.task is not None
        await asyncio.gather(started_pull.task, return_exceptions=True)
        assert started_pull.state == "failed" and started_pull.error is not None
        assert started_pull.error["code"] == "internal"
        assert "no git in this test" not in started_pull.error["message"]  # only our words

    asyncio.run(pull())
    for argv in started:
        for arg in argv[1:]:
            assert not arg.startswith("-") or arg in OWN_FLAGS or arg.startswith("--include="), argv
