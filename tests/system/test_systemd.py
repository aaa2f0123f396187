"""The Debian package on a real systemd: install, start, manage, restart, purge.

Boots a fresh Debian 12 root (systemd_root.py), installs the package built by
`make deb-package` (or $LLMWS_DEB) with apt, and drives the service the way an
administrator does; the README's "Install as a service" shows the same commands.
The tests run in file order on one root, each step building on the one before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import skip_or_fail
from tests.system.systemd_root import SystemdRoot, SystemdRootError, missing_tools, own_cgroup2

# One root for the module: its setup (debootstrap on a cold cache, apt) counts
# against the first test.
pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
MODEL_NAME = MODEL.name
CLIENT = Path(__file__).with_name("ws_client.py")
VENV_PYTHON = "/usr/lib/llmws/bin/python"

T = TypeVar("T")


def why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "boots systemd in new namespaces: needs root"
    if missing := missing_tools():
        return f"needs {', '.join(missing)} (apt-get install debootstrap util-linux iproute2)"
    try:
        own_cgroup2()
    except SystemdRootError as e:
        return str(e)
    if not (MODEL / "config.json").exists():
        return f"no default model at {MODEL} (make model)"
    build_tools = ("dpkg-buildpackage", "dh", "help2man")
    missing = [t for t in build_tools if not shutil.which(t)]
    if missing and not os.environ.get("LLMWS_DEB"):
        return f"the package build needs {', '.join(missing)} (apt-get install debhelper help2man)"
    return None


def built_package() -> Path:
    if deb := os.environ.get("LLMWS_DEB"):
        return Path(deb)
    # The package without lintian's minutes; `make deb` is the lintian-checked build.
    subprocess.run(["make", "-C", str(REPO), "deb-package"], check=True, stdout=subprocess.DEVNULL)
    return next((REPO / "build" / "deb").glob("llmws_*.deb"))


@pytest.fixture(scope="module")
def root() -> Iterator[SystemdRoot]:
    if reason := why_not_runnable():
        skip_or_fail(reason)
    deb = built_package()
    workdir = Path(tempfile.mkdtemp(prefix="llmws-systest-"))
    with SystemdRoot(workdir) as booted:
        shutil.copy(deb, booted.root / "root" / "llmws.deb")
        shutil.copy(CLIENT, booted.root / "root" / "ws_client.py")
        try:
            booted.run(["apt-get", "install", "-y", "/root/llmws.deb"], timeout=600)
            yield booted
        finally:
            # What the service said, for whoever reads a failure (CI keeps test-output/).
            out = REPO / "test-output" / "system-journal.txt"
            out.parent.mkdir(exist_ok=True)
            out.write_text(booted.run(["journalctl", "--no-pager", "-b"], check=False).stdout)


def wait_for(what: str, check: Callable[[], T], timeout: float = 300) -> T:
    """Poll ``check()`` until it returns something true; bounded in time."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)
    return result


