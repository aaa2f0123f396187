"""The admin socket and llmwsctl.

Protocol edge cases run against the in-process daemon (fake engine) where the
test must control model loading; everything else goes through the real
``llmwsctl`` against a real llmwsd subprocess with the real model.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.sync.client import connect as ws_connect

from llmwsctl import adminclient
from llmwsctl import format as fmt
from llmwsctl.adminclient import PermissionDenied
from llmwsd import __version__
from llmwsd.daemon import Daemon
from llmwsd.engines.interface import EngineLike
from llmwsd.engines.transformers import kernels
from llmwsd.protocol import admin as adminproto
from tests.conftest import DEFAULT_MODEL, REAL, ROOT, RunningDaemon, skip_or_fail, within
from tests.fake_engine import FakeEngine

LLMWSCTL = str(ROOT / ".venv" / "bin" / "llmwsctl")
PROMPT = "What is the capital of France?"


# -- helpers ---------------------------------------------------------------------------


def ctl(sock: Path | str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != adminproto.SOCKET_ENV}
    return subprocess.run(
        [LLMWSCTL, "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def ctl_json(sock: Path | str, *args: str) -> Any:
    done = ctl(sock, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_and_wait_for_admin(daemon: RunningDaemon, timeout: float = 60) -> Path:
    """Start ``daemon`` and wait until its admin socket answers (it may have no model)."""
    sock = daemon.admin_socket
    proc = daemon.start(wait=False).proc
    assert proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llmwsd exited {proc.returncode}:\n{daemon.log()}")
        if ctl(sock, "status").returncode == 0:
            return sock
        time.sleep(0.2)
    raise TimeoutError(f"no admin socket at {sock} after {timeout} s:\n{daemon.log()}")


def link_model(source: Path, target: Path) -> Path:
    """A copy of a model folder made of hard links: instant, and no extra disk."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file():
            os.link(item, target / item.name)
    return target


def ask_legacy(daemon: RunningDaemon, prompt: str = PROMPT) -> str:
    """One prompt in the old text mode: the answer's frames until the server closes."""
    pieces = []
    with ws_connect(daemon.url, open_timeout=10) as ws:
        ws.send(prompt)
        try:
            while True:
                pieces.append(str(ws.recv(REAL)))
        except ConnectionClosedOK:
            return "".join(pieces)
        except TimeoutError:
            raise AssertionError(
                f"no text frame or close within {REAL:g} s; got {''.join(pieces)!r}"
            ) from None


