"""Model management with real parts: git-lfs and Hugging Face pulls, switch, rm, the public port.

The sources are made here from the default model's files: a git repository with
git-lfs (served by file://, and once through a throttled LFS server on
127.0.0.1 so that a pull can be caught halfway), and a local HTTP server that
speaks the part of the Hugging Face Hub API that huggingface_hub uses
(HF_ENDPOINT points the daemon at it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import websockets

from llmwsd.auth import TokenStore
from llmwsd.catalogue import fetch
from llmwsd.daemon import Daemon
from llmwsd.errors import LLMWSError
from llmwsd.service import model_changes
from tests.conftest import (
    DEFAULT_MODEL,
    FAST,
    REAL,
    RunningDaemon,
    recv_until,
    skip_or_fail,
    ws_url,
)
from tests.fake_engine import FakeEngine
from tests.test_admin import add_fake_model, ctl, ctl_json, link_model, start_and_wait_for_admin

PROMPT = "What is the capital of France?"
# "a..b" and "x.." pass the name pattern: only the separate ".." check refuses them.
BAD_NAMES = ["../x", "/etc", ".hidden", "a/b", "a..b", "x.."]
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
    "GIT_LFS_SKIP_SMUDGE": "1",
}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"no {what} after {timeout} s")


async def ask(url: str, prompt: str = PROMPT, max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """One JSON-mode generation; all its events up to done or error."""
    async with websockets.connect(url, open_timeout=10) as ws:
        await ws.send("{}")  # the hello: JSON mode, a new session
        await recv_until(ws, {"welcome"}, timeout=30)
        request = {"type": "inference", "prompt": {"system": "", "user": prompt}}
        await ws.send(json.dumps({**request, "config": {"max_new_tokens": max_new_tokens}}))
        return await recv_until(ws, {"done", "error"}, timeout=REAL)


def answer(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"] for e in events if e["type"] == "token")


def downloads(daemon: RunningDaemon) -> Path:
    return daemon.folder / "state" / "models"


def staging(daemon: RunningDaemon) -> list[str]:
    return sorted(os.listdir(daemon.folder / "state" / "pulls"))


# -- sources -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def git_lfs() -> None:
    """git-lfs must be there; as root, install it from Debian when it is missing."""
    if subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "git-lfs"]):
            subprocess.run(step, capture_output=True, timeout=600)
        if subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0:
            return
    skip_or_fail("git-lfs is not installed and could not be (apt-get install git-lfs as root)")


@pytest.fixture(scope="module")
def lfs_repo(tmp_path_factory: pytest.TempPathFactory, git_lfs: None) -> Path:
    """A git repository of the default model, with *.safetensors in git-lfs."""
    repo = tmp_path_factory.mktemp("sources") / "smol-lfs"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "lfs", "install", "--local")
    git(repo, "lfs", "track", "*.safetensors")
    for item in DEFAULT_MODEL.iterdir():
        os.link(item, repo / item.name)
    (repo / "README.md").write_text("the default model, for tests\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "model")
    assert "model.safetensors" in git(repo, "lfs", "ls-files")
    return repo


class LfsObjects(ThreadingHTTPServer):
    """The git-lfs batch API and object downloads, sent at ``rate`` bytes per second."""

    daemon_threads = True

    def __init__(self, store: Path, rate: float) -> None:
        super().__init__(("127.0.0.1", 0), LfsHandler)
        self.store, self.rate = store, rate
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/lfs"


class LfsHandler(BaseHTTPRequestHandler):
    server: LfsObjects

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        base = self.server.url
        objects = [
            {
                "oid": o["oid"],
                "size": o["size"],
                "authenticated": True,
                "actions": {"download": {"href": f"{base}/objects/{o['oid']}"}},
            }
            for o in request["objects"]
        ]
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.git-lfs+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        oid = self.path.rsplit("/", 1)[-1]
        path = self.server.store / oid[:2] / oid[2:4] / oid
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        chunk = 256 * 1024
        with path.open("rb") as f, self._quietly():
            while data := f.read(chunk):
                self.wfile.write(data)
                time.sleep(chunk / self.server.rate)

    @staticmethod
    def _quietly() -> Any:
        import contextlib

        return contextlib.suppress(BrokenPipeError, ConnectionResetError)


@pytest.fixture(scope="module")
def slow_lfs(lfs_repo: Path) -> Iterator[Path]:
    """The same repository, its LFS objects served at 25 MB/s (about 11 s for the weights)."""
    server = LfsObjects(lfs_repo / ".git" / "lfs" / "objects", rate=25e6)
    repo = lfs_repo.parent / "smol-slow"
    git(lfs_repo.parent, "clone", "-q", str(lfs_repo), str(repo))
    (repo / ".lfsconfig").write_text(f'[lfs]\n\turl = "{server.url}"\n')
    git(repo, "add", ".lfsconfig")
    git(repo, "commit", "-q", "-m", "LFS objects from the slow server")
    yield repo
    server.shutdown()


class Hub(ThreadingHTTPServer):
    """Enough of the Hugging Face Hub for huggingface_hub: model info, file resolve, ranges."""

    daemon_threads = True
    repo_id = "test-org/smol"
    commit = hashlib.sha1(b"smol").hexdigest()

    def __init__(self, files: dict[str, Path]) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files = files
        self.drop_once: set[str] = set()  # cut these off halfway the first time
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        hub, path = self.server, urlparse(self.path).path
        hub.requests.append((self.command, path, self.headers.get("Range")))
        info = f"/api/models/{hub.repo_id}"
        if path in (info, f"{info}/revision/main", f"{info}/revision/{hub.commit}"):
            siblings = [{"rfilename": n, "size": p.stat().st_size} for n, p in hub.files.items()]
            data = {"id": hub.repo_id, "sha": hub.commit, "siblings": siblings}
            return self.send(200, json.dumps(data).encode(), "application/json", body)
        prefix = f"/{hub.repo_id}/resolve/"
        if not path.startswith(prefix):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        revision, _, name = path[len(prefix) :].partition("/")
        if revision not in ("main", hub.commit) or name not in hub.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = hub.files[name].read_bytes()
        start = (
            int(self.headers["Range"].split("=")[1].split("-")[0]) if "Range" in self.headers else 0
        )
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", hub.commit)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        if name in hub.drop_once:
            hub.drop_once.discard(name)
            self.wfile.write(data[start : len(data) // 2])
            self.wfile.flush()
            self.close_connection = True  # the body is cut short: the client sees the drop
            return
        self.wfile.write(data[start:])

    def send(self, status: int, data: bytes, kind: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """The default model as a hub repo, with files a model folder does not need."""
    extra = tmp_path_factory.mktemp("hub-extra")
    (extra / "pytorch_model.bin").write_bytes(b"old weights")
    (extra / "model.onnx").write_bytes(b"onnx")
    files = {p.name: p for p in DEFAULT_MODEL.iterdir()}
    files |= {p.name: p for p in extra.iterdir()}
    server = Hub(files)
    yield server
    server.shutdown()


# -- daemons -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("tokens") / "admin.json"
    _, token = TokenStore(path, admin=True).add("ops")
    return path, token


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, hub: Hub, admin_token: tuple[Path, str]
) -> Iterator[RunningDaemon]:
    """A real llmwsd: the default model, a copy, a corrupt copy; admins may manage models."""
    folder = tmp_path_factory.mktemp("models-daemon")
    models = folder / "models"
    link_model(DEFAULT_MODEL, models / DEFAULT_MODEL.name)
    link_model(DEFAULT_MODEL, models / "smol-copy")
    broken = link_model(DEFAULT_MODEL, models / "smol-corrupt")
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    daemon = RunningDaemon(
        folder,
        env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"},
        models={"dirs": [str(models)]},
        api={"allow_model_management": True, "admin_tokens_file": str(admin_token[0])},
    ).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def serving_default(served: RunningDaemon, sock: Path) -> Iterator[RunningDaemon]:
    """Each test starts and ends with the default model loaded."""
    yield served
    assert ctl(sock, "switch", DEFAULT_MODEL.name).returncode == 0


@pytest.fixture
def idle(tmp_path: Path, git_lfs: None) -> Iterator[RunningDaemon]:
    """An llmwsd with no model (starts in a second) and the default configuration's policies."""
    (tmp_path / "no-models").mkdir()
    daemon = RunningDaemon(tmp_path, models={"dirs": [str(tmp_path / "no-models")]})
    start_and_wait_for_admin(daemon)
    yield daemon
    daemon.stop(signal.SIGKILL)


