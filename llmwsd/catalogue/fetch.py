"""The transfers of a pull: what a source is, which files a model needs, and the workers.

The workers are blocking and run in a thread: huggingface_hub downloads file by
file in that thread, git, git-lfs and the GGUF converter run as child processes
in their own process group. A :class:`Pull` carries the byte counts they update
and the stop flag they check, so that a cancel ends a transfer within a chunk
(huggingface_hub) or at once (a child process is killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmwsd.catalogue import models
from llmwsd.errors import BadRequest, DiskFull, InternalError, LLMWSError, NotFound

log = logging.getLogger("llmwsd.pull")

Progress = Callable[[dict[str, Any]], None]

DISK_MARGIN_BYTES = 16 * 1024 * 1024  # kept free beyond the announced size
HUGGING_FACE_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_GIT_SCP = re.compile(r"\w[\w.-]*@\w[\w.-]*:\S+")  # git@host:org/repo.git
# A branch, tag, commit or Hugging Face ref (refs/pr/1): never an option to git (no leading
# '-'), no '..' (a range, and never part of a ref name), nothing git would read as a pattern.
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/+-]{0,254}")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"

# Weight formats other than the one a model folder is served from: never downloaded.
_OTHER_WEIGHTS = (
    *(".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx", ".onnx_data"),
    *(".tflite", ".gguf", ".mlmodel", ".npz"),
)


class PullStopped(Exception):
    """Raised inside a worker when its pull is cancelled or the daemon stops."""


# -- sources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: str  # huggingface, git, gguf
    location: str  # repo id, git URL or path, GGUF file path
    revision: str | None
    default_name: str


def parse_source(text: Any, revision: Any = None, host_access: bool = True) -> Source:
    """What ``text`` names: a Hugging Face repo, a git repository, or a local GGUF file.

    Without ``host_access`` (a remote client), a source that reads this host's files or
    uses its ssh keys is refused before anything about the host is looked at, so that
    the answer never says whether a path exists.
    """
    if not isinstance(text, str) or not text.strip() or len(text) > 2048 or "\x00" in text:
        raise BadRequest("the source must be a non-empty string: org/name, a URL or a path")
    if revision is not None:
        revision = _parse_revision(revision)
    text = text.strip()
    if text.startswith("-"):
        raise BadRequest(f"a source never starts with '-': {text[:200]!r}")
    try:
        url = urlparse(text)
        hostname = url.hostname or ""
    except ValueError:  # "https://[" and the like: no valid host
        raise BadRequest(f"{text[:200]!r} is not a URL with a valid host") from None
    if url.scheme and hostname.startswith("-"):
        raise BadRequest(f"a host name never starts with '-': {text[:200]!r}")
    if url.scheme in ("http", "https") and _is_hugging_face(url.netloc):
        parts = [p for p in url.path.split("/") if p]
        if len(parts) >= 4 and parts[2] == "tree":  # https://huggingface.co/org/name/tree/REV
            revision = revision or _parse_revision(parts[3])
        if len(parts) < 2 or not _REPO_ID.fullmatch(f"{parts[0]}/{parts[1]}"):
            raise BadRequest(f"{text[:200]!r} does not name a Hugging Face model (org/name)")
        return Source("huggingface", f"{parts[0]}/{parts[1]}", revision, parts[1])
    path = Path(url.path if url.scheme == "file" else text)
    if not host_access and (
        url.scheme in ("file", "ssh") or path.is_absolute() or _GIT_SCP.fullmatch(text)
    ):
        raise BadRequest("local paths, file:// and ssh sources can only be pulled with llmwsctl")
    if path.suffix == ".gguf" and url.scheme in ("", "file"):
        if not path.is_absolute():
            raise BadRequest(f"give the GGUF file as an absolute path: {text[:200]!r}")
        if not path.is_file():
            raise NotFound(f"no GGUF file at {path}")
        return Source("gguf", str(path), None, path.stem)
    if not url.scheme and _REPO_ID.fullmatch(text):
        return Source("huggingface", text, revision, text.split("/")[1])
    if url.scheme in ("http", "https", "git", "ssh", "file") or _GIT_SCP.fullmatch(text):
        return Source("git", text, revision, _repo_name(text))
    if path.is_absolute():
        if not path.is_dir():
            raise NotFound(f"no git repository at {path}")
        return Source("git", str(path), revision, _repo_name(text))
    raise BadRequest(
        f"cannot tell what {text[:200]!r} is: use org/name (Hugging Face), a git URL "
        "(https://, file://, ssh://), an absolute path, or an absolute path to a .gguf file"
    )


def _parse_revision(revision: Any) -> str:
    if (
        not isinstance(revision, str)
        or not _REVISION.fullmatch(revision)
        or ".." in revision
        or revision.endswith(("/", ".lock"))
    ):
        raise BadRequest(
            f"invalid revision {str(revision)[:80]!r}: give a branch, tag or commit "
            "(letters, digits, '.', '_', '/', '+', '-'; no leading '-', no '..')"
        )
    return revision


def _is_hugging_face(netloc: str) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "")).netloc
    return netloc in HUGGING_FACE_HOSTS or (bool(endpoint) and netloc == endpoint)


def _repo_name(text: str) -> str:
    last = text.rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
    return last.removesuffix(".git")


def needed_files(names: Iterable[str]) -> list[str]:
    """The files of a repository that a model folder needs: top-level, one weight format.

    Safetensors win over PyTorch ``.bin``; other formats (ONNX, TF, Flax, GGUF
    quantizations, ``original/`` checkpoints in subfolders) are left on the server.
    """
    # A leading '-' names no model file, and could be taken for an option by git-lfs.
    top = [n for n in names if "/" not in n and not n.startswith((".", "-"))]
    if any(n.endswith(".safetensors") for n in top):
        return sorted(n for n in top if not n.endswith(_OTHER_WEIGHTS))
    if any(n.endswith(".bin") for n in top):
        keep = tuple(w for w in _OTHER_WEIGHTS if w != ".bin")
        return sorted(n for n in top if not n.endswith(keep))
    return sorted(top)


# -- one pull ----------------------------------------------------------------------------


@dataclass
class Pull:
    """A pull and its progress. The worker thread writes the counters; the loop reads them."""

    id: str
    source: Source
    name: str
    folder: Path
    created: float = field(default_factory=time.time)
    state: str = "queued"  # queued, running, done, failed, cancelled, interrupted
    stage: str = "queued"
    message: str = "waiting for a free pull slot"
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    done: int = 0
    total: int | None = None
    file: str | None = None
    file_done: int = 0
    file_total: int | None = None
    followers: list[Progress] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None  # "cancel" or "shutdown", once asked
    announce: Callable[[dict[str, Any]], None] | None = None  # stage changes, from any thread
    _stop: threading.Event = field(default_factory=threading.Event)
    _child: subprocess.Popen[bytes] | None = None
    _rate_start: tuple[float, int] | None = None  # (monotonic, done) when bytes started to flow

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    # -- the worker's side ---------------------------------------------------------

    def check_stop(self) -> None:
        if self._stop.is_set():
            raise PullStopped(self.stop_reason)

    def set_stage(self, stage: str, message: str) -> None:
        self.check_stop()
        self.stage, self.message = stage, message
        log.info("pull %s: %s", self.id, message)
        if self.announce is not None:
            self.announce(self.progress())  # at once: a stage may end before the next report

    def start_file(self, name: str, size: int | None) -> None:
        self.check_stop()
        self.file, self.file_total, self.file_done = name, size, 0

    def add_bytes(self, n: int) -> None:
        """Count ``n`` more bytes of the current file (negative when a transfer restarts)."""
        if self._rate_start is None:
            self._rate_start = (time.monotonic(), self.done)
        self.done += n
        self.file_done += n
        self.check_stop()

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop.set()
        child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    # -- reports -------------------------------------------------------------------

    def rate(self) -> tuple[float | None, float | None]:
        """Bytes per second since bytes started to flow, and the seconds left at that pace."""
        if self._rate_start is None:
            return None, None
        started, base = self._rate_start
        elapsed = time.monotonic() - started
        if elapsed < 1.0 or self.done <= base:
            return None, None
        speed = (self.done - base) / elapsed
        eta = (self.total - self.done) / speed if self.total else None
        return round(speed), (round(max(eta, 0.0), 1) if eta is not None else None)

    def progress(self) -> dict[str, Any]:
        speed, eta = self.rate()
        return {
            "id": self.id,
            "stage": self.stage,
            "message": f"{self.id} {self.name}: {self.message}",
            # No byte count before the size is known: clients show the stage alone.
            "done": self.done if self.total is not None else None,
            "total": self.total,
            "file": self.file,
            "file_done": self.file_done,
            "file_total": self.file_total,
            "speed_bps": speed,
            "eta_s": eta,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source.location,
            "kind": self.source.kind,
            "revision": self.source.revision,
            "name": self.name,
            "state": self.state,
            "stage": self.stage,
            "created": self.created,
            "done": self.done,
            "total": self.total,
            "error": self.error,
            "folder": str(self.folder),
        }

    def record(self) -> dict[str, Any]:
        """What pull.json keeps: enough to list the pull and to resume it after a restart."""
        return {**self.summary(), "default_name": self.source.default_name}

    def save(self) -> None:
        tmp = self.folder / ".pull.json.tmp"
        tmp.write_text(json.dumps(self.record(), indent=2) + "\n")
        os.replace(tmp, self.folder / "pull.json")


def load_record(folder: Path) -> Pull | None:
    """A pull left on disk by an earlier run (or None when its pull.json is unreadable)."""
    try:
        data = json.loads((folder / "pull.json").read_text())
        source = Source(data["kind"], data["source"], data.get("revision"), data["default_name"])
        pull = Pull(data["id"], source, data["name"], folder, created=float(data["created"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pull.state = data.get("state", "interrupted")
    if pull.state in ("queued", "running"):
        pull.state = "interrupted"  # the daemon stopped under it
    pull.stage, pull.message = pull.state, data.get("stage", "")
    pull.done, pull.total, pull.error = data.get("done", 0), data.get("total"), data.get("error")
    return pull


# -- the workers (blocking: run in a thread) ----------------------------------------------


def check_disk_space(pull: Pull, remaining: int) -> None:
    free = shutil.disk_usage(pull.folder).free
    if remaining + DISK_MARGIN_BYTES > free:
        raise DiskFull(
            f"not enough disk space for {pull.name}: {remaining / 1e6:.1f} MB still to download, "
            f"{free / 1e6:.1f} MB free in {pull.folder.parent}; free some space "
            "(llmwsctl rm, llmwsctl pulls --clean) and pull again",
            needed_bytes=remaining,
            free_bytes=free,
        )


def run_child(
    pull: Pull, argv: list[str], cwd: Path, watch: Callable[[], None] | None = None
) -> None:
    """Run one step of a pull as a child process; cancel kills it, a failure raises."""
    pull.check_stop()
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",  # a repository that needs a password fails instead of waiting
        "GIT_LFS_SKIP_SMUDGE": "1",
    }
    output = pull.folder / "step.log"
    with output.open("wb") as out:
        child = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group: cancel kills git and its helpers
        )
        pull._child = child
        try:
            while child.poll() is None:
                if pull._stop.is_set():
                    pull.stop(pull.stop_reason or "cancel")  # kills the group
                if watch is not None:
                    watch()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(0.25)
        finally:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            pull._child = None
    pull.check_stop()
    if child.returncode != 0:
        raise _child_failure(pull, _step_name(argv), child.returncode, output)


def _step_name(argv: list[str]) -> str:
    """What a child process is, for messages: ``git clone``, ``git lfs fetch``, the converter."""
    if argv[0] == "git":
        return " ".join(argv[: 3 if argv[1] == "lfs" else 2])
    return "the GGUF conversion"


def _child_failure(pull: Pull, step: str, status: int, output: Path) -> LLMWSError:
    """The error a failed step ends its pull with: a short message; its output goes to the log.

    The output is never sent on: a client must not be able to make git print
    files of this host into a reply (and a remote client has no use for git's words).
    """
    text = output.read_text(errors="replace").strip()
    tail = text.splitlines()[-5:]
    log.warning("pull %s: %s failed (exit status %d): %s", pull.id, step, status, " / ".join(tail))
    lowered = text.lower()
    if "no space left on device" in lowered or "disk quota exceeded" in lowered:
        return disk_full(pull)
    if any(hint in lowered for hint in _NOT_FOUND_HINTS):
        return NotFound(f"{step}: the repository or the revision was not found")
    return InternalError(f"{step} failed (exit status {status}); the daemon's log has its output")


# What git, git-lfs and the converter say when the repository, a revision or a file is not there.
_NOT_FOUND_HINTS = (
    "not found",
    "does not exist",
    "did not match any",
    "unknown revision",
    "does not appear to be a git repository",
    "no such file or directory",
)


def disk_full(pull: Pull) -> DiskFull:
    free = shutil.disk_usage(pull.folder.parent).free
    return DiskFull(
        f"the disk filled up while pulling {pull.name} ({free / 1e6:.1f} MB free in "
        f"{pull.folder.parent}); free some space (llmwsctl rm, llmwsctl pulls --clean) and "
        "pull again",
        free_bytes=free,
    )


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _lfs_pointer(path: Path) -> tuple[str, int] | None:
    """(sha256 oid, size) when ``path`` is a git-lfs pointer file, else None."""
    try:
        if path.stat().st_size > 1024:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(_LFS_POINTER):
        return None
    fields = dict(line.split(" ", 1) for line in data.decode().splitlines() if " " in line)
    return fields["oid"].removeprefix("sha256:"), int(fields["size"])


def files_size(folder: Path) -> int:
    with contextlib.suppress(OSError):
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return 0


def fetch_git(pull: Pull) -> None:
    """A shallow clone without LFS content, then the needed LFS files one by one."""
    source, work = pull.source, pull.model_dir
    cloned = pull.folder / "cloned"  # a clone cut short by a restart is started over
    if not cloned.exists():
        shutil.rmtree(work, ignore_errors=True)
        pull.set_stage("cloning", f"cloning {source.location}")
        shallow = ["--depth", "1"] if source.revision is None else []
        url = source.location
        if url.startswith("/"):
            url = "file://" + url  # shallow clones need a URL
        run_child(pull, ["git", "clone", *shallow, "--", url, str(work)], pull.folder)
        if source.revision is not None:
            # Never an option: parse_source refused a leading '-' (git 2.39's checkout takes
            # --end-of-options for a path, so that guard cannot be used here).
            run_child(pull, ["git", "checkout", "--quiet", source.revision], work)
        cloned.touch()
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=work, check=True, capture_output=True)
        .stdout.decode()
        .split("\0")
    )
    needed = set(needed_files(t for t in tracked if t))
    # Files fetched before a restart are no pointers any more: they count as present.
    lfs = {name: pointer for name in needed if (pointer := _lfs_pointer(work / name))}
    pull.done = sum((work / name).stat().st_size for name in needed if name not in lfs)
    pull.total = pull.done + sum(size for _, size in lfs.values())
    check_disk_space(pull, pull.total - pull.done)
    for name in sorted(lfs):
        _fetch_lfs_file(pull, work, name, *lfs[name])
    pull.set_stage("finishing", "removing the git metadata")
    shutil.rmtree(work / ".git")
    for item in list(work.iterdir()):
        # Symlinks go too: a repository must not make the model read files outside it.
        if item.is_symlink() or not item.is_file():
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        elif item.name not in needed or _lfs_pointer(item):
            item.unlink()


def _fetch_lfs_file(pull: Pull, work: Path, name: str, oid: str, size: int) -> None:
    pull.set_stage("downloading", f"downloading {name}")
    pull.start_file(name, size)
    partial = [work / ".git" / "lfs" / "tmp", work / ".git" / "lfs" / "incomplete"]
    counted = 0

    def watch() -> None:  # git-lfs grows the object under .git/lfs/tmp while it downloads
        nonlocal counted
        now = min(sum(files_size(p) for p in partial), size)
        pull.add_bytes(now - counted)
        counted = now

    # fetch, not pull: the object is then moved into place, so it is on disk once, not twice.
    run_child(pull, ["git", "lfs", "fetch", "origin", f"--include={name}"], work, watch)
    obj = work / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    if not obj.is_file() or obj.stat().st_size != size:
        raise InternalError(f"git lfs fetch did not bring {name} ({oid[:12]})")
    pull.add_bytes(size - counted)
    os.replace(obj, work / name)
    os.chmod(work / name, 0o644)


def fetch_huggingface(pull: Pull, token: str | None) -> None:
    """The repo's needed files, one by one, pinned to one commit; finished files are kept."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    source = pull.source
    # Read here, not at import: huggingface_hub reads HF_ENDPOINT once, when first imported.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    pull.set_stage("resolving", f"asking Hugging Face about {source.location}")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            source.location, revision=source.revision, files_metadata=True
        )
    except GatedRepoError as e:
        raise BadRequest(
            f"{source.location} is gated: accept its terms and set HF_TOKEN ({e})"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise NotFound(f"{source.location}: {' '.join(str(e).split())[:300]}") from e
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    needed = needed_files(sizes)
    if not any(n.endswith((".safetensors", ".bin")) for n in needed):
        raise BadRequest(
            f"{source.location} has no safetensors or .bin weights; for a GGUF-only repository, "
            "download one .gguf file and pull its path"
        )
    pull.total = sum(sizes[n] or 0 for n in needed)
    pull.done = sum(sizes[n] or 0 for n in needed if _complete(pull.model_dir / n, sizes[n]))
    check_disk_space(pull, pull.total - pull.done)
    pull.model_dir.mkdir(exist_ok=True)
    bar = progress_bar_class(pull)
    for name in needed:
        if _complete(pull.model_dir / name, sizes[name]):
            continue
        pull.set_stage("downloading", f"downloading {name}")
        pull.start_file(name, sizes[name])
        # The commit, not the branch: every file then comes from the same revision.
        hf_hub_download(
            source.location,
            name,
            revision=info.sha,
            local_dir=pull.model_dir,
            token=token,
            endpoint=endpoint,
            tqdm_class=bar,
        )
    shutil.rmtree(pull.model_dir / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping


def _complete(path: Path, size: int | None) -> bool:
    return path.is_file() and (size is None or path.stat().st_size == size)


def progress_bar_class(pull: Pull) -> type[Any]:
    """A tqdm that counts bytes into ``pull`` (and stops the transfer when it is cancelled)."""
    from tqdm.auto import tqdm

    class PullBar(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True  # the daemon has no terminal to draw on
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            pull.add_bytes(int(n or 0))  # raises PullStopped on cancel, ending the transfer
            return super().update(n)

    return PullBar


def import_gguf(pull: Pull) -> None:
    """Convert the GGUF file in a child process (it loads the whole model; cancel kills it)."""
    gguf = Path(pull.source.location)
    pull.total = gguf.stat().st_size
    # The converted folder is about the size of the GGUF's weights at 16 bits: often larger.
    check_disk_space(pull, 2 * pull.total)
    shutil.rmtree(pull.model_dir, ignore_errors=True)
    pull.set_stage("converting", f"converting {gguf.name} to safetensors")
    pull.start_file(gguf.name, pull.total)
    argv = [
        sys.executable,
        "-m",
        "llmwsd.catalogue.convert",
        str(pull.model_dir),
        "--gguf",
        str(gguf),
    ]
    run_child(pull, argv, pull.folder)
    pull.add_bytes(pull.total)


def verify_model(folder: Path) -> None:
    """The model's config and tokenizer must load before it joins the catalogue."""
    if not models.is_model_folder(folder):
        raise BadRequest("the download holds no model: it needs config.json and weights")
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise BadRequest(
            f"the downloaded model does not load: {' '.join(str(e).split())[:300]}"
        ) from e