class RawAdmin:
    """The admin protocol by hand, to send what llmwsctl never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path | str) -> tuple[RawAdmin, dict[str, Any]]:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=2**24)
        raw = cls(reader, writer)
        return raw, await raw.read()

    async def send(self, data: bytes | dict[str, Any]) -> None:
        self.writer.write(data if isinstance(data, bytes) else adminproto.encode(data))
        await self.writer.drain()

    async def read(self, timeout: float = 30) -> dict[str, Any]:
        line = await within(self.reader.readline(), timeout, "admin socket answer line")
        assert line.endswith(b"\n"), f"connection closed: {line!r}"
        return adminproto.decode(line)

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        await self.send(adminproto.request(cmd, cmd, args))
        while "progress" in (answer := await self.read(120)):
            pass
        assert answer["id"] == cmd
        return answer

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """A real llmwsd serving the default model, with a second copy and a broken model beside it."""
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.fail("the default model is missing: run `make model`")
    folder = tmp_path_factory.mktemp("admin")
    models = folder / "models"
    link_model(DEFAULT_MODEL, models / DEFAULT_MODEL.name)
    link_model(DEFAULT_MODEL, models / "SmolLM2-copy")
    broken = models / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    daemon = RunningDaemon(folder, models={"dirs": [str(models)]}).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def idle_daemon(tmp_path: Path) -> Iterator[RunningDaemon]:
    """An llmwsd with no model (it starts in a second), not yet started."""
    (tmp_path / "no-models").mkdir()
    daemon = RunningDaemon(tmp_path, models={"dirs": [str(tmp_path / "no-models")]})
    yield daemon
    daemon.stop(signal.SIGKILL)


def loaded_model(sock: Path) -> str | None:
    return ctl_json(sock, "status")["model"]


# -- llmwsctl against the real daemon ----------------------------------------------------


# The host's RAM line: "968 MiB used of 23.5 GiB" on a quiet machine, GiB when busier.
RAM_USED = r"[\d.]+ [MG]iB used of [\d.]+ GiB"


def test_status_both_modes(sock: Path) -> None:
    status = ctl_json(sock, "status")
    assert status["model"] == DEFAULT_MODEL.name
    assert status["model_state"] == "ready"
    assert {"version", "uptime_s", "device", "sessions", "queue", "memory", "pid"} <= set(status)
    human = ctl(sock, "status")
    assert human.returncode == 0
    assert f"{DEFAULT_MODEL.name} on cpu" in human.stdout
    assert re.search(RAM_USED, human.stdout)
    # The global options also work after the command.
    assert json.loads(ctl(sock, "status", "--json").stdout)["pid"] == status["pid"]


@pytest.mark.parametrize("alias", ["models", "list", "ls"])
def test_models_both_modes(sock: Path, alias: str) -> None:
    entries = ctl_json(sock, alias)
    by_name = {e["name"]: e for e in entries}
    assert set(by_name) == {DEFAULT_MODEL.name, "SmolLM2-copy", "broken-model"}
    assert by_name[DEFAULT_MODEL.name]["loaded"] is True
    assert by_name["SmolLM2-copy"]["loaded"] is False
    human = ctl(sock, alias).stdout.splitlines()
    assert human[0].split() == [
        "NAME",
        "SIZE",
        "PARAMS",
        "MODIFIED",
        "ARCHITECTURE",
        "CONTEXT",
        "DTYPE",
        "FOLDER",
    ]
    loaded = next(line for line in human if DEFAULT_MODEL.name in line)
    assert loaded.startswith("*")
    assert " MB " in loaded and "LlamaForCausalLM" in loaded
    assert human[-1] == "* loaded"


def test_resources_both_modes(sock: Path) -> None:
    report = ctl_json(sock, "resources")
    assert report["device"] == "cpu"
    assert report["engine"]["model"] == DEFAULT_MODEL.name
    human = ctl(sock, "resources").stdout
    assert "cores" in human and re.search(RAM_USED, human)
    assert re.search(rf"^model +{DEFAULT_MODEL.name} \(", human, re.MULTILINE)
    assert re.search(r"^context +\d+ tokens, KV cache .* per token", human, re.MULTILINE)
    assert "no NVIDIA GPU" in human and "generating" in human
    assert report["engine"]["prefix_cache"]["max_bytes"] > 0
    assert re.search(r"^prefix cache +\d+ prompts, .* of 64\.0 MiB", human, re.MULTILINE)


def test_resources_watch_refreshes_until_interrupted(sock: Path) -> None:
    proc = subprocess.Popen(
        [LLMWSCTL, "--socket", str(sock), "--json", "resources", "--watch", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert all(json.loads(line)["device"] == "cpu" for line in lines)


def test_resources_watch_redraws_in_place_on_a_terminal(sock: Path) -> None:
    import pexpect

    child = pexpect.spawn(
        LLMWSCTL, ["--socket", str(sock), "resources", "--watch", "0.2"], timeout=30
    )
    try:
        for _ in range(2):
            child.expect_exact("\x1b[H\x1b[2J")  # home and clear: the same screen, redrawn
            child.expect("Ctrl-C to stop")
            child.expect(RAM_USED)
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_sessions_list_and_drop(served: RunningDaemon, sock: Path) -> None:
    with ws_connect(served.url, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "ping"}))
        session_id = json.loads(ws.recv(10))["session_id"]
        sessions = {s["id"]: s for s in ctl_json(sock, "sessions")}
        assert sessions[session_id]["connected"] is True
        assert {"age_s", "idle_s", "messages", "buffered_events"} <= set(sessions[session_id])
        # New, and its hello was a ping: nothing said, nothing buffered.
        assert (sessions[session_id]["messages"], sessions[session_id]["buffered_events"]) == (0, 0)
        human = ctl(sock, "sessions").stdout.splitlines()
        assert human[0].split()[:3] == ["ID", "AGE", "IDLE"]
        assert any(line.startswith(session_id) and "yes" in line for line in human)

        dropped = ctl(sock, "sessions", "drop", session_id)
        assert dropped.returncode == 0, dropped.stderr
        assert f"dropped session {session_id}" in dropped.stdout
        # Its client is told, with a reason, rather than left on a session that is gone.
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10):  # the pong to the hello's ping may come first
                ws.recv(10)
        assert closed.value.rcvd.code == 4001 and "dropped" in closed.value.rcvd.reason
    assert session_id not in {s["id"] for s in ctl_json(sock, "sessions")}
    again = ctl(sock, "--json", "sessions", "drop", session_id)
    assert again.returncode == 1
    assert f"no session {session_id}" in again.stderr


def test_reload_both_modes(sock: Path) -> None:
    report = ctl_json(sock, "reload")
    assert report["error"] is None and report["needs_restart"] == []
    human = ctl(sock, "reload")
    assert human.returncode == 0
    assert "configuration reloaded from" in human.stdout


def test_reload_with_a_broken_file_fails_and_keeps_serving(
    served: RunningDaemon, sock: Path
) -> None:
    original = served.config_path.read_text()
    served.config_path.write_text(original + "\n[server\n")
    try:
        done = ctl(sock, "reload")
    finally:
        served.config_path.write_text(original)
    assert done.returncode == 1
    assert "invalid TOML" in done.stderr and "running configuration is kept" in done.stderr
    assert loaded_model(sock) == DEFAULT_MODEL.name


def test_version_both_modes(sock: Path) -> None:
    versions = ctl_json(sock, "version")
    assert versions["llmwsd"] == versions["llmwsctl"]
    assert versions["admin_protocol"] == adminproto.ADMIN_PROTOCOL_VERSION
    assert "llmwsd   0." in ctl(sock, "version").stdout


def test_pull_refuses_what_it_cannot_pull(sock: Path) -> None:
    # Pulls themselves are tested in test_models.py.
    done = ctl(sock, "pull", "not a source")
    assert done.returncode == 1
    assert "cannot tell what" in done.stderr
    assert ctl(sock, "pull", "x/y", "--name", "../evil").returncode == 1
    assert "invalid model name" in ctl(sock, "pull", "x/y", "--name", "../evil").stderr


def test_switch_between_two_real_models(served: RunningDaemon, sock: Path) -> None:
    try:
        done = ctl(sock, "switch", "SmolLM2-copy")
        assert done.returncode == 0, done.stderr
        assert f"switched to SmolLM2-copy (was {DEFAULT_MODEL.name})" in done.stdout
        assert "loading SmolLM2-copy" in done.stderr  # progress lines (not a tty)
        assert loaded_model(sock) == "SmolLM2-copy"
        assert "Paris" in ask_legacy(served)
        again = ctl_json(sock, "switch", "SmolLM2-copy")
        assert again["changed"] is False
    finally:
        back = ctl_json(sock, "switch", DEFAULT_MODEL.name)
    assert back["previous"] == "SmolLM2-copy"
    assert loaded_model(sock) == DEFAULT_MODEL.name


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no-such-model", "no model named 'no-such-model'"),
        ("broken-model", "loading broken-model failed"),
        ("../etc", "invalid model name"),
        (".hidden", "invalid model name"),
        ("a/b", "invalid model name"),
    ],
)
def test_failed_switch_keeps_the_old_model_serving(
    served: RunningDaemon, sock: Path, model: str, message: str
) -> None:
    done = ctl(sock, "switch", model)
    assert done.returncode == 1
    assert message in done.stderr
    if model == "broken-model":
        assert f"still serving {DEFAULT_MODEL.name}" in done.stderr
    if model in ("no-such-model", "broken-model"):
        assert "Paris" in ask_legacy(served)
    assert loaded_model(sock) == DEFAULT_MODEL.name


def test_rm(served: RunningDaemon, sock: Path) -> None:
    downloads = served.folder / "state" / "models"
    link_model(DEFAULT_MODEL, downloads / "downloaded")
    assert "downloaded" in {e["name"] for e in ctl_json(sock, "models")}

    removed = ctl(sock, "rm", "downloaded")
    assert removed.returncode == 0, removed.stderr
    assert "removed downloaded (" in removed.stdout and "MB freed" in removed.stdout
    assert not (downloads / "downloaded").exists()
    assert os.listdir(downloads) == []  # nothing half-deleted left behind
    assert "downloaded" not in {e["name"] for e in ctl_json(sock, "models")}

    # Outside <state_dir>/models (the configured folder), unknown, or not a plain name: refused.
    outside = ctl(sock, "rm", "SmolLM2-copy")
    assert outside.returncode == 1 and "only deletes downloaded models" in outside.stderr
    assert (served.folder / "models" / "SmolLM2-copy" / "config.json").exists()
    assert "no model named" in ctl(sock, "rm", "nothing-here").stderr
    for name in ("../models", "/etc", ".hidden", "a/b"):
        done = ctl(sock, "rm", name)
        assert done.returncode == 1 and "invalid model name" in done.stderr


def test_rm_refuses_the_loaded_model(served: RunningDaemon, sock: Path) -> None:
    downloads = served.folder / "state" / "models"
    link_model(DEFAULT_MODEL, downloads / "in-use")
    try:
        assert ctl(sock, "switch", "in-use").returncode == 0
        done = ctl(sock, "rm", "in-use")
        assert done.returncode == 1 and "is the loaded model" in done.stderr
        assert (downloads / "in-use" / "config.json").exists()
    finally:
        assert ctl(sock, "switch", DEFAULT_MODEL.name).returncode == 0
    assert ctl(sock, "rm", "in-use").returncode == 0


def test_socket_mode_and_owner(sock: Path) -> None:
    info = sock.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid())


def test_second_daemon_on_the_same_runtime_folder_refuses(
    served: RunningDaemon, sock: Path, tmp_path: Path
) -> None:
    second = RunningDaemon(tmp_path, paths={"runtime_dir": str(sock.parent)})
    second.start(wait=False)
    assert second.proc is not None
    try:
        assert second.proc.wait(60) == 1
    finally:
        second.stop(signal.SIGKILL)
    assert "another llmwsd is already running" in second.log()
    assert str(sock) in second.log()
    # The first one's socket is untouched and answers.
    assert loaded_model(sock) == DEFAULT_MODEL.name


def test_stale_socket_is_replaced(idle_daemon: RunningDaemon) -> None:
    sock = idle_daemon.admin_socket
    sock.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(sock))  # a daemon that died without removing its socket
    start_and_wait_for_admin(idle_daemon)
    assert ctl_json(sock, "status")["model_state"] == "none"
    assert "removing the stale admin socket" in idle_daemon.log()
    assert idle_daemon.stop() == 0
    assert not sock.exists()  # removed on a clean exit


@pytest.mark.skipif(
    os.path.exists(adminproto.DEFAULT_SOCKET), reason="a system llmwsd runs here: it wins"
)
def test_a_development_daemon_is_found_from_its_checkout(
    idle_daemon: RunningDaemon, tmp_path: Path
) -> None:
    """`make run` puts its socket in var/run/: llmwsctl run from the checkout finds it."""
    start_and_wait_for_admin(idle_daemon)
    checkout = tmp_path / "checkout"
    (checkout / "var").mkdir(parents=True)
    (checkout / "var" / "run").symlink_to(idle_daemon.admin_socket.parent)
    env = {k: v for k, v in os.environ.items() if k != adminproto.SOCKET_ENV}
    done = subprocess.run(
        [LLMWSCTL, "--json", "status"], capture_output=True, text=True, env=env, cwd=checkout
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model_state"] == "none"


def test_no_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "admin.sock"
    done = ctl(missing, "status")
    assert done.returncode == 3
    assert done.stderr.strip() == (
        f"llmwsd is not running (no socket at {missing}); for a daemon with another "
        "runtime_dir, give its socket: --socket PATH or LLMWS_ADMIN_SOCKET=PATH"
    )
    # The default comes from LLMWS_ADMIN_SOCKET.
    env = {**os.environ, adminproto.SOCKET_ENV: str(missing)}
    by_env = subprocess.run([LLMWSCTL, "models"], capture_output=True, text=True, env=env)
    assert by_env.returncode == 3 and str(missing) in by_env.stderr
    # `version` still tells its own, and exits 3 like `status`.
    version = ctl(missing, "version")
    assert version.returncode == 3, version.stderr
    assert version.stdout.splitlines() == [
        f"llmwsctl {__version__} (admin protocol {adminproto.ADMIN_PROTOCOL_VERSION})",
        "llmwsd   unknown",
    ]
    assert version.stderr.startswith("llmwsd is not running (no socket at")
    both = ctl(missing, "--json", "version")
    assert both.returncode == 3
    assert json.loads(both.stdout) == {
        "llmwsctl": __version__,
        "llmwsd": None,
        "admin_protocol": adminproto.ADMIN_PROTOCOL_VERSION,
    }
    assert json.loads(both.stderr)["error"]["code"] == "not_running"


def test_json_errors_on_stderr_with_unchanged_exit_codes(tmp_path: Path) -> None:
    missing = tmp_path / "admin.sock"
    plain = ctl(missing, "status")
    for args in (["--json", "status"], ["status", "--json"]):
        done = ctl(missing, *args)
        assert done.returncode == 3 and done.stdout == ""
        assert json.loads(done.stderr) == {
            "error": {"code": "not_running", "message": plain.stderr.strip()}
        }
    # A usage error that argparse cannot see (exit 2), plain and as JSON.
    usage = ctl(missing, "pull")
    assert usage.returncode == 2
    assert usage.stderr.strip() == "llmwsctl pull: error: give either SOURCE or --cancel ID"
    usage = ctl(missing, "--json", "pull")
    assert usage.returncode == 2
    assert json.loads(usage.stderr) == {
        "error": {"code": "usage", "message": "give either SOURCE or --cancel ID"}
    }


def test_permission_denied_names_the_group(idle_daemon: RunningDaemon) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        skip_or_fail("root needs setpriv (util-linux) to drop its file capabilities here")
    sock = start_and_wait_for_admin(idle_daemon)
    os.chmod(sock, 0o060)  # the owner has no rights now, like a user outside the group
    # Root ignores file modes unless it drops these capabilities.
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*drop, LLMWSCTL, "--socket", str(sock), "status"], capture_output=True, text=True
    )
    assert done.returncode == 4, done.stderr
    assert str(PermissionDenied(str(sock))) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_permission_advice_never_says_to_join_root(monkeypatch: pytest.MonkeyPatch) -> None:
    for root in ("root", "0", None):
        monkeypatch.setattr(adminclient, "socket_group", lambda path, group=root: group)
        advice = str(PermissionDenied("/run/llmws/admin.sock"))
        assert "run llmwsctl as root" in advice and "group llmws" in advice
        assert "usermod -aG root" not in advice and "join the root group" not in advice
    monkeypatch.setattr(adminclient, "socket_group", lambda path: "llmws")
    advice = str(PermissionDenied("/run/llmws/admin.sock"))
    assert "join the llmws group (sudo usermod -aG llmws $USER, then log in again)" in advice


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["switch"], ["rm"], ["sessions", "drop"], ["resources", "--watch", "0"]],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    done = subprocess.run([LLMWSCTL, *argv], capture_output=True, text=True)
    assert done.returncode == 2
    assert "usage: llmwsctl" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["status"],
        ["models"],
        ["ls"],
        ["switch"],
        ["pull"],
        ["rm"],
        ["resources"],
        ["sessions"],
        ["sessions", "drop"],
        ["reload"],
        ["version"],
        ["chat"],
    ],
)
def test_help_on_every_command(argv: list[str]) -> None:
    done = subprocess.run([LLMWSCTL, *argv, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: llmwsctl")
    assert len(done.stdout.splitlines()) > 4


# -- the protocol by hand, against the real daemon ---------------------------------------


async def test_greeting_and_request_shapes(sock: Path) -> None:
    admin, hello = await RawAdmin.open(sock)
    try:
        assert hello["hello"] == "llmwsd"
        assert hello["protocol"] == adminproto.ADMIN_PROTOCOL_VERSION
        answer = await admin.call("status")
        assert answer["ok"] is True and answer["result"]["model"] == DEFAULT_MODEL.name
        await admin.send({"id": 5, "cmd": "sessions"})  # args may be left out
        assert (await admin.read())["id"] == 5
    finally:
        await admin.close()


async def test_garbage_unknown_and_oversized_lines_are_answered(sock: Path) -> None:
    admin, _ = await RawAdmin.open(sock)
    try:
        bad_lines = {
            b"this is not json\n": "invalid_json",
            b"\xff\xfe\n": "invalid_json",
            b"[1, 2, 3]\n": "bad_request",
            b'{"id": 1}\n': "bad_request",
            b'{"id": 2, "cmd": "status", "args": [1]}\n': "bad_request",
            b'{"id": 3, "cmd": "format-disk"}\n': "unknown_type",
            b'{"id": 4, "cmd": "switch", "args": {"model": 7}}\n': "bad_request",
        }
        for line, code in bad_lines.items():
            await admin.send(line)
            answer = await admin.read()
            assert answer["ok"] is False and answer["error"]["code"] == code, line
            assert answer["error"]["message"]
        # 10 MB without a newline in sight, then the newline: skipped and answered.
        await admin.send(b'{"id": 9, "cmd": "status", "pad": "' + b"x" * 10_000_000 + b'"}\n')
        answer = await admin.read()
        assert answer == {
            "id": None,
            "ok": False,
            "error": {
                "code": "bad_request",
                "message": f"request line longer than {adminproto.MAX_REQUEST_LINE} bytes: skipped",
            },
        }
        # The same connection still works.
        assert (await admin.call("status"))["ok"] is True
    finally:
        await admin.close()
    assert loaded_model(sock) == DEFAULT_MODEL.name


async def test_client_leaving_mid_switch(served: RunningDaemon, sock: Path) -> None:
    """The switch finishes without its client; the daemon keeps serving."""
    admin, _ = await RawAdmin.open(sock)
    await admin.send(adminproto.request(1, adminproto.SWITCH, {"model": "SmolLM2-copy"}))
    assert (await admin.read())["progress"]["stage"] == "loading"
    await admin.close()
    try:
        deadline = time.monotonic() + 120
        while loaded_model(sock) != "SmolLM2-copy":
            assert time.monotonic() < deadline, "the switch did not finish"
            await asyncio.sleep(0.2)
        assert "Paris" in await asyncio.to_thread(ask_legacy, served)
    finally:
        assert ctl(sock, "switch", DEFAULT_MODEL.name).returncode == 0


# -- model changes with a controlled loader (in-process daemon, fake engine) -------------


def add_fake_model(daemon: Daemon, name: str) -> Path:
    folder = daemon.config.model_dirs[0] / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


async def test_a_second_model_change_is_refused_while_one_runs(fake_daemon: Daemon) -> None:
    add_fake_model(fake_daemon, "slow-model")
    release = asyncio.Event()

    async def slow_loader(config: Any, path: Path) -> EngineLike:
        await release.wait()
        return FakeEngine(path)

    fake_daemon.models.loader = slow_loader
    first, _ = await RawAdmin.open(fake_daemon.admin.path)
    second, _ = await RawAdmin.open(fake_daemon.admin.path)
    try:
        await first.send(adminproto.request(1, adminproto.SWITCH, {"model": "slow-model"}))
        assert (await first.read())["progress"]["stage"] == "loading"
        refused = await second.call(adminproto.RM, model="fake-model")
        assert refused["error"]["code"] == "busy"
        # Reports still answer while a model loads, and the old model still generates.
        assert (await second.call(adminproto.STATUS))["result"]["model"] == "fake-model"
        release.set()
        while "progress" in (answer := await first.read()):
            pass
        assert answer["ok"] is True and answer["result"]["previous"] == "fake-model"
        assert (
            fake_daemon.slot.engine is not None
            and fake_daemon.slot.engine.info.name == "slow-model"
        )
    finally:
        release.set()
        await first.close()
        await second.close()


async def test_a_failed_load_keeps_the_old_engine(fake_daemon: Daemon) -> None:
    add_fake_model(fake_daemon, "bad-model")
    old = fake_daemon.slot.engine

    async def failing_loader(config: Any, path: Path) -> EngineLike:
        raise OSError("weights are corrupt")

    fake_daemon.models.loader = failing_loader
    admin, _ = await RawAdmin.open(fake_daemon.admin.path)
    try:
        answer = await admin.call(adminproto.SWITCH, model="bad-model")
    finally:
        await admin.close()
    assert answer["error"]["message"] == (
        "loading bad-model failed: weights are corrupt; still serving fake-model"
    )
    assert fake_daemon.slot.engine is old and fake_daemon.slot.state == "ready"


async def ctl_async(sock: Path | str, *args: str) -> tuple[int, str, str]:
    """llmwsctl against the in-process daemon, whose loop must keep running meanwhile."""
    env = {k: v for k, v in os.environ.items() if k != adminproto.SOCKET_ENV}
    proc = await asyncio.create_subprocess_exec(
        LLMWSCTL,
        "--socket",
        str(sock),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await within(proc.communicate(), 60, f"llmwsctl {' '.join(args)}")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_failed_command_is_json_with_json(fake_daemon: Daemon) -> None:
    sock = fake_daemon.admin.path
    rc, out, err = await ctl_async(sock, "rm", "nosuch")
    assert rc == 1 and out == ""
    message = err.strip()
    assert message.startswith("no model named 'nosuch'"), err
    rc, out, err = await ctl_async(sock, "--json", "rm", "nosuch")
    assert rc == 1 and out == ""
    assert json.loads(err) == {"error": {"code": "not_found", "message": message}}


async def test_revoke_with_tokens_off_says_tokens_are_off(fake_daemon: Daemon) -> None:
    sock = fake_daemon.admin.path
    added = await ctl_async(sock, "tokens", "add", "alice")
    revoked = await ctl_async(sock, "tokens", "revoke", "alice")
    assert added[0] == revoked[0] == 1
    assert revoked[2] == added[2]
    assert revoked[2].strip() == (
        "tokens are off: set [api] tokens_file in the configuration first"
    )


async def test_admin_log_lines(fake_daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmwsd")
    admin, _ = await RawAdmin.open(fake_daemon.admin.path)
    try:
        answer = await admin.call(adminproto.RM, model="nosuch", force=False)
    finally:
        await admin.close()
    assert answer["error"]["code"] == "not_found"
    records = [r for r in caplog.records if r.name == "llmwsd.admin"]
    asked = [r for r in records if r.getMessage().startswith("admin: rm ")]
    # Booleans unquoted, strings quoted; the request at info, its failure at warning.
    assert asked and asked[0].getMessage().startswith("admin: rm model='nosuch' force=False by ")
    assert asked[0].levelno == logging.INFO
    failed = [r for r in records if "(not_found)" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING


@pytest.mark.parametrize(
    ("rows", "wording"), [(1, "decoding steps of 1 row run"), (4, "of up to 4 rows run")]
)
def test_plain_decoding_rows_log_line(
    rows: int, wording: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kernels, "pack_linear_layers", lambda model: 0)
    monkeypatch.setattr(kernels, "_torch_layout_bytes", lambda model: 0)
    monkeypatch.setattr(kernels, "plain_decoding_rows", lambda model, max_rows: rows)
    caplog.set_level(logging.INFO, logger="llmwsd")
    assert kernels.choose_kernels(object(), max_rows=8, available_bytes=2**30) == rows
    assert f"{wording} without oneDNN (faster here)" in caplog.text


# -- human formatting ------------------------------------------------------------------


def test_units_and_tables() -> None:
    assert [fmt.size(n) for n in (0, 999, 1234, 273_000_000, 1_234_567_890)] == [
        "0 B",
        "999 B",
        "1.2 kB",
        "273 MB",
        "1.2 GB",
    ]
    assert fmt.gib(1.5) == "1.5 GiB"
    assert [fmt.duration(s) for s in (42, 180, 7500, 3 * 86400)] == [
        "42 s",
        "3 min",
        "2 h 5 min",
        "3 days",
    ]
    assert fmt.ago(1000.0, now=1180.0) == "3 min ago"
    assert fmt.ago(1000.0, now=1001.0) == "just now"
    assert fmt.table(["NAME", "SIZE"], [["a", "1 MB"], ["long-name", "10 MB"]], right=[1]) == (
        "NAME        SIZE\na           1 MB\nlong-name  10 MB"
    )


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_sparse_lines_elsewhere() -> None:
    transfer = {"message": "pulling m", "total": 300_000_000, "file": "model.safetensors"}
    terminal, log = FakeTerminal(), io.StringIO()
    for stream in (terminal, log):
        progress = fmt.ProgressPrinter(stream)
        progress({"stage": "loading", "message": "loading m"})
        for done in range(0, 300_000_001, 30_000_000):
            progress({**transfer, "done": done})
        progress.finish()
    assert terminal.getvalue().count("\r\x1b[2K") == 12
    assert "[##########----------]  50% 150 MB/300 MB" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n")
    # Not a terminal: each stage once, transfers only every few seconds and at the end.
    assert log.getvalue().splitlines() == [
        "loading m",
        "pulling m 0% 0 B/300 MB  model.safetensors",
        "pulling m 100% 300 MB/300 MB  model.safetensors",
    ]


def test_resources_rendering_of_gpus_and_engine() -> None:
    from llmwsctl.render import render_resources

    report = {
        "device": "cuda:0",
        "host": {"cpu_percent": 5.0, "cpu_count": 16, "ram_total_gb": 128, "rss_gb": 2.5},
        "gpus": [
            {
                "name": "NVIDIA H100",
                "memory_used_gb": 3.1,
                "memory_total_gb": 79.6,
                "utilization_percent": 12,
                "temperature_c": 41,
                "power_w": 95.0,
                "compute_capability": "9.0",
            }
        ],
        "engine": {
            "model": "m",
            "dtype": "bfloat16",
            "max_context": 8192,
            "kv_bytes_per_token": 23040,
            "prefix_cache": {
                "entries": 3,
                "bytes": 3 * 2**20,
                "max_bytes": 64 * 2**20,
                "hits": 5,
                "reused_tokens": 120,
            },
        },
    }
    text = render_resources(report)
    assert "NVIDIA H100, 3.1 GiB of 79.6 GiB, 12% busy, 41 °C, 95.0 W, SM 9.0" in text
    assert "8192 tokens, KV cache 23.0 kB per token" in text
    assert "3 prompts, 3.0 MiB of 64.0 MiB, 5 reused (120 tokens not prefilled again)" in text
    no_gpu = render_resources(
        {"device": "cpu", "host": {}, "gpus": [], "gpu_status": "no NVIDIA GPU"}
    )
    assert "no NVIDIA GPU" in no_gpu and "none loaded" in no_gpu