def idle_sock(daemon: RunningDaemon) -> Path:
    return daemon.admin_socket


# -- pull --------------------------------------------------------------------------------


def test_pull_a_git_lfs_repository_and_serve_it(
    serving_default: RunningDaemon, sock: Path, lfs_repo: Path
) -> None:
    done = ctl(sock, "pull", f"file://{lfs_repo}", "--name", "smol-git", timeout=300)
    assert done.returncode == 0, done.stderr + serving_default.log()
    assert f"pulled smol-git into {downloads(serving_default) / 'smol-git'}" in done.stdout
    # Plain progress lines (stderr is not a terminal): stages, then bytes of the weights.
    assert "smol-git: cloning file://" in done.stderr
    assert "smol-git: downloading model.safetensors" in done.stderr
    assert "100% 273 MB/273 MB" in done.stderr
    assert "pull " in serving_default.log() and "smol-git is ready" in serving_default.log()

    folder = downloads(serving_default) / "smol-git"
    # The model card stays; .git and .gitattributes go.
    assert sorted(os.listdir(folder)) == sorted([*os.listdir(DEFAULT_MODEL), "README.md"])
    assert staging(serving_default) == [] and ctl_json(sock, "pulls") == []
    entry = {e["name"]: e for e in ctl_json(sock, "models")}["smol-git"]
    assert entry["parameters"] == 134_515_008 and entry["architecture"] == "LlamaForCausalLM"
    assert entry["dtype"] == "bfloat16" and entry["context_length"] == 8192
    assert entry["loaded"] is False and entry["source"] == str(downloads(serving_default))
    assert "135M" in ctl(sock, "models").stdout

    assert ctl(sock, "switch", "smol-git").returncode == 0
    assert "Paris" in answer(asyncio.run(ask(serving_default.url)))
    assert ctl(sock, "switch", DEFAULT_MODEL.name).returncode == 0
    assert ctl(sock, "rm", "smol-git").returncode == 0
    # Pulled again under a name the catalogue has: refused before any transfer.
    again = ctl(sock, "pull", f"file://{lfs_repo}", "--name", "smol-copy")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_pull_cancelled_halfway_leaves_nothing(idle: RunningDaemon, slow_lfs: Path) -> None:
    repo = slow_lfs
    sock = idle_sock(idle)
    started = ctl_json(sock, "pull", f"file://{repo}", "--name", "smol-slow", "--detach")
    pull_id = started["id"]

    def halfway() -> Any:
        pulls = ctl_json(sock, "pulls")
        return pulls and pulls[0]["state"] == "running" and pulls[0]["done"] > 20e6 and pulls[0]

    running = wait_for(halfway, 60, "bytes of the weights")
    assert running["id"] == pull_id and running["progress"]["file"] == "model.safetensors"
    assert running["done"] < running["total"]
    cancelled = ctl(sock, "pull", "--cancel", pull_id)
    assert cancelled.returncode == 0 and f"cancelled pull {pull_id}" in cancelled.stdout
    assert ctl_json(sock, "pulls") == []
    assert staging(idle) == [] and os.listdir(downloads(idle)) == []
    assert ctl_json(sock, "models") == []
    unknown = ctl(sock, "pull", "--cancel", pull_id)
    assert unknown.returncode == 1 and f"no pull {pull_id}" in unknown.stderr


