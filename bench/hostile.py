"""`make hostile`: hostile clients against a real llmwsd, and a table of what broke.

Starts llmwsd with the default model on 127.0.0.1 (a temporary state folder,
model management allowed for an admin token, a 3 s hello timeout) and runs,
each part bounded in count and time:

1. hostile inputs, each on its own JSON-mode connection (or text mode, or raw
   HTTP): malformed JSON, wrong types, unknown types, huge and invalid UTF-8
   frames, bad session ids and seqs, `..` paths and option-like values in the
   model-management messages, generation settings at and past every edge,
   legacy prompts, DNS rebinding, POST and garbage requests, seeded mutations;
2. session takeovers: a new connection takes a session over, the old one gets
   4000, nothing is lost (history, or the seqs of an answer taken mid-stream);
3. slowloris: sockets that never finish the request or the hello, while a
   normal client keeps asking;
4. pings on a few connections, each must get its pong;
5. a load of concurrent clients, one short question each;
6. kill -9 in the middle of running answers, a restart on the same state
   folder, then every session made during the run is resumed.

Every reply (and close reason, and HTTP answer) is searched for the session
key's bytes in their hex, base64 and text forms. Exit status 1 when anything is
a defect: an `internal` error, no answer in time (a hang), a close nobody asked
for, a wrong answer, a leak, a lost session, a crash. `--quick` scales the
counts down. Each part stops starting work at its share of an overall deadline
(600 s, 180 s with `--quick`); nothing here asserts on wall-clock times.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmwsd.auth import TokenStore  # noqa: E402
from tests.conftest import DEFAULT_MODEL, RunningDaemon  # noqa: E402

MAX_MESSAGE_SIZE = 1024 * 1024  # the default, set explicitly so the sizes below are known
MAX_PROMPT_CHARS = 100_000
HELLO_TIMEOUT = 3.0
PING = '{"type":"ping"}'
# Replies that belong to a stream, not the answer to the message just sent.
STREAM = {"start", "token", "queued", "log", "download_progress"}
EVENTS = {"start", "token", "done", "error", "queued"}  # a session's events: they carry seq
# (full, --quick)
SCALE = {
    "deadline": (600, 180),
    "mutations": (320, 60),
    "takeovers": (150, 30),
    "slowloris": (100, 100),
    "pings": (20_000, 2_000),
    "clients": (96, 24),
    "cut_off": (4, 2),
}
UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@dataclass(frozen=True)
class Raw:
    """JSON text written as is (NaN, 1e999, deep nesting): json.dumps cannot write it."""

    text: str


def render(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)


def short(value: Any, n: int = 110) -> str:
    """``value`` as a label: rendered as JSON, cut to about ``n`` characters."""
    if isinstance(value, str):
        value = json.dumps(value)[1:-1]  # control characters and surrogates escaped
    else:
        value = repr(value) if isinstance(value, bytes) else render(value)
    return value if len(value) <= n else f"{value[: n - 30]}…({len(value)} chars)"


@dataclass
class Case:
    """One hostile input: what opens the connection, the frames, the answers that are right.

    ``expect`` holds the acceptable answers to the last frame: a reply's type,
    ``error:CODE``, ``close:CODE``; ``error:*`` is any error but ``internal``, ``*``
    any answer at all (the connection must still answer a ping afterwards).
    """

    label: str
    frames: list[Any]  # dicts are rendered, str sent as is, bytes as a text frame (bad UTF-8)
    expect: tuple[str, ...]
    hello: Any = "{}"
    admin: bool = False
    text_mode: bool = False
    timeout: float = 15.0
    check: Callable[[list[dict[str, Any]]], str | None] | None = None


@dataclass
class Run:
    quick: bool
    folder: Path
    deadline: float = 0.0
    started: float = field(default_factory=time.monotonic)
    daemon: RunningDaemon | None = None
    admin_token: str = ""
    secret: list[str] = field(default_factory=list)
    sessions: dict[str, str | None] = field(default_factory=dict)  # id -> token it was made with
    verbose: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    figures: dict[str, str] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def scale(self, name: str) -> int:
        return SCALE[name][1 if self.quick else 0]

    def past(self, fraction: float) -> bool:
        """Whether ``fraction`` of the run's time is used up (parts stop starting work then)."""
        total = self.deadline - self.started
        return time.monotonic() > self.started + fraction * total

    def defect(self, text: str) -> None:
        self.defects.append(text)

    def scan(self, text: str | bytes, where: str) -> None:
        """Count a leak when any form of the session key appears in ``text``."""
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        if any(form in text for form in self.secret):
            self.counts["leaks"] += 1
            self.defect(f"{where} → the session key appears in the reply")

    @property
    def port(self) -> int:
        assert self.daemon is not None
        return self.daemon.port


# -- the daemon -------------------------------------------------------------------------------


