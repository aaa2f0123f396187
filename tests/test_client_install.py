"""The client's own install: `pip install llmws` without the server's dependencies.

A laptop that only chats gets llmwsctl and the Python client with websockets, not torch
(pyproject.toml: the daemon's dependencies are the `server` extra). The slow tests install
the project the way a user does, into a fresh venv, and chat from there with a daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from llmwsd import __version__
from llmwsd.daemon import Daemon
from tests.conftest import ROOT, skip_or_fail, ws_url

# What the server needs and the client must never load: gigabytes, or a compiled library.
SERVER_ONLY = ("torch", "transformers", "numpy", "cryptography")
# Everything the client install may contain: a new dependency is a choice, made here too.
CLIENT_DISTRIBUTIONS = {"llmws", "websockets"}
# A pip install from the local wheel and the pip cache takes seconds; PyPI may be slower.
PIP_TIMEOUT = 300


def test_the_client_loads_nothing_of_the_server():
    """Even where the server's dependencies are installed (this venv), importing the client
    and the CLI loads none of them: the client install does not have them."""
    modules = [
        "llmwsctl.cli",
        "llmwsctl.chat",
        "llmwsctl.client",
        "llmwsctl.sync_client",
        "llmwsctl.adminclient",
    ]
    code = (
        f"import json, sys\nimport {', '.join(modules)}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert sorted(loaded & set(SERVER_ONLY)) == []


def clean_env(home: Path) -> dict[str, str]:
    """This environment without what would let the venv see this checkout or its settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LLMWS_"))}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"))
    return env


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """This venv's pip, installing into ``venv`` (which has no pip of its own)."""
    command = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT)


def setuptools_builds_wheels() -> bool:
    """Whether this venv's setuptools builds wheels by itself (70 and later; older ones need
    the `wheel` package, and pyproject.toml asks for 68 or later)."""
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 70
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only ``pip install llmws``, built from this checkout."""
    work = tmp_path_factory.mktemp("client-install")
    # Built from a copy, so that the build's egg-info and build/ stay out of the checkout.
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for package in ("llmwsd", "llmwsctl"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__py*"))
    # This venv's setuptools, where it can build a wheel alone: no download for the build.
    isolation = ["--no-build-isolation"] if setuptools_builds_wheels() else []
    wheels = work / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", wheels, source],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("llmws-*.whl")

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    # The one dependency, pinned as everywhere (usually from pip's cache), then the wheel
    # offline: an install that wanted anything more fails here, naming it.
    fetched = pip(venv, "install", "-q", "-c", str(ROOT / "constraints.txt"), "websockets")
    if fetched.returncode != 0:
        skip_or_fail(f"cannot install websockets from PyPI: {fetched.stderr.strip()[-500:]}")
    installed = pip(venv, "install", "-q", "--no-index", str(wheel))
    assert installed.returncode == 0, installed.stderr
    return venv


def run_in(venv: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` from the venv's bin/, away from this checkout (``python -c`` would import
    llmwsd from the current folder)."""
    home = venv.parent / "home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [str(venv / "bin" / command[0]), *command[1:]],
        cwd=home,
        env=clean_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )


INVENTORY = f"""\
import importlib.util, json
from importlib import metadata

print(json.dumps({{
    "distributions": sorted(d.metadata["Name"].lower() for d in metadata.distributions()),
    "importable": [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)],
}}))
"""


@pytest.mark.slow
def test_the_client_install_has_no_server_dependencies(client_venv: Path):
    listed = run_in(client_venv, "python", "-c", INVENTORY)
    assert listed.returncode == 0, listed.stderr
    inventory = json.loads(listed.stdout)
    assert set(inventory["distributions"]) == CLIENT_DISTRIBUTIONS
    assert inventory["importable"] == []
    version = run_in(client_venv, "llmwsctl", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"llmwsctl {__version__}")


@pytest.mark.slow
def test_llmwsd_without_the_server_extra_says_what_to_install(client_venv: Path):
    done = run_in(client_venv, "llmwsd")
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()  # one line, no traceback
    assert line.startswith("llmwsd: the server's dependencies are not installed (")
    assert "torch" in line
    assert line.endswith(": pip install 'llmws[server]'")


CLIENT_SCRIPT = """\
import sys
from llmwsctl.sync_client import SyncClient

with SyncClient(sys.argv[1]) as client:
    print(client.inference("hello from the laptop"))
    print(len(client.history()))
"""


@pytest.mark.slow
async def test_the_client_install_chats_with_a_daemon(client_venv: Path, fake_daemon: Daemon):
    """llmwsctl chat's one-shot mode and a SyncClient script, from the client's venv; run in
    threads, so that the in-process daemon's loop serves them meanwhile."""
    url = ws_url(fake_daemon)
    chat = await asyncio.to_thread(run_in, client_venv, "llmwsctl", "chat", "--prompt", "hi", url)
    assert (chat.returncode, chat.stdout) == (0, "echo: hi\n"), chat.stderr
    script = await asyncio.to_thread(run_in, client_venv, "python", "-c", CLIENT_SCRIPT, url)
    assert (script.returncode, script.stdout) == (0, "echo: hello from the laptop\n2\n"), (
        script.stderr
    )