def test_several_pulls_run_at_once_each_with_its_id(idle: RunningDaemon, slow_lfs: Path) -> None:
    sock = idle_sock(idle)
    source = f"file://{slow_lfs}"
    ids = [ctl_json(sock, "pull", source, "--name", n, "--detach")["id"] for n in ("one", "two")]
    same = ctl(sock, "pull", source, "--name", "one")
    assert same.returncode == 1 and f"one is already being pulled (pull {ids[0]})" in same.stderr

    def both_downloading() -> bool:
        pulls = ctl_json(sock, "pulls")
        return [p["id"] for p in pulls] == ids and all(p["done"] > 0 for p in pulls)

    wait_for(both_downloading, 60, "two pulls downloading")
    listing = ctl(sock, "pulls").stdout
    assert ids[0] in listing and ids[1] in listing and "running" in listing
    for pull_id in ids:
        assert ctl(sock, "pull", "--cancel", pull_id).returncode == 0
    assert ctl_json(sock, "pulls") == [] and staging(idle) == []


def test_pull_interrupted_by_a_restart_is_listed_and_resumes(
    idle: RunningDaemon, slow_lfs: Path
) -> None:
    repo = slow_lfs
    sock = idle_sock(idle)
    pull_id = ctl_json(sock, "pull", f"file://{repo}", "--name", "smol-restart", "--detach")["id"]
    wait_for(lambda: (p := ctl_json(sock, "pulls")) and p[0]["done"] > 10e6, 60, "bytes")
    assert idle.stop() == 0
    start_and_wait_for_admin(idle)
    listed = ctl_json(sock, "pulls")
    assert [(p["id"], p["state"], p["name"]) for p in listed] == [
        (pull_id, "interrupted", "smol-restart")
    ]
    assert "pull the same SOURCE again to resume" in ctl(sock, "pulls").stdout
    assert f"pull {pull_id} of file://{repo}" in idle.log()  # said at start too

    resumed = ctl(sock, "pull", f"file://{repo}", "--name", "smol-restart", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{pull_id} smol-restart" in resumed.stderr  # the same pull, its clone kept
    assert ctl_json(sock, "pulls") == [] and staging(idle) == []
    assert (downloads(idle) / "smol-restart" / "model.safetensors").stat().st_size == (
        DEFAULT_MODEL / "model.safetensors"
    ).stat().st_size


@contextlib.contextmanager
def on_a_small_disk(tmp_path: Path, size: str) -> Iterator[tuple[RunningDaemon, Path]]:
    """A daemon (no model) whose state folder is on a tmpfs of ``size``; its admin socket."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a small tmpfs needs root")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(tiny)])
    if mounted.returncode != 0:
        skip_or_fail("cannot mount a tmpfs here")
    daemon = RunningDaemon(tmp_path, models={"dirs": []}, paths={"state_dir": str(tiny / "state")})
    try:
        yield daemon, start_and_wait_for_admin(daemon)
    finally:
        daemon.stop(signal.SIGKILL)
        subprocess.run(["umount", str(tiny)])


def test_pull_checks_free_disk_space_first(tmp_path: Path, lfs_repo: Path) -> None:
    with on_a_small_disk(tmp_path, "24m") as (_, sock):
        tiny = tmp_path / "tiny"
        done = ctl(sock, "pull", f"file://{lfs_repo}", "--name", "too-big")
        assert done.returncode == 1
        assert "not enough disk space for too-big: 269.1 MB still to download" in done.stderr
        assert "MB free in" in done.stderr and "llmwsctl pulls --clean" in done.stderr
        failed = ctl_json(sock, "pulls")
        assert [(p["state"], p["error"]["code"]) for p in failed] == [("failed", "disk_full")]
        assert os.listdir(tiny / "state" / "models") == []
        cleaned = ctl(sock, "pulls", "--clean")
        assert cleaned.returncode == 0 and "removed 1 unfinished pull(s)" in cleaned.stdout
        assert os.listdir(tiny / "state" / "pulls") == []


def test_pull_from_the_hub_resumes_after_a_dropped_connection(
    served: RunningDaemon, sock: Path, hub: Hub
) -> None:
    hub.drop_once = {"model.safetensors"}
    hub.requests.clear()
    done = ctl(sock, "pull", f"https://huggingface.co/{hub.repo_id}", "--name", "smol-hub")
    assert done.returncode == 0, done.stderr + served.log()
    assert "smol-hub: downloading model.safetensors" in done.stderr
    gets = [(path, rng) for method, path, rng in hub.requests if method == "GET"]
    weights = [rng for path, rng in gets if path.endswith("/model.safetensors")]
    size = (DEFAULT_MODEL / "model.safetensors").stat().st_size
    # Cut off halfway, then resumed where its last whole chunk ended, not from the start.
    assert len(weights) == 2 and weights[0] is None and weights[1] is not None
    assert 0 < int(weights[1].removeprefix("bytes=").removesuffix("-")) <= size // 2
    assert not any(p.endswith(("pytorch_model.bin", "model.onnx")) for p, _ in gets)
    assert all(Hub.commit in p for p, _ in gets if "/resolve/" in p)  # one revision
    folder = downloads(served) / "smol-hub"
    assert sorted(os.listdir(folder)) == sorted(os.listdir(DEFAULT_MODEL))
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((DEFAULT_MODEL / "model.safetensors").read_bytes()).hexdigest()
    assert ctl(sock, "rm", "smol-hub").returncode == 0

    missing = ctl(sock, "pull", "test-org/nothing-here")
    assert missing.returncode == 1 and "test-org/nothing-here" in missing.stderr
    assert ctl_json(sock, "pulls") == []  # nothing downloaded, nothing to resume: not kept


@pytest.mark.slow  # the conversion loads the whole model in a child process
def test_pull_a_local_gguf_file_converts_it(idle: RunningDaemon) -> None:
    from llmwsd.catalogue.convert import default_gguf

    sock = idle_sock(idle)
    relative = ctl(sock, "pull", "models/x.gguf")
    assert relative.returncode == 1 and "absolute path" in relative.stderr
    done = ctl(sock, "pull", str(default_gguf()), "--name", "smol-gguf", timeout=600)
    assert done.returncode == 0, done.stderr + idle.log()
    assert "smol-gguf: converting SmolLM2-135M-Instruct.Q4_1.gguf to safetensors" in done.stderr
    (entry,) = ctl_json(sock, "models")
    assert entry["name"] == "smol-gguf" and entry["architecture"] == "LlamaForCausalLM"
    assert entry["parameters"] == 134_515_008 and entry["dtype"] == "bfloat16"
    assert staging(idle) == []


# -- switch and rm -------------------------------------------------------------------------


def test_switch_under_load_breaks_no_stream(serving_default: RunningDaemon, sock: Path) -> None:
    async def scenario() -> list[list[dict[str, Any]]]:
        clients = [
            asyncio.create_task(ask(serving_default.url, f"Count from 1 to {n + 20}.", 48))
            for n in range(4)
        ]
        # The switch comes while the four are in the engine: generating, or queued for it.
        deadline = time.monotonic() + REAL
        while True:
            status = await asyncio.to_thread(ctl_json, sock, "status")
            if status["active"] >= 1 and status["active"] + status["queue"] == 4:
                break
            assert time.monotonic() < deadline, f"the four answers not running: {status}"
            await asyncio.sleep(0.1)
        switched = await asyncio.to_thread(ctl, sock, "switch", "smol-copy")
        assert switched.returncode == 0, switched.stderr
        late = await ask(serving_default.url)  # served by the new model
        return [*await asyncio.gather(*clients), late]

    results = asyncio.run(scenario())
    for events in results:
        assert [e["type"] for e in events][-1] == "done", events[-3:]
        assert events[0]["type"] in ("start", "queued")
    assert "Paris" in answer(results[-1])
    assert ctl_json(sock, "status")["model"] == "smol-copy"
    remembered = json.loads((serving_default.folder / "state" / "selected-model.json").read_text())
    assert remembered == {"model": "smol-copy"}


def test_failed_load_keeps_the_old_model_serving(
    serving_default: RunningDaemon, sock: Path
) -> None:
    done = ctl(sock, "switch", "smol-corrupt")
    assert done.returncode == 1
    assert "loading smol-corrupt failed" in done.stderr
    assert f"still serving {DEFAULT_MODEL.name}" in done.stderr
    assert ctl_json(sock, "status")["model"] == DEFAULT_MODEL.name
    assert "Paris" in answer(asyncio.run(ask(serving_default.url)))


def test_rm_refuses_the_loaded_model_unless_forced(
    serving_default: RunningDaemon, sock: Path
) -> None:
    link_model(DEFAULT_MODEL, downloads(serving_default) / "smol-doomed")
    assert ctl(sock, "switch", "smol-doomed").returncode == 0
    refused = ctl(sock, "rm", "smol-doomed")
    assert refused.returncode == 1 and "is the loaded model" in refused.stderr
    assert (downloads(serving_default) / "smol-doomed" / "config.json").exists()
    outside = ctl(sock, "rm", "smol-copy")
    assert outside.returncode == 1 and "unless --force" in outside.stderr

    forced = ctl(sock, "rm", "smol-doomed", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "removed smol-doomed" in forced.stdout
    assert not (downloads(serving_default) / "smol-doomed").exists()
    assert os.listdir(downloads(serving_default)) == []  # no .deleting-* left
    assert ctl_json(sock, "status")["model"] != "smol-doomed"
    assert "Paris" in answer(asyncio.run(ask(serving_default.url)))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(served: RunningDaemon, sock: Path, name: str) -> None:
    for argv in (
        ["switch", name],
        ["rm", name],
        ["rm", name, "--force"],
        ["pull", "test-org/smol", "--name", name],
    ):
        done = ctl(sock, *argv)
        assert done.returncode == 1 and "invalid model name" in done.stderr, argv
    assert ctl_json(sock, "pulls") == []
    assert ctl_json(sock, "status")["model"] == DEFAULT_MODEL.name


# -- the public port -----------------------------------------------------------------------


async def management(url: str, *messages: dict[str, Any], until: set[str]) -> list[dict[str, Any]]:
    async with websockets.connect(url, open_timeout=10) as ws:
        await ws.send("{}")  # the hello: JSON mode, a new session
        await recv_until(ws, {"welcome"}, timeout=30)
        received = []
        for message in messages:
            await ws.send(json.dumps(message))
            received += await recv_until(ws, until | {"error"}, timeout=300)
        return received


async def test_public_port_management_is_forbidden_by_default(idle: RunningDaemon) -> None:
    for message in (
        {"type": "switch_model", "model": "x"},
        {"type": "download_model", "repo": "org/x", "target_dir": "x"},
        {"type": "delete_model", "model_name": "x"},
    ):
        (error,) = await management(idle.url, message, until=set())
        assert error["code"] == "forbidden" and "not allowed on the public port" in error["message"]


async def test_public_port_management_with_an_admin_token(
    serving_default: RunningDaemon, admin_token: tuple[Path, str], hub: Hub, lfs_repo: Path
) -> None:
    url = serving_default.url
    (error,) = await management(url, {"type": "switch_model", "model": "smol-copy"}, until=set())
    assert error["code"] == "forbidden" and "admin token" in error["message"]

    admin = f"{url}?token={admin_token[1]}"
    switched = await management(
        admin, {"type": "switch_model", "model_path": "models/smol-copy"}, until={"model_switched"}
    )
    assert switched[-1]["type"] == "model_switched" and switched[-1]["model"] == "smol-copy"
    assert {"type": "log", "message": "loading smol-copy"} in switched
    for bad, code in (
        ({"model_path": "/etc"}, "not_found"),  # a good name, of no model in the catalogue
        ({"model_path": "../models/smol-copy"}, "bad_request"),
        ({"model": "a/b"}, "bad_request"),
    ):
        (error,) = await management(admin, {"type": "switch_model", **bad}, until=set())
        assert error["code"] == code, (bad, error)

    local = {"type": "download_model", "repo": f"file://{lfs_repo}", "target_dir": "x"}
    (error,) = await management(admin, local, until=set())
    assert error["code"] == "bad_request" and "only be pulled with llmwsctl" in error["message"]
    download = {"type": "download_model", "repo": hub.repo_id, "target_dir": "smol-ws"}
    events = await management(admin, download, until={"download_done"})
    kinds = [e["type"] for e in events]
    assert kinds[0] == "download_started" and kinds[-1] == "download_done", kinds
    assert "download_progress" in kinds and "log" in kinds
    last = [e for e in events if e["type"] == "download_progress"][-1]
    assert last["done"] == last["total"] > 269e6
    assert events[-1]["path"] == str(downloads(serving_default) / "smol-ws")

    deleted = await management(
        admin, {"type": "delete_model", "model_name": "smol-ws"}, until={"model_deleted"}
    )
    assert deleted[-1]["type"] == "model_deleted" and deleted[-1]["removed"] == "smol-ws"
    assert not (downloads(serving_default) / "smol-ws").exists()


# -- short memory, the remembered choice (in-process daemon, fake engine) --------------------


def short_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """No room for a second model beside the first: switches must unload first."""
    monkeypatch.setattr(model_changes, "free_memory", lambda device: 0)


async def test_switch_unloads_first_when_memory_is_short_and_requests_wait(
    fake_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    (add_fake_model(fake_daemon, "big-model") / "model.safetensors").write_bytes(b"w" * 4096)
    short_of_memory(monkeypatch)
    statuses: list[str] = []
    monkeypatch.setattr(fake_daemon.notifier, "status", statuses.append)
    release = asyncio.Event()
    loaded: list[FakeEngine] = []

    async def slow_loader(config: Any, path: Path) -> FakeEngine:
        await release.wait()
        loaded.append(FakeEngine(path))
        return loaded[-1]

    fake_daemon.models.loader = slow_loader
    old = fake_daemon.slot.engine
    assert isinstance(old, FakeEngine)
    switch = asyncio.create_task(fake_daemon.models.switch("big-model"))
    async with websockets.connect(ws_url(fake_daemon), open_timeout=FAST) as ws:
        await ws.send("{}")
        await recv_until(ws, {"welcome"})
        wait_for_unload = time.monotonic() + 10
        while fake_daemon.slot.engine is not None:
            assert time.monotonic() < wait_for_unload
            await asyncio.sleep(0.01)
        assert fake_daemon.slot.state == "switching"
        prompt = {"type": "inference", "prompt": {"system": "", "user": "during the switch"}}
        await ws.send(json.dumps(prompt))
        with pytest.raises(AssertionError, match=r"^no error or start within 0.3 s; got nothing"):
            await recv_until(ws, {"start", "error"}, timeout=0.3)  # it waits for the new model
        release.set()
        events = await recv_until(ws, {"done", "error"})
    assert answer(events) == "echo: during the switch"
    assert [r.messages[-1]["content"] for r in loaded[0].submitted] == ["during the switch"]
    assert old.submitted == []
    result = await switch
    assert result["unloaded_first"] is True and result["previous"] == "fake-model"
    assert "switching to big-model" in statuses


async def test_a_failed_load_after_unloading_reloads_the_old_model(
    fake_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    (add_fake_model(fake_daemon, "bad-model") / "model.safetensors").write_bytes(b"w" * 4096)
    short_of_memory(monkeypatch)

    async def loader(config: Any, path: Path) -> FakeEngine:
        if path.name == "bad-model":
            raise OSError("weights are corrupt")
        return FakeEngine(path)

    fake_daemon.models.loader = loader
    with pytest.raises(LLMWSError) as failed:
        await fake_daemon.models.switch("bad-model")
    assert failed.value.message == (
        "loading bad-model failed: weights are corrupt; still serving fake-model"
    )
    assert fake_daemon.slot.engine is not None and fake_daemon.slot.engine.info.name == "fake-model"
    assert fake_daemon.slot.state == "ready"


async def test_rm_force_of_the_only_model_unloads_it(fake_daemon: Daemon) -> None:
    folder = fake_daemon.config.model_dirs[0] / "fake-model"  # a configured folder, loaded
    result = await fake_daemon.models.remove("fake-model", force=True)
    assert result["removed"] == "fake-model" and not folder.exists()
    assert fake_daemon.slot.engine is None and fake_daemon.slot.state == "none"
    assert os.listdir(folder.parent) == []


async def test_the_switched_model_is_served_after_a_restart(fake_daemon_factory: Any) -> None:
    first = await fake_daemon_factory()
    add_fake_model(first, "second-model")
    assert (await first.models.switch("second-model"))["remembered"] is True
    await first.shutdown()
    again = await fake_daemon_factory()
    assert again.slot.engine is not None and again.slot.engine.info.name == "second-model"
    await again.shutdown()
    # [model] path pins the model: the remembered choice is neither used nor written.
    pinned_path = again.config.model_dirs[0] / "fake-model"
    pinned = await fake_daemon_factory(model={"path": str(pinned_path)})
    assert pinned.slot.engine is not None and pinned.slot.engine.info.name == "fake-model"
    assert (await pinned.models.switch("second-model"))["remembered"] is False


# -- hostile pull arguments ------------------------------------------------------------------

SECRET = "the-first-line-of-a-secret-file-4f1c"
# Revisions git would take as options (the first read a file of this host into its error).
OPTION_REVISIONS = [
    "--pathspec-from-file={secret}",
    "--orphan=x",
    "-b",
    "-bnew",
    "-",
    "--end-of-options",
    "--recurse-submodules",
    "main..HEAD",
    "v1 --force",
    "v1\n",
]


class DumbGit(ThreadingHTTPServer):
    """Bare repositories over git's dumb HTTP protocol (plain files), on 127.0.0.1."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        from functools import partial
        from http.server import SimpleHTTPRequestHandler

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DumbGit, Path]]:
    """The default model's config and tokenizer with a stand-in weights file, tagged v1,
    as a bare repository over HTTP; and a secret file beside it."""
    root = tmp_path_factory.mktemp("dumb-git")
    work = root / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    for item in DEFAULT_MODEL.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, work / item.name)
    (work / "model.safetensors").write_bytes(b"stand-in weights")
    git(work, "add", ".")
    git(work, "commit", "-q", "-m", "model")
    git(work, "tag", "v1")
    git(root, "clone", "-q", "--bare", str(work), str(root / "smol.git"))
    git(root / "smol.git", "update-server-info")
    secret = root / "secret.key"
    secret.write_text(SECRET + "\n")
    server = DumbGit(root)
    yield server, secret
    server.shutdown()