def make_daemon(run: Run) -> RunningDaemon:
    """llmwsd on 127.0.0.1 with a hard-linked copy of the default model (a delete only unlinks)."""
    copy_dir = run.folder / "models" / DEFAULT_MODEL.name
    copy_dir.mkdir(parents=True)
    for item in DEFAULT_MODEL.iterdir():
        if item.is_file():
            try:
                os.link(item, copy_dir / item.name)
            except OSError:
                os.symlink(item, copy_dir / item.name)
    tokens = run.folder / "admin-tokens.json"
    _, run.admin_token = TokenStore(tokens, admin=True).add("ops")
    # Pulls go nowhere: Hugging Face and any proxy point at a closed local port.
    nowhere = "http://127.0.0.1:9"
    env = {"HF_ENDPOINT": nowhere, "HF_HUB_DISABLE_TELEMETRY": "1", "GIT_TERMINAL_PROMPT": "0"}
    env |= {k: nowhere for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy")}
    env |= {"https_proxy": nowhere, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1"}
    return RunningDaemon(
        run.folder,
        env=env,
        server={"hello_timeout": HELLO_TIMEOUT, "max_message_size": MAX_MESSAGE_SIZE},
        models={"dirs": [str(copy_dir.parent)]},
        generation_defaults={"do_sample": False, "max_new_tokens": 8},
        # The pings and the load come from one address as fast as they can: the rate and
        # connection limits have their own tests; here they would only hide the answers.
        limits={
            "messages_per_second": 1e6,
            "message_burst": 1_000_000,
            "max_connections": 1024,
            "max_connections_per_address": 512,
            "max_queue": 128,
            "max_prompt_chars": MAX_PROMPT_CHARS,
        },
        # Every input makes a session, and all of them are resumed after the kill -9.
        sessions={"max_sessions": 8192, "max_per_client": 8192},
        api={"allow_model_management": True, "admin_tokens_file": str(tokens)},
    )


def secret_forms(path: Path) -> list[str]:
    """The session key as it could appear in a reply: the file's text, hex, base64, repr."""
    data = path.read_bytes()
    text = data.decode("latin-1").strip()
    key = data if len(data) == 32 else base64.b64decode(text)
    forms = {text, key.hex(), key.hex().upper(), repr(key)[2:-1], key.decode("latin-1")}
    forms |= {base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()}
    forms |= {f.rstrip("=") for f in forms}
    return sorted(f for f in forms if len(f) >= 16)


def check_alive(run: Run, part: str) -> None:
    """A daemon that exited on its own is a crash: record it and start it again."""
    assert run.daemon is not None and run.daemon.proc is not None
    rc = run.daemon.proc.poll()
    if rc is not None:
        run.counts["crashes"] += 1
        run.defect(f"the daemon exited with {rc} during {part}")
        run.daemon.start(timeout=180)


# -- WebSocket helpers -----------------------------------------------------------------------


async def open_ws(run: Run, token: str | None = None) -> ClientConnection:
    assert run.daemon is not None
    url = run.daemon.url + (f"?token={token}" if token else "")
    return await asyncio.wait_for(
        connect(url, max_size=None, compression=None, ping_interval=None, close_timeout=2), 15
    )


async def send(ws: ClientConnection, frame: Any) -> None:
    if isinstance(frame, bytes):
        await ws.send(frame, text=True)  # sent as is: the server must check the UTF-8
    else:
        await ws.send(frame if isinstance(frame, str) else render(frame))


async def next_answer(
    run: Run, ws: ClientConnection, timeout: float, seen: list, where: str, replayed: int = 0
) -> str:
    """The next answer: a reply's type, ``error:CODE``, ``close:CODE`` or ``hang``.

    Events up to seq ``replayed`` are a resumed session's replay, not an answer.
    """
    end = time.monotonic() + timeout
    while True:
        try:
            frame = await asyncio.wait_for(ws.recv(), max(end - time.monotonic(), 0.01))
        except TimeoutError:
            return "hang"
        except ConnectionClosed as e:
            run.scan(e.rcvd.reason if e.rcvd else "", where)
            return f"close:{e.rcvd.code if e.rcvd else 1006}"
        run.scan(frame, where)
        try:
            message = json.loads(frame)
        except ValueError:
            return "not JSON"
        seen.append(message)
        kind = message.get("type")
        if kind in EVENTS and isinstance(message.get("seq"), int) and message["seq"] <= replayed:
            continue
        if kind == "error":
            return f"error:{message.get('code')}"
        if kind not in STREAM:
            return str(kind)


async def recv_until(run: Run, ws: ClientConnection, kinds: set[str], timeout: float) -> list:
    """Messages until one whose type is in ``kinds`` (or an error); raises on timeout."""
    received: list[dict[str, Any]] = []
    end = time.monotonic() + timeout
    while True:
        frame = await asyncio.wait_for(ws.recv(), max(end - time.monotonic(), 0.01))
        run.scan(frame, "a client of the run")
        received.append(json.loads(frame))
        if received[-1].get("type") in kinds | {"error"}:
            return received


async def hello(
    run: Run, fields: dict[str, Any] | None = None, token: str | None = None
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await open_ws(run, token)
    await ws.send(json.dumps(fields or {}))
    welcome = (await recv_until(run, ws, {"welcome"}, 15))[-1]
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"no welcome: {short(welcome)}")
    run.sessions[welcome["session_id"]] = token
    return ws, welcome


def what(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    if isinstance(e, ConnectionClosed):
        return f"closed {e.rcvd.code if e.rcvd else 1006}"
    return f"{type(e).__name__}: {e}"


def ask(user: str, **config: Any) -> dict[str, Any]:
    return {
        "type": "inference",
        "prompt": {"user": user},
        "config": {"max_new_tokens": 4, **config},
    }


# -- 1. hostile inputs --------------------------------------------------------------------------


def matches(answer: str, expect: tuple[str, ...]) -> bool:
    bad = answer in ("hang", "error:internal") or answer.startswith("close:")
    for pattern in expect:
        if pattern == answer or (pattern == "*" and not bad):
            return True
        if pattern == "error:*" and answer.startswith("error:") and answer != "error:internal":
            return True
    return False


async def try_case(run: Run, case: Case) -> None:
    seen: list[dict[str, Any]] = []
    answers: list[str] = []
    alive = None
    token = run.admin_token if case.admin else None
    try:
        ws = await open_ws(run, token)
    except Exception as e:
        answers.append(f"no connection ({what(e)})")
    else:
        async with ws:
            try:
                await send(ws, case.hello)
                if case.text_mode:
                    answers.append(await text_answer(run, ws, case))
                else:
                    answers.append(await next_answer(run, ws, case.timeout, seen, case.label))
                if answers[-1] == "welcome":
                    run.sessions[seen[0]["session_id"]] = token
                    replayed = seen[0]["last_seq"] if seen[0].get("resumed") else 0
                    for frame in case.frames:
                        await send(ws, frame)
                        answer = await next_answer(
                            run, ws, case.timeout, seen, case.label, replayed
                        )
                        answers.append(answer)
                        if answers[-1] == "hang" or answers[-1].startswith("close:"):
                            break
                    if answers[-1] != "hang" and not answers[-1].startswith("close:"):
                        # A bad message leaves the connection open: it still answers a ping.
                        await send(ws, PING)
                        while alive not in ("pong", "hang", "error:internal"):
                            alive = await next_answer(run, ws, 15, seen, case.label)
                            if alive.startswith("close:"):
                                break
            except ConnectionClosed as e:
                answers.append(f"close:{e.rcvd.code if e.rcvd else 1006}")
    judge(run, case, answers, alive, seen)


async def text_answer(run: Run, ws: ClientConnection, case: Case) -> str:
    """A legacy client's answer: its close code, ``+error`` when a frame said ``error:``."""
    frames = []
    try:
        while True:
            frame = await asyncio.wait_for(ws.recv(), case.timeout)
            run.scan(frame, case.label)
            frames.append(str(frame))
    except TimeoutError:
        return "hang"
    except ConnectionClosed as e:
        error = any(f.startswith("error:") for f in frames)
        return f"close:{e.rcvd.code if e.rcvd else 1006}" + ("+error" if error else "")


def judge(run: Run, case: Case, answers: list[str], alive: str | None, seen: list) -> None:
    last = answers[-1] if answers else "nothing"
    problem = None
    if "error:internal" in (*answers, alive):
        kind = "internal errors"
    elif "hang" in (*answers, alive):
        kind = "hangs"
    elif matches(last, case.expect) and alive in (None, "pong"):
        kind = "expected"
        problem = case.check(seen) if case.check else None
        if problem:
            kind = "wrong answers"
    elif any(a.startswith(("close:", "no connection")) for a in (*answers, alive or "")):
        kind = "unexpected closes"
    else:
        kind = "wrong answers"
    run.counts["inputs"] += 1
    run.counts[kind] += 1
    got = " / ".join(answers) + (f", then ping → {alive}" if alive not in (None, "pong") else "")
    if run.verbose:
        print(f"  {kind:<17} {case.label} → {got}", flush=True)
    if kind == "expected":
        accepted = not last.startswith(("error:", "close:")) or last == "close:1000"
        run.counts["expected replies" if accepted else "expected errors"] += 1
        return
    expected = " or ".join(case.expect)
    run.defect(
        f"[{kind}] {case.label} → {got} (expected {expected}){': ' + problem if problem else ''}"
    )


async def http_raw(run: Run, data: bytes, timeout: float = 10) -> str:
    """Raw bytes to the port: the HTTP status that came back, ``empty reply`` or ``hang``."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", run.port), 10)
    try:
        writer.write(data)
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as e:
            run.scan(e.partial, "raw HTTP")
            return "empty reply" if not e.partial else f"garbled: {e.partial[:60]!r}"
        except asyncio.LimitOverrunError:
            return "garbled: no end of headers"
        except TimeoutError:
            return "hang"
        with_body = head
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            with contextlib.suppress(TimeoutError):
                with_body += await asyncio.wait_for(reader.read(65536), 2)
        run.scan(with_body, "raw HTTP")
        return head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
    except ConnectionResetError:
        return "empty reply"
    finally:
        writer.close()


def api_post(headers: str, body: str) -> str:
    """A chat completion request with ``body``, as raw HTTP."""
    length = len(body.encode("latin-1"))
    return f"POST /v1/chat/completions HTTP/1.1\r\n{headers}Content-Length: {length}\r\n\r\n{body}"


async def http_cases(run: Run) -> None:
    """DNS rebinding, POST and garbage: each answer is recorded, hangs and 2xx/5xx are defects."""
    port = run.port
    evil = f"Host: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\n"
    local = f"Host: 127.0.0.1:{port}\r\n"
    cases = [
        ("DNS rebinding handshake", f"GET / HTTP/1.1\r\n{evil}{UPGRADE}\r\n", {"421", "403"}),
        ("DNS rebinding GET /healthz", f"GET /healthz HTTP/1.1\r\n{evil}\r\n", {"421", "403"}),
        ("POST /", f"POST / HTTP/1.1\r\n{local}Content-Length: 5\r\n\r\nhello", {"405", "400"}),
        ("garbage request line", "\x16\x03\x01\x02\x00 garbage\r\n\r\n", {"400"}),
        ("request line of three words", "HELLO THERE FRIEND\r\n\r\n", {"400", "405"}),
        ("GET without a version", "GET /\r\n\r\n", {"400"}),
        ("HTTP/9.9", f"GET / HTTP/9.9\r\n{local}\r\n", {"400", "505"}),
        ("a 64 KiB header", f"GET / HTTP/1.1\r\n{local}X: {'a' * 65536}\r\n\r\n", {"400", "431"}),
        # The HTTP APIs (/v1/): each refusal in OpenAI's shape, the connection kept.
        ("API: DNS rebinding", f"GET /v1/models HTTP/1.1\r\n{evil}\r\n", {"421", "403"}),
        (
            "API: a page elsewhere",
            api_post(f"Host: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n", "{}"),
            {"403"},
        ),
        (
            "API: broken JSON",
            api_post(local, '{"messages": [{"role": "user", "content": "hi"'),
            {"400"},
        ),
        ("API: nested JSON", api_post(local, "[" * 100_000 + "]" * 100_000), {"400"}),
        (
            "API: wrong types",
            api_post(local, '{"messages": [{"role": 7, "content": []}], "n": "2"}'),
            {"400"},
        ),
        (
            "API: an image",
            api_post(local, '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'),
            {"400"},
        ),
        (
            "API: a body over the limit",
            f"POST /v1/chat/completions HTTP/1.1\r\n{local}Content-Length: 99999999\r\n\r\n",
            {"413"},
        ),
        (
            "API: a .. response id",
            f"GET /v1/responses/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\n{local}\r\n",
            {"404"},
        ),
        ("API: an unknown route", f"DELETE /v1/everything HTTP/1.1\r\n{local}\r\n", {"404"}),
    ]
    for label, text, good in cases:
        try:
            status = await http_raw(run, text.encode("latin-1"))
        except Exception as e:
            status = f"no connection ({what(e)})"
        run.figures[label] = status
        run.counts["inputs"] += 1
        if run.verbose:
            print(f"  {'HTTP':<17} {label} → {status}", flush=True)
        if status in good or (status == "empty reply" and not label.startswith("DNS")):
            run.counts["expected"] += 1
            run.counts["expected errors"] += 1
        else:
            kind = "hangs" if status == "hang" else "wrong answers"
            run.counts[kind] += 1
            run.defect(f"[{kind}] {label} → {status} (expected {' or '.join(sorted(good))})")


# The inputs, as tables. A frame is a dict (rendered), a str (sent as is) or bytes (a text
# frame that is not UTF-8). Expected answers are separated by "|".
# fmt: off
MALFORMED = [
    "{not json", "{", "}", "", " ", '{"type":', "{'type':'ping'}", '{"type":"ping",}', "null",
    "true", "1", '"ping"', "[1, 2]", '{"type":"ping"}{"type":"ping"}', '{"type":"ping"} x',
    "\x00", '{"type":"ping","x":"\\ud800"}', '{"type":"ping","x":"\\udfff"}',
    '{"type":"ack","seq":1e999}', '{"type":"ping","a":' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"a":' * 50_000 + "1" + "}" * 50_000,
]
BASE = {  # one valid message of each kind that takes fields
    "inference": ask("Say hi."),
    "config": {"type": "config", "data": {"temperature": 0.5}},
    "ack": {"type": "ack", "seq": 0},
    "cancel": {"type": "cancel"},
    "subscribe_resources": {"type": "subscribe_resources", "interval": 0},
    "download_model": {"type": "download_model", "repo": "org/name", "target_dir": "hx"},
    "switch_model": {"type": "switch_model", "model": "no-such-model"},
    "delete_model": {"type": "delete_model", "model_name": "no-such-model"},
}
WRONG_TYPES = [  # message kind, field (a.b: nested)
    ("inference", "prompt"), ("inference", "prompt.user"), ("inference", "prompt.system"),
    ("inference", "config"), ("config", "data"), ("ack", "seq"), ("cancel", "request_id"),
    ("subscribe_resources", "interval"), ("download_model", "repo"),
    ("download_model", "target_dir"), ("download_model", "revision"), ("switch_model", "model"),
    ("switch_model", "model_path"), ("delete_model", "model_name"), ("delete_model", "force"),
]
WRONG_VALUES = [None, True, 0, -1, 1.5, "", "x", [], {}, [1, "a"], {"a": 1}, 10**30, Raw("NaN")]
UNKNOWN_TYPES = ["bogus", "", "PING", "ping ", 5, None, [], "__proto__", "x" * 10_000]
PLAIN = [  # valid messages without fields, and their replies
    ("history", "history"), ("reset", "reset_done"), ("get_status", "status"),
    ("list_models", "models_list"), ("recheck_model", "recheck_complete"),
    ("get_resources", "resources"), ("cancel", "cancel_ack"), ("ping", "pong"),
    ("train", "error:unsupported"), ("train_status", "error:unsupported"),
    ("save_snapshot", "error:unsupported"),
]
BAD_UTF8 = [
    b"\xff\xfe", b'{"type":"ping","x":"\xc3\x28"}', b"\xed\xa0\x80", b"\xc0\xaf",
    b"\xf8\x88\x80\x80\x80",
]
BAD_SESSION_IDS = [
    "../x", "../../etc/passwd", "../" * 12, "not-a-uuid", "", 5, [], {}, True,
    "{12345678-1234-1234-1234-123456789abc}", "12345678-1234-1234-1234-123456789abc\x00",
]
BAD_SEQS = [2**53, -1, 1.5, "5", True, Raw("1e999"), Raw("NaN")]
# Names and paths a remote admin may send; KEY is replaced by <state_dir>/session.key,
# STATE by <state_dir>.
OPTION_LIKE = [
    "STATE", "/nonexistent/dir",
    "../x", "..", ".", "../../etc/passwd", "/etc/passwd", "KEY", "../state/session.key",
    "--pathspec-from-file=KEY", "--orphan=x", "-b", "-", "--upload-pack=true",
    "--config=core.sshCommand=true", "x\x00y", "%2e%2e/x", "~/.ssh/id_rsa", "file://KEY",
    "ext::sh -c true", "-oProxyCommand=true:x", "models/../../state",
]
MANAGEMENT: dict[str, Callable[[Any], dict[str, Any]]] = {
    "download_model repo": lambda v: {"type": "download_model", "repo": v},
    "download_model target_dir": lambda v: {**BASE["download_model"], "target_dir": v},
    "download_model revision": lambda v: {**BASE["download_model"], "revision": v},
    "switch_model model": lambda v: {"type": "switch_model", "model": v},
    "switch_model model_path": lambda v: {"type": "switch_model", "model_path": v},
    "delete_model model_name": lambda v: {"type": "delete_model", "model_name": v},
    "delete_model --force model_name": lambda v: {
        "type": "delete_model", "model_name": v, "force": True},
}
EDGES = [  # setting, values in range, values past it
    ("temperature", [0, 1e-300, 100], [100.0001, -1, Raw("NaN"), Raw("Infinity"), Raw("1e999")]),
    ("top_p", [1e-300, 1], [0, 1.5, -1e-300]),
    ("top_k", [0, 1, 10**6], [-1, 10**6 + 1, 1.5]),
    ("repetition_penalty", [1e-300, 10], [0, 10.0001, -1]),
    ("max_new_tokens", [1], [0, -1, 2**63]),
    ("min_new_tokens", [0, 4], [5, -1, 1.5]),  # with max_new_tokens 4
    ("seed", [0, 2**63 - 1, None], [2**63, -1, "1"]),
    ("stop", [["."], [], "x", ["<|im_end|>"] * 16], [[""], ["x"] * 17, ["x" * 257], [1]]),
]
LEGACY = [  # text-mode prompts and how they end
    ("<|system|>You are terse<|end|>\n<|user|>Hello<|end|>\n<|assistant|>\n", "close:1000"),
    ("<|system|>A<|end|><|system|>B<|end|><|user|>one<|end|><|user|>two<|end|><|assistant|>",
     "close:1000"),
    ("<|user|>first<|user|>second<|system|>late system<|end|>", "close:1000"),
    ("<|system|>only a system<|end|><|unknown|>what is this<|end|>", "close:1000|close:1008"),
    ("<|user|><|user|><|user|>x", "close:1000"),
    ("plain words, no tags", "close:1000"),
    ("<|end|>", "close:1008|close:1000"),
    ("<|system|>no user<|end|>", "close:1008|close:1000"),
    ("   ", "close:1008|close:1000"),
    ("w " * 200_000, "close:1000+error|close:1000"),  # past max_prompt_chars
]
MUTATION_VALUES = [
    None, True, 0, -1, 2**53, 2**63, 10**30, 1e-300, -0.0, 1.5, Raw("NaN"), Raw("-Infinity"),
    Raw("1e999"), Raw("9" * 400), "", "\x00", "\ud800", "../x", "-b", "--orphan=x",
    "<|user|>hi<|end|>", "\u202e", "😀" * 500, "x" * 3000, [], {}, [None] * 50, {"$ne": 1},
    Raw("[" * 50_000 + "]" * 50_000), "line\nINFO llmwsd: forged",
]
MUTATION_KEYS = ["extra", "temperature", "max_new_tokens", "top_p", "stop", "seed", "session_id"]
# fmt: on


def hostile_cases(run: Run, seed: str) -> list[Case]:
    """Every input of part 1; ``seed`` is a session with an answer, for the seq cases."""
    cases: list[Case] = []
    room = MAX_MESSAGE_SIZE - 100  # a frame this big is under the limit

    def add(label: str, frames: list[Any], expect: str, **kw: Any) -> None:
        cases.append(Case(label, frames, tuple(expect.split("|")), **kw))

    for text in MALFORMED:
        add(f"malformed JSON {short(text)}", [text], "error:*")
    for kind, name in WRONG_TYPES:
        for value in WRONG_VALUES:  # any answer will do, but an answer, and never internal
            message = copy.deepcopy(BASE[kind])
            parent, _, leaf = name.rpartition(".")
            (message[parent] if parent else message)[leaf] = value
            add(f"{kind} {name}={short(value)}", [message], "*", admin=kind.endswith("_model"))
    for kind in UNKNOWN_TYPES:
        add(f"unknown type {short(kind, 40)}", [{"type": kind}], "error:*")
    add("no type", [{"no_type": 1}], "error:*")
    for kind, reply in PLAIN:
        add(f"plain {kind}", [{"type": kind}], reply)

    # Sizes: under the frame limit an answer, over it a 1009 close.
    add("ping padded to just under max_message_size", [{"type": "ping", "p": "x" * room}], "pong")
    add("ping padded past max_message_size", [PING[:-1] + ',"p":"' + "x" * room * 2], "close:1009")
    add("emoji padding under the limit", [{"type": "ping", "p": "😀" * (room // 12)}], "pong")
    add("emoji padding past the limit", [PING[:-1] + ',"p":"' + "😀" * room], "close:1009")
    add("hello past max_message_size", [], "close:1009", hello="{" + " " * MAX_MESSAGE_SIZE + "}")
    add(
        "prompt under the frame limit, over max_prompt_chars",
        [ask("x" * room)],
        "error:bad_request",
    )
    words = ask("w " * (MAX_PROMPT_CHARS // 2))
    add("prompt at max_prompt_chars", [words], "error:context_too_long", timeout=120)
    add("huge session_id", [PING], "error:bad_request", hello={"session_id": "a" * room})
    add("huge type", [{"type": "t" * room}], "error:unknown_type")
    add("huge stop string", [ask("hi", stop=["x" * room])], "error:bad_request")
    for raw in BAD_UTF8:
        add(f"invalid UTF-8 text frame {raw!r}", [raw], "close:1007")
        add(f"invalid UTF-8 hello {raw!r}", [], "close:1007", hello=raw)

    # Hellos: session ids; seqs past the end on a session that exists; tokens of every type.
    for sid in BAD_SESSION_IDS:
        add(
            f"hello session_id={short(sid)}", [PING], "error:bad_request", hello={"session_id": sid}
        )
    unknown = {"session_id": "00000000-0000-0000-0000-000000000000"}
    add("hello with an unknown session_id", [PING], "pong", hello=unknown)
    upper, check = {"session_id": seed.upper()}, resumed_and_clamped(0)
    add("hello with a session's id in upper case", [PING], "pong", hello=upper, check=check)
    for last in [10**15, 2**53 - 1, 0]:
        resume = {"session_id": seed, "last_seq": last}
        check = resumed_and_clamped(last)
        add(f"hello last_seq={last}", [ask("Hi")], "done", hello=resume, timeout=60, check=check)
    for last in BAD_SEQS:
        resume = {"session_id": seed, "last_seq": last}
        add(f"hello last_seq={short(last)}", [PING], "error:bad_request", hello=resume)
    for token in [5, [], "", "x" * 5000, "\x00"]:
        add(f"hello token={short(token, 30)}", [PING], "pong|error:*", hello={"token": token})

    # `..` paths and git options where model management takes a name (with the admin token).
    key = str(run.folder / "state" / "session.key")
    state = str(run.folder / "state")
    for value in (v.replace("KEY", key).replace("STATE", state) for v in OPTION_LIKE):
        for label, make in MANAGEMENT.items():
            # A local path is refused as one, whether it exists or not: anything else
            # would tell a remote client which folders exist on this host.
            local = label == "download_model repo" and value.startswith(("/", "file:"))
            expect = "error:bad_request" if local else "error:*"
            why = " (a local path: refused as one, like an existing folder)" if local else ""
            add(f"{label}={short(value)}{why}", [make(value)], expect, admin=True)
        message = MANAGEMENT["switch_model model"](value)
        add(f"switch_model without a token model={short(value)}", [message], "error:forbidden")

    # Generation settings at and past each edge: in range an answer, past it bad_request.
    for name, good, bad in EDGES:
        for value in good + bad:
            settings = {"do_sample": True, "max_new_tokens": 4, name: value}
            fine, label = value in good, f"{name}={short(value, 40)}"
            answer = "done" if fine else "error:bad_request"
            add(f"inference {label}", [ask("Pick a word.", **settings)], answer, timeout=60)
            answer = "config_ack" if fine else "error:bad_request"
            add(f"config {label}", [{"type": "config", "data": settings}], answer)
    low = {"temperature": 1e-300, "top_p": 1e-300, "top_k": 1, "repetition_penalty": 1e-300}
    high = {"temperature": 100, "top_p": 1, "top_k": 0, "repetition_penalty": 10}
    for label, settings in [("lowest", low), ("highest", high)]:
        message = ask("Hi", do_sample=True, **settings)
        add(f"inference, every setting at its {label}", [message], "done", timeout=60)

    # ack past the end: taken as the newest event, never past it.
    for seq in [10**15, 2**53 - 1, None, 0]:
        frames = [ask("Hi"), {"type": "ack", "seq": seq}]
        add(f"ack seq={seq} after an answer", frames, "ack_received", timeout=60, check=ack_within)
    for seq in [2**53, -1, "x", 1.5]:
        add(f"ack seq={short(seq)}", [{"type": "ack", "seq": seq}], "error:bad_request")

    for prompt, answer in LEGACY:  # text mode: the answer in plain frames, then close 1000
        add(f"text mode {short(prompt)}", [], answer, hello=prompt, text_mode=True, timeout=120)
    return cases + mutations(run)


def resumed_and_clamped(asked: int) -> Callable[[list[dict[str, Any]]], str | None]:
    def check(seen: list[dict[str, Any]]) -> str | None:
        welcome = seen[0]
        if not welcome.get("resumed"):
            return "the session was not resumed"
        if asked > welcome["last_seq"] and welcome.get("last_seq_clamped") != asked:
            return f"welcome has last_seq {welcome['last_seq']} and no last_seq_clamped"
        return None

    return check


def ack_within(seen: list[dict[str, Any]]) -> str | None:
    events = [m["seq"] for m in seen if m.get("type") != "ack_received" and "seq" in m]
    ack = seen[-1]
    if ack.get("type") == "ack_received" and ack.get("seq", 0) > max(events, default=0):
        return f"ack_received seq {ack['seq']} is past the newest event {max(events, default=0)}"
    return None


def mutations(run: Run) -> list[Case]:
    """Valid messages with one field (or the type) replaced by a hostile value; seeded."""
    rng = random.Random(880)
    bases = [*BASE.values(), *({"type": t} for t in ("history", "reset", "get_status", "ping"))]
    cases = []
    for i in range(run.scale("mutations")):
        message = copy.deepcopy(rng.choice(bases))
        nested = [k for k, v in message.items() if isinstance(v, dict)]
        target = message[rng.choice(nested)] if nested and rng.random() < 0.5 else message
        if rng.random() < 0.1:
            message["type"] = rng.choice(MUTATION_VALUES)
        else:
            keys = [k for k in target if k != "type"] + MUTATION_KEYS
            target[rng.choice(keys)] = rng.choice(MUTATION_VALUES)
        config = message.get("config")
        if isinstance(config, dict) and type(config.get("max_new_tokens")) is int:
            config["max_new_tokens"] = min(config["max_new_tokens"], 4)  # no long answers
        admin = str(message.get("type")).endswith("_model")
        cases.append(Case(f"mutation {i}: {short(message)}", [message], ("*",), admin=admin))
    return cases


async def hostile_inputs(run: Run) -> None:
    ws, welcome = await hello(run)  # a session with an answer, for the last_seq cases
    async with ws:
        await ws.send(json.dumps(ask("Hello")))
        await recv_until(run, ws, {"done"}, 60)
    cases = hostile_cases(run, welcome["session_id"])
    for i, case in enumerate(cases):
        if run.past(0.45):
            run.notes.append(f"hostile inputs: stopped by the deadline after {i} of {len(cases)}")
            break
        await try_case(run, case)
        if i % 50 == 0:
            check_alive(run, "the hostile inputs")
    await http_cases(run)
    check_alive(run, "the hostile inputs")


# -- 2. session takeovers -------------------------------------------------------------------------


async def take_over(
    run: Run, old: ClientConnection, sid: str, mid_stream: bool
) -> tuple[ClientConnection, list[str]]:
    """A new connection takes ``sid`` over from ``old``; what went wrong, if anything."""
    problems = []
    seen: list[int] = []
    if mid_stream:  # an answer is running when the new connection arrives
        await old.send(json.dumps(ask("Count to ten.", max_new_tokens=8, min_new_tokens=8)))
        received = await recv_until(run, old, {"token"}, 60)
        seen = [m["seq"] for m in received if isinstance(m.get("seq"), int)]
        if received[-1]["type"] != "token" or not seen:
            return old, [f"the answer did not start: {short(received[-1])}"]
    else:
        await old.send(json.dumps({"type": "history"}))
        before = len((await recv_until(run, old, {"history"}, 15))[-1].get("messages", []))
    new = await open_ws(run)
    await new.send(json.dumps({"session_id": sid, **({"last_seq": seen[-1]} if seen else {})}))
    welcome = (await recv_until(run, new, {"welcome"}, 15))[-1]
    if not welcome.get("resumed") or welcome.get("session_id") != sid:
        problems.append(f"welcome {short(welcome, 160)}")
    code: Any = "still open"
    try:  # the old connection reads on until its close: 4000
        while True:
            await asyncio.wait_for(old.recv(), 10)
    except ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else 1006
    except TimeoutError:
        pass
    if code != 4000:
        problems.append(f"the old connection: {code}")
    if mid_stream:  # every event after the last one seen, once each, in order, until done
        events = [m for m in await recv_until(run, new, {"done"}, 60) if "seq" in m]
        seqs = [m["seq"] for m in events]
        if (
            seqs != list(range(seen[-1] + 1, seen[-1] + 1 + len(seqs)))
            or events[-1]["type"] != "done"
        ):
            problems.append(f"after seq {seen[-1]}: seqs {seqs}, ending {events[-1]['type']}")
    else:
        await new.send(json.dumps({"type": "history"}))
        after = len((await recv_until(run, new, {"history"}, 15))[-1].get("messages", []))
        if after != before:
            problems.append(f"history {before} messages before, {after} after")
    await new.send(json.dumps({"type": "ack"}))  # keeps the replay of the next hello short
    await recv_until(run, new, {"ack_received"}, 15)
    return new, problems


async def takeovers(run: Run) -> None:
    total, ok = run.scale("takeovers"), 0
    old, welcome = await hello(run)
    sid = welcome["session_id"]
    for i in range(total):
        if run.past(0.6):
            run.notes.append(f"takeovers: stopped by the deadline after {i} of {total}")
            total = i
            break
        try:
            old, problems = await take_over(run, old, sid, mid_stream=i % 5 == 0)
        except Exception as e:
            problems = [what(e)]
            old, welcome = await hello(run)  # carry on with a fresh session
            sid = welcome["session_id"]
        if problems:
            run.defect(f"[takeover] takeover {i} of session {sid} → {'; '.join(problems)}")
        else:
            ok += 1
    await old.close()
    run.figures["takeovers ok / total"] = f"{ok} / {total}"
    check_alive(run, "the takeovers")


# -- 3. slowloris ---------------------------------------------------------------------------------


async def slow_socket(run: Run, i: int) -> str:
    """``closed`` when the daemon closes a socket that never finishes, else ``open``."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", run.port), 10)
    limit = time.monotonic() + HELLO_TIMEOUT + 20
    try:
        if i % 2:  # a whole handshake, then never a first frame: the hello timeout (1008)
            writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{run.port}\r\n{UPGRADE}\r\n".encode())
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            data = await asyncio.wait_for(reader.read(64), limit - time.monotonic())
            return f"closed {int.from_bytes(data[2:4])}" if data[:1] == b"\x88" else "closed"
        # Half a request, a byte every half second: the open timeout must close it.
        read = asyncio.ensure_future(reader.read(4096))
        trickle = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
        try:
            for byte in trickle:
                if time.monotonic() > limit:
                    return "open"
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    return "closed"
                done, _ = await asyncio.wait({read}, timeout=0.5)
                if done:
                    answer = read.result().split(b"\r\n", 1)[0].decode("latin-1")
                    return f"closed ({answer or 'nothing sent'})"
            return "open"
        finally:
            read.cancel()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
        return "open" if isinstance(e, TimeoutError) else "closed"
    finally:
        writer.close()


async def slowloris(run: Run) -> None:
    n = run.scale("slowloris")
    stop = asyncio.Event()
    served, failures = 0, []

    async def normal_client() -> None:
        nonlocal served
        ws, _ = await hello(run)
        async with ws:
            while not stop.is_set():
                try:
                    await ws.send(PING)
                    await recv_until(run, ws, {"pong"}, 15)
                    await ws.send(json.dumps(ask("Name a fruit.")))
                    last = (await recv_until(run, ws, {"done"}, 60))[-1]
                    if last["type"] != "done":
                        raise RuntimeError(short(last))
                    served += 1
                except Exception as e:
                    failures.append(what(e))
                    return

    client = asyncio.create_task(normal_client())

    async def timed(i: int) -> tuple[str, float]:
        began = time.monotonic()
        return await slow_socket(run, i), time.monotonic() - began

    timings = await asyncio.gather(*(timed(i) for i in range(n)), return_exceptions=True)
    stop.set()
    results = [t[0] if isinstance(t, tuple) else t for t in timings]
    took = [t[1] for t in timings if isinstance(t, tuple) and t[0].startswith("closed")]
    await asyncio.wait_for(client, 90)
    closed = sum(isinstance(r, str) and r.startswith("closed") for r in results)
    codes = Counter(r if isinstance(r, str) else what(r) for r in results)
    run.figures["slowloris closed / total"] = f"{closed} / {n}"
    run.figures["  how they ended"] = ", ".join(f"{k} ×{v}" for k, v in sorted(codes.items()))
    if took:
        run.figures["  closed after (hello_timeout 3 s)"] = f"{min(took):.1f}-{max(took):.1f} s"
    run.figures["normal client during slowloris"] = (
        f"served {served} answers, failed {len(failures)}"
    )
    if closed < n:
        run.defect(
            f"[slowloris] {n - closed} of {n} slow sockets not closed by the daemon: {dict(codes)}"
        )
    if failures or not served:
        run.defect(f"[slowloris] the normal client was not served: {failures or 'no answer'}")
    check_alive(run, "slowloris")


# -- 4. pings -------------------------------------------------------------------------------------


async def pings(run: Run) -> None:
    total, connections = run.scale("pings"), 4
    counts: Counter[str] = Counter()
    names = {"pong": "answered", "error:rate_limited": "rate_limited"}

    async def one(count: int) -> None:
        ws, _ = await hello(run)
        async with ws:
            while counts["sent"] < total and count > 0 and not run.past(0.75):
                window = min(100, count)
                for _ in range(window):
                    await ws.send(PING)
                counts["sent"] += window
                count -= window
                for _ in range(window):
                    answer = await next_answer(run, ws, 15, [], "pings")
                    counts[names.get(answer, answer)] += 1
                    if answer == "hang" or answer.startswith("close:"):
                        return

    await asyncio.gather(*(one(total // connections) for _ in range(connections)))
    limited = f" ({counts['rate_limited']} rate_limited)" if counts["rate_limited"] else ""
    run.figures["pings answered / sent"] = f"{counts['answered']} / {counts['sent']}{limited}"
    other = {k: v for k, v in counts.items() if k not in ("sent", "answered", "rate_limited")}
    if counts["answered"] + counts["rate_limited"] < counts["sent"]:
        run.defect(f"[pings] {counts['sent'] - counts['answered']} pings without a pong: {other}")
    check_alive(run, "the pings")


# -- 5. load --------------------------------------------------------------------------------------


async def load(run: Run) -> None:
    n = run.scale("clients")
    timeout = max(60.0, min(300.0, run.deadline - time.monotonic() - 120))
    # Everyone connects first, then all ask at once.
    opened = await asyncio.gather(*(hello(run) for _ in range(n)), return_exceptions=True)

    async def ask_one(i: int, ws: ClientConnection) -> str:
        async with ws:
            await ws.send(json.dumps(ask(f"Question {i}: name a colour.", max_new_tokens=8)))
            answer = await next_answer(run, ws, timeout, [], "the load")
            return "busy" if answer == "error:busy" else answer

    asking = [ask_one(i, o[0]) for i, o in enumerate(opened) if not isinstance(o, BaseException)]
    results = await asyncio.gather(*asking, return_exceptions=True)
    results += [o for o in opened if isinstance(o, BaseException)]
    outcomes = Counter(r if isinstance(r, str) else what(r) for r in results)
    failed = n - outcomes["done"] - outcomes["busy"]
    run.figures["load: done / busy / failed"] = (
        f"{outcomes['done']} / {outcomes['busy']} / {failed} of {n} clients"
    )
    for outcome, count in outcomes.items():
        if outcome not in ("done", "busy"):
            run.defect(f"[load] {count} of {n} clients → {outcome}")
    check_alive(run, "the load")


# -- 6. kill -9 -----------------------------------------------------------------------------------


async def kill9(run: Run) -> None:
    assert run.daemon is not None and run.daemon.proc is not None
    cut: list[tuple[str, int]] = []
    for i in range(run.scale("cut_off")):
        ws, welcome = await hello(run)
        await ws.send(
            json.dumps(ask(f"Tell a long story, part {i}.", max_new_tokens=300, min_new_tokens=300))
        )
        tokens = [m for m in await recv_until(run, ws, {"token"}, 60) if "seq" in m]
        for _ in range(2):
            tokens += [m for m in await recv_until(run, ws, {"token"}, 60) if "seq" in m]
        cut.append((welcome["session_id"], tokens[-1]["seq"]))
        ws.transport.abort()  # the client goes away too; the answer runs on
    run.daemon.proc.kill()
    run.daemon.proc.wait(30)
    run.daemon.start(timeout=180)
    created = len(run.sessions)
    kept, lost, interrupted = 0, [], 0
    gate = asyncio.Semaphore(8)

    async def resume(sid: str, token: str | None) -> bool:
        async with gate:
            try:
                ws = await open_ws(run, token)
                async with ws:
                    await ws.send(json.dumps({"session_id": sid}))
                    welcome = (await recv_until(run, ws, {"welcome"}, 15))[-1]
                    return bool(welcome.get("resumed")) and welcome.get("session_id") == sid
            except Exception:
                return False

    for sid, last in cut:  # the cut-off answer ends, on resume, with `interrupted`
        try:
            ws = await open_ws(run)
            async with ws:
                await ws.send(json.dumps({"session_id": sid, "last_seq": last}))
                events = await recv_until(run, ws, {"done"}, 60)
                if events[-1].get("code") == "interrupted":
                    interrupted += 1
                else:
                    run.defect(f"[kill -9] the answer cut off in {sid} ended {short(events[-1])}")
        except Exception as e:
            run.defect(f"[kill -9] resuming the cut-off {sid} → {what(e)}")
    sessions = list(run.sessions.items())
    results = await asyncio.gather(*(resume(sid, token) for sid, token in sessions))
    for (sid, _), ok in zip(sessions, results, strict=True):
        kept += ok
        if not ok:
            lost.append(sid)
    run.figures["sessions kept / created after kill -9"] = f"{kept} / {created}"
    run.figures["cut-off answers ended interrupted"] = f"{interrupted} / {len(cut)}"
    if lost:
        run.defect(f"[kill -9] {len(lost)} sessions lost, e.g. {', '.join(lost[:5])}")
    check_alive(run, "the kill -9 check")


# -- the run --------------------------------------------------------------------------------------


async def main_async(run: Run) -> None:
    parts = [hostile_inputs, takeovers, slowloris, pings, load, kill9]
    for part in parts:
        if time.monotonic() > run.deadline and part is not kill9:
            run.notes.append(f"{part.__name__}: skipped, past the deadline")
            continue
        print(f"[{time.monotonic() - run.started:6.1f} s] {part.__name__}", flush=True)
        try:
            await part(run)
        except Exception as e:
            run.defect(f"[{part.__name__}] the part failed: {what(e)}")
            check_alive(run, part.__name__)


def tracebacks(run: Run) -> str:
    """Tracebacks in the log, besides those of the pulls that fail by design (no network)."""
    counts: Counter[str] = Counter()
    logger = ""
    for line in run.daemon.log().splitlines() if run.daemon else []:
        if line[:4].isdigit() and len(line.split()) > 3:
            logger = line.split()[3]
        elif line.startswith("Traceback"):
            counts["pulls" if logger.startswith("llmwsd.pull") else "others"] += 1
    return f"{counts['others']} (and {counts['pulls']} of pulls, which cannot reach a network)"


def report(run: Run, load_start: tuple[float, ...], rc: int | None) -> None:
    c = run.counts
    rows = [
        ("hostile inputs tried", c["inputs"]),
        ("  answered as expected", c["expected"]),
        ("    of which errors or closes", c["expected errors"]),
        ("    of which accepted", c["expected replies"]),
        ("  internal errors", c["internal errors"]),
        ("  hangs (no answer in time)", c["hangs"]),
        ("  unexpected closes", c["unexpected closes"]),
        ("  wrong answers", c["wrong answers"]),
        ("secret leaks", c["leaks"]),
        *run.figures.items(),
        ("daemon crashes (unexpected exits)", c["crashes"]),
        ("exit code on SIGTERM at the end", rc),
        ("tracebacks in the daemon's log", tracebacks(run)),
        ("load average at start / end", f"{load_start[0]:.2f} / {os.getloadavg()[0]:.2f}"),
        ("wall time", f"{time.monotonic() - run.started:.0f} s{' (--quick)' if run.quick else ''}"),
        ("defects", len(run.defects)),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    for note in run.notes:
        print(f"note: {note}")
    if run.defects:
        print("\ndefects (input → what came back):")
        for defect in run.defects:
            print(f"  {defect}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, a 180 s deadline")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--verbose", action="store_true", help="print every input's answer")
    args = parser.parse_args()
    if not (DEFAULT_MODEL / "config.json").exists():
        print("the default model is missing: run `make model`", file=sys.stderr)
        return 2
    logging.getLogger("websockets").setLevel(logging.CRITICAL)  # closes are counted, not logged
    load_start = os.getloadavg()
    run = Run(args.quick, Path(tempfile.mkdtemp(prefix="llmws-hostile-")), verbose=args.verbose)
    run.deadline = run.started + run.scale("deadline")
    rc = None
    try:
        run.daemon = make_daemon(run)
        run.daemon.start(timeout=180)
        run.secret = secret_forms(run.folder / "state" / "session.key")
        asyncio.run(main_async(run))
        rc = run.daemon.stop()
        if rc != 0:
            run.defect(f"[exit] SIGTERM ended the daemon with {rc}")
    finally:
        if run.daemon is not None:
            run.daemon.stop(9)
    report(run, load_start, rc)
    if run.defects or args.keep:
        print(f"\nthe run's folder (config, state, the daemon's log): {run.folder}")
    else:
        shutil.rmtree(run.folder, ignore_errors=True)
    return 1 if run.defects else 0


if __name__ == "__main__":
    sys.exit(main())