def unit(root: SystemdRoot, *props: str) -> dict[str, str]:
    out = root.run(["systemctl", "show", "llmws", *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def journal(root: SystemdRoot, *args: str) -> list[dict[str, str]]:
    out = root.run(["journalctl", "-u", "llmws", "-o", "json", "--no-pager", *args]).stdout
    return [json.loads(line) for line in out.splitlines()]


def journal_line(root: SystemdRoot, pattern: str, priority: int) -> dict[str, str] | None:
    for entry in journal(root):
        if re.search(pattern, str(entry.get("MESSAGE", ""))):
            assert entry["PRIORITY"] == str(priority), entry
            return entry
    return None


def ask(root: SystemdRoot, *args: str) -> dict[str, Any]:
    out = root.run([VENV_PYTHON, "/root/ws_client.py", *args], timeout=600).stdout
    return json.loads(out)


def test_package_installs_user_unit_and_config(root: SystemdRoot) -> None:
    passwd = root.run(["getent", "passwd", "llmws"]).stdout.split(":")
    assert passwd[5] == "/var/lib/llmws"
    assert root.run(["systemctl", "is-enabled", "llmws"]).stdout.strip() == "enabled"
    root.run(["llmwsd", "--check-config"])
    for page in ("/usr/share/man/man8/llmwsd.8.gz", "/usr/share/man/man1/llmwsctl.1.gz"):
        root.run(["test", "-f", page])
    # No man(1) in a minbase root: the Documentation= check is the file test above.
    root.run(["systemd-analyze", "verify", "--man=no", "llmws.service"])


def test_security_exposure_is_ok(root: SystemdRoot) -> None:
    out = root.run(["systemd-analyze", "security", "--no-pager", "llmws.service"]).stdout
    level = re.search(r"Overall exposure level for llmws.service: ([\d.]+) (\w+)", out)
    assert level and level[2] in ("OK", "SAFE", "PERFECT"), out[-300:]


def test_start_returns_once_the_model_is_loaded(root: SystemdRoot) -> None:
    # The package started the service with no model yet; add one as the README says.
    assert unit(root, "StatusText")["StatusText"].startswith("no model")
    shutil.copytree(MODEL, root.root / "var/lib/llmws/models" / MODEL_NAME)
    root.run(["chown", "-R", "llmws:llmws", "/var/lib/llmws/models"])
    root.run(["systemctl", "restart", "llmws"], timeout=600)
    # No polling: READY=1 came after the load, so the state is final already.
    assert root.run(["systemctl", "is-active", "llmws"]).stdout.strip() == "active"
    state = unit(root, "StatusText", "SubState")
    assert state["SubState"] == "running"
    assert state["StatusText"].startswith(f"serving {MODEL_NAME} on cpu"), state
    assert journal_line(root, f": loaded {MODEL_NAME} on cpu", 6)
    assert journal_line(root, r": listening on ws://", 6)
    # Every line is text (a progress bar's carriage returns would make a binary entry).
    assert all(isinstance(entry["MESSAGE"], str) for entry in journal(root))


def test_llmwsctl_for_root_and_the_llmws_group_only(root: SystemdRoot) -> None:
    root.run(["useradd", "--create-home", "--groups", "llmws", "alice"])
    root.run(["useradd", "--create-home", "bob"])
    for user in (None, "alice"):
        assert MODEL_NAME in root.run(["llmwsctl", "status"], user=user).stdout
        assert MODEL_NAME in root.run(["llmwsctl", "models"], user=user).stdout
    refused = root.run(["llmwsctl", "status"], user="bob", check=False)
    assert refused.returncode == 4
    assert "llmws" in refused.stderr


def test_websocket_client_gets_an_answer(root: SystemdRoot) -> None:
    result = ask(root, "--prompt", "What is the capital of France?")
    assert result["welcome"]["model"] == MODEL_NAME
    assert "Paris" in result["answer"]
    assert journal_line(root, r"session \S+ \(new\)", 6)


OPENAI_CLIENT = """
import json, sys, urllib.request
def call(path, body=None):
    data = body and json.dumps(body).encode()
    request = urllib.request.Request("http://127.0.0.1:8765" + path, data)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)
chat = {"messages": [{"role": "user", "content": sys.argv[1]}], "max_tokens": 24, "temperature": 0}
print(json.dumps({"models": call("/v1/models"), "chat": call("/v1/chat/completions", chat)}))
"""


def test_openai_api_client_gets_an_answer(root: SystemdRoot) -> None:
    args = [VENV_PYTHON, "-c", OPENAI_CLIENT, "What is the capital of France?"]
    result = json.loads(root.run(args, timeout=600).stdout)
    assert MODEL_NAME in [model["id"] for model in result["models"]["data"]]
    assert "Paris" in result["chat"]["choices"][0]["message"]["content"]
    assert result["chat"]["usage"]["prompt_tokens"] > 0
    assert journal_line(
        root, r": 127\.0\.0\.1: chat_completions: (stop|length), [1-9]\d* tokens in", 6
    )


def test_reload_keeps_serving_and_logs_a_bad_config_as_error(root: SystemdRoot) -> None:
    pid = unit(root, "MainPID")["MainPID"]
    config = root.root / "etc/llmws/llmws.toml"
    good = config.read_text()
    config.write_text(good + "\n[server]\nno_such_key = 1\n")
    try:
        root.run(["systemctl", "reload", "llmws"])
        wait_for("the failed reload", lambda: journal_line(root, ": reload failed", 3), 60)
    finally:
        config.write_text(good)
    root.run(["systemctl", "reload", "llmws"])
    wait_for("the reload", lambda: journal_line(root, ": configuration reloaded", 6), 60)
    assert unit(root, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}


def test_killed_daemon_is_restarted_with_its_sessions(root: SystemdRoot) -> None:
    first = ask(root, "--prompt", "My name is Alice. Say hello.")
    session = first["welcome"]["session_id"]
    pid = unit(root, "MainPID")["MainPID"]
    root.run(["sh", "-c", f"kill -9 {pid}"])

    def restarted() -> bool:
        now = unit(root, "MainPID", "ActiveState", "SubState")
        return now["MainPID"] not in ("0", pid) and now["SubState"] == "running"

    wait_for("systemd to restart llmws", restarted)
    assert unit(root, "NRestarts")["NRestarts"] == "1"
    again = ask(root, "--session", session, "--history")
    assert again["welcome"]["resumed"] is True
    assert "Alice" in json.dumps(again["history"])


def test_upgrade_restarts_the_service_and_keeps_sessions(root: SystemdRoot) -> None:
    session = ask(root, "--prompt", "My name is Bob.")["welcome"]["session_id"]
    pid = unit(root, "MainPID")["MainPID"]
    # Reinstalling runs the maintainer scripts of an upgrade (postinst configure OLD).
    root.run(["apt-get", "install", "-y", "--reinstall", "/root/llmws.deb"], timeout=600)
    assert unit(root, "ActiveState")["ActiveState"] == "active"
    assert unit(root, "MainPID")["MainPID"] != pid
    again = ask(root, "--session", session, "--history")
    assert again["welcome"]["resumed"] is True
    assert "Bob" in json.dumps(again["history"])


def test_stop_drains_a_running_answer_and_exits_cleanly(root: SystemdRoot) -> None:
    started = root.root / "root" / "long-answer-started"
    long_answer = f"{VENV_PYTHON} /root/ws_client.py --prompt 'Count from 1 to 1000.'"
    long_answer += f" --max-new-tokens 4000 --started-file /{started.relative_to(root.root)}"
    root.run(["sh", "-c", f"{long_answer} >/root/long-answer.json 2>&1 &"])
    wait_for("the long answer to start", started.exists, 120)
    root.run(["systemctl", "stop", "llmws"])
    assert journal_line(root, ": draining running generations", 6)
    # Past TimeoutStopSec (30 s, well above the 10 s drain) systemd would have
    # sent SIGKILL and recorded Result=timeout.
    state = unit(root, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert state == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED
        "ExecMainStatus": "0",
    }
    assert journal_line(root, ": stopped$", 6)


def test_purge_removes_state_logs_and_user(root: SystemdRoot) -> None:
    root.run(["apt-get", "purge", "-y", "llmws"], timeout=300)
    gone = ("/var/lib/llmws", "/var/log/llmws", "/var/cache/llmws", "/etc/llmws", "/usr/lib/llmws")
    for path in gone:
        assert not (root.root / path.lstrip("/")).exists(), path
    assert root.run(["getent", "passwd", "llmws"], check=False).returncode == 2
    assert root.run(["getent", "group", "llmws"], check=False).returncode == 2
    assert "llmws.service" not in root.run(["systemctl", "list-unit-files"]).stdout