@pytest.fixture
def managing(tmp_path: Path, admin_token: tuple[Path, str]) -> Iterator[RunningDaemon]:
    """A daemon with no model whose admins may manage models on the public port."""
    (tmp_path / "no-models").mkdir()
    daemon = RunningDaemon(
        tmp_path,
        models={"dirs": [str(tmp_path / "no-models")]},
        api={"allow_model_management": True, "admin_tokens_file": str(admin_token[0])},
    )
    start_and_wait_for_admin(daemon)
    yield daemon
    daemon.stop(signal.SIGKILL)


@pytest.mark.parametrize("revision", OPTION_REVISIONS)
async def test_option_like_revisions_never_reach_git(
    managing: RunningDaemon,
    admin_token: tuple[Path, str],
    small_repo: tuple[DumbGit, Path],
    revision: str,
) -> None:
    server, secret = small_repo
    revision = revision.format(secret=secret)
    url = f"{managing.url}?token={admin_token[1]}"
    download = {"type": "download_model", "repo": server.url("smol.git"), "target_dir": "x"}
    (error,) = await management(url, {**download, "revision": revision}, until=set())
    assert error["code"] == "bad_request" and "invalid revision" in error["message"], error
    sock = idle_sock(managing)
    done = ctl(sock, "pull", server.url("smol.git"), "--name", "x", f"--revision={revision}")
    assert done.returncode != 0 and "invalid revision" in done.stderr, done.stderr
    for text in (json.dumps(error), done.stdout, done.stderr, json.dumps(ctl_json(sock, "pulls"))):
        assert SECRET not in text
    assert staging(managing) == []


async def test_a_failed_git_step_sends_no_git_output(
    managing: RunningDaemon, admin_token: tuple[Path, str], small_repo: tuple[DumbGit, Path]
) -> None:
    server, _ = small_repo
    url = f"{managing.url}?token={admin_token[1]}"
    download = {"type": "download_model", "repo": server.url("smol.git"), "target_dir": "x"}
    events = await management(url, {**download, "revision": "no-such-tag"}, until=set())
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "not_found", events
    assert error["message"] == "git checkout: the repository or the revision was not found"
    assert "did not match" in managing.log()  # git's own words stay in the daemon's log
    # A legitimate revision still checks out, and the pull completes.
    ok = await management(url, {**download, "revision": "v1"}, until={"download_done"})
    assert ok[-1]["type"] == "download_done", ok
    assert (downloads(managing) / "x" / "config.json").is_file()


@pytest.mark.parametrize(
    "source",
    [
        "-oProxyCommand=touch$IFS/tmp/pwned@host:repo",
        "ssh://-oProxyCommand=touch%20pwned/repo",
        "--upload-pack=touch pwned",
    ],
)
def test_option_like_sources_are_refused(source: str) -> None:
    with pytest.raises(LLMWSError) as refused:
        fetch.parse_source(source)
    assert refused.value.code == "bad_request"


def test_option_like_file_names_in_a_repository_are_not_fetched() -> None:
    names = ["config.json", "model.safetensors", "--exec=x.safetensors", "-c.json"]
    assert fetch.needed_files(names) == ["config.json", "model.safetensors"]


def test_disk_full_during_a_git_clone_is_disk_full(tmp_path: Path) -> None:
    # No LFS: the clone itself writes more than the disk holds, before any size is known.
    repo = tmp_path / "plain"
    repo.mkdir()
    git(repo, "init", "-q")
    shutil.copy(DEFAULT_MODEL / "config.json", repo / "config.json")
    (repo / "model.safetensors").write_bytes(os.urandom(24 * 1024 * 1024))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "weights without LFS")
    with on_a_small_disk(tmp_path, "8m") as (daemon, sock):
        done = ctl(sock, "pull", f"file://{repo}", "--name", "too-big")
        assert done.returncode == 1
        assert "the disk filled up while pulling too-big" in done.stderr, done.stderr
        assert "llmwsctl pulls --clean" in done.stderr and "fatal" not in done.stderr
        failed = ctl_json(sock, "pulls")
        # git removes the clone it could not finish: nothing downloaded, so nothing kept
        # to resume (Pulls._failed), where a pull that has files stays listed as failed.
        assert failed == []
        assert "No space left on device" in daemon.log()


# -- sources and file choice (no daemon) -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "location", "revision", "name"),
    [
        ("HuggingFaceTB/SmolLM2-135M", "huggingface", "HuggingFaceTB/SmolLM2-135M", None, None),
        ("https://huggingface.co/org/m/tree/v2", "huggingface", "org/m", "v2", "m"),
        ("https://example.org/git/m.git", "git", "https://example.org/git/m.git", None, "m"),
        ("git@example.org:org/m.git", "git", "git@example.org:org/m.git", None, "m"),
        ("file:///srv/models/m", "git", "file:///srv/models/m", None, "m"),
    ],
)
def test_sources_are_recognised(
    text: str, kind: str, location: str, revision: str | None, name: str | None
) -> None:
    source = fetch.parse_source(text)
    assert (source.kind, source.location, source.revision) == (kind, location, revision)
    assert source.default_name == (name or text.split("/")[-1])
    # A remote client may not use this host's files or ssh keys.
    if text.startswith(("git@", "file:")):
        with pytest.raises(LLMWSError, match="only be pulled with llmwsctl"):
            fetch.parse_source(text, host_access=False)
    else:
        assert fetch.parse_source(text, host_access=False) == source


@pytest.mark.parametrize("text", ["/nonexistent/dir", "/etc/passwd", "/etc", "/x/m.gguf"])
def test_a_remote_client_cannot_tell_which_paths_exist(text: str) -> None:
    with pytest.raises(LLMWSError) as refused:
        fetch.parse_source(text, host_access=False)
    assert refused.value.code == "bad_request" and "only be pulled with llmwsctl" in str(
        refused.value
    )


@pytest.mark.parametrize(
    "text", ["not a source", "", "relative/dir/x", "models/x.gguf", 7, "A://[", "https://[::1/x"]
)
def test_unusable_sources_are_refused(text: Any) -> None:
    with pytest.raises(LLMWSError) as refused:
        fetch.parse_source(text)
    assert refused.value.code == "bad_request"


def test_only_the_files_a_model_needs_are_fetched() -> None:
    repo = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "tf_model.h5",
        "onnx/model.onnx",
        "original/consolidated.00.pth",
        ".gitattributes",
        "tokenizer.json",
        "README.md",
    ]
    assert fetch.needed_files(repo) == [
        "README.md",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    assert "pytorch_model.bin" in fetch.needed_files(["config.json", "pytorch_model.bin"])
