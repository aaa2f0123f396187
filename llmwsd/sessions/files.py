"""Sessions at rest: one encrypted, append-only log per session in ``state_dir/sessions/<id>/``.

:class:`SessionFiles` is the files implementation of :class:`~llmwsd.sessions.store.SessionLogs`.

A log file is a header (magic, random salt) and then records, each one
``length (4 bytes) | nonce (12) | AES-256-GCM ciphertext and tag``, holding one
JSON object. The file's key is derived from the daemon's session key, the salt
and the session id (HKDF): random nonces stay far from their collision bound,
and a log copied into another session's folder does not authenticate. A
record's index in the file is its associated data, so records cannot be
reordered or removed from the middle unnoticed.

Crash safety: records are only appended. A record shorter than its length says
is the torn tail of a write that a crash (``kill -9``) cut off: it is dropped
and the file truncated there; the session keeps every record before it. A
complete record that fails authentication means the file was changed: the
session is logged and skipped, the file left for the operator. Compaction
writes a new file beside the log and renames it over the log.

All file I/O runs on one writer thread, in the order the event loop queued it,
so the loop never waits for the disk; records reach the OS as soon as the
thread wakes, and are fsync'ed at every record that is not a token.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import queue
import shutil
import stat
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llmwsd.errors import ConfigError
from llmwsd.sessions.store import Record

log = logging.getLogger("llmwsd.sessions")

KEY_FILE = "session.key"
KEY_SIZE = 32  # AES-256
MAGIC = b"LLMWSS\x01\n"  # format version 1
SALT_SIZE = 16
HEADER_SIZE = len(MAGIC) + SALT_SIZE
NONCE_SIZE = 12
TAG_SIZE = 16
RECORD_LENGTH = struct.Struct(">I")
RECORD_INDEX = struct.Struct(">Q")
LOG_NAME = "log"
COMPACTING_NAME = "log.new"
LOCK_NAME = ".lock"
# New sessions are refused below this much free space: one that cannot be written would
# vanish at the next restart without its client being told.
MIN_FREE_BYTES = 1024 * 1024


class LogCorrupt(Exception):
    """A session log that is not ours or was changed: it fails authentication."""


# -- the key ---------------------------------------------------------------------------


def load_key(state_dir: Path) -> bytes:
    """The session key: systemd's credential when there is one, else ``state_dir/session.key``.

    The state folder's key is created on first start (random, 0600, atomically:
    of two daemons starting at once, both end up with the same key).
    """
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / KEY_FILE).exists():
        # systemd made this copy private to the service; its mode is systemd's business.
        return _read_key(Path(credentials) / KEY_FILE, check_mode=False)
    path = state_dir / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        return _create_key(path)


def _read_key(path: Path, check_mode: bool = True) -> bytes:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise  # load_key creates it
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the session key: {e.strerror}") from None
    if check_mode and mode & 0o077:
        log.warning("%s is readable by others (mode %o): chmod 600 it", path, stat.S_IMODE(mode))
    return parse_key(data, path)


def parse_key(data: bytes, path: Path) -> bytes:
    """A key file holds 32 bytes, raw or base64-encoded (``openssl rand -base64 32``)."""
    if len(data) == KEY_SIZE:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_SIZE:
        raise ConfigError(f"{path}: a session key is {KEY_SIZE} bytes, raw or base64-encoded")
    return key


def _create_key(path: Path) -> bytes:
    key = os.urandom(KEY_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # left by an earlier start that crashed here
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)  # fails if another daemon was first: then use its key
    except FileExistsError:
        return _read_key(path)
    finally:
        temporary.unlink()
    _fsync_folder(path.parent)
    log.info("created the session key %s", path)
    return key


# -- records ---------------------------------------------------------------------------


def file_cipher(key: bytes, salt: bytes, session_id: str) -> AESGCM:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=salt,
        info=b"llmws session log " + session_id.encode(),
    )
    return AESGCM(hkdf.derive(key))


def seal(cipher: AESGCM, index: int, plaintext: bytes) -> bytes:
    """One framed record: its length, a fresh nonce, the ciphertext with its tag."""
    nonce = os.urandom(NONCE_SIZE)
    body = nonce + cipher.encrypt(nonce, plaintext, RECORD_INDEX.pack(index))
    return RECORD_LENGTH.pack(len(body)) + body


@dataclass
class LogContents:
    records: list[dict[str, Any]]
    salt: bytes
    valid_size: int  # bytes up to the end of the last complete record
    torn: bool  # a partial record followed them (a write cut off by a crash)


def read_log(data: bytes, key: bytes, session_id: str) -> LogContents:
    """Decrypt a log's records; raise LogCorrupt when the file is not intact."""
    if len(data) < HEADER_SIZE or not data.startswith(MAGIC):
        raise LogCorrupt("not a session log (bad header)")
    salt = data[len(MAGIC) : HEADER_SIZE]
    cipher = file_cipher(key, salt, session_id)
    records: list[dict[str, Any]] = []
    offset = HEADER_SIZE
    while offset + RECORD_LENGTH.size <= len(data):
        (size,) = RECORD_LENGTH.unpack_from(data, offset)
        start, end = offset + RECORD_LENGTH.size, offset + RECORD_LENGTH.size + size
        if end > len(data):
            break
        if size < NONCE_SIZE + TAG_SIZE:
            raise LogCorrupt(f"record {len(records)} at byte {offset} has a bad length")
        nonce, sealed = data[start : start + NONCE_SIZE], data[start + NONCE_SIZE : end]
        try:
            plaintext = cipher.decrypt(nonce, sealed, RECORD_INDEX.pack(len(records)))
        except InvalidTag:
            raise LogCorrupt(
                f"record {len(records)} at byte {offset} fails authentication "
                "(changed, or encrypted with another session key)"
            ) from None
        records.append(json.loads(plaintext))
        offset = end
    return LogContents(records, salt, offset, offset < len(data))


# -- the files -------------------------------------------------------------------------


@dataclass
class _OpenLog:
    cipher: AESGCM
    next_index: int


@dataclass
class _Operation:
    kind: str  # append, rewrite, remove
    session_id: str
    data: bytes = b""
    durable: bool = False


class SessionFiles:
    """The session folders, their key, and the thread that writes them (a ``SessionLogs``)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.folder = state_dir / "sessions"
        self.key = b""
        self._logs: dict[str, _OpenLog] = {}  # only the writer thread touches it once started
        self._queue: queue.SimpleQueue[_Operation | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        # Sessions whose last write failed (disk full…): the store rewrites them whole.
        # A set's add/discard are atomic, which is all the two threads share.
        self.failed: set[str] = set()

    @property
    def location(self) -> str:
        return str(self.folder)

    def load(self) -> list[tuple[str, list[Record]]]:
        """Every readable session's records; then the writer starts (blocking)."""
        sessions = list(self.open())
        self.start()
        return sessions

    def open(self) -> Iterator[tuple[str, list[Record]]]:
        """Load the key, then yield ``(session_id, records)`` for each readable session.

        Blocking: call it from a thread, then :meth:`start` the writer.
        """
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock()
        self.key = load_key(self.state_dir)
        with os.scandir(self.folder) as entries:
            names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        for name in names:
            if not _is_session_id(name):
                log.warning("ignoring %s: not a session folder", self.folder / name)
                continue
            records = self._load(name)
            if records is not None:
                yield name, records

    def _load(self, session_id: str) -> list[dict[str, Any]] | None:
        folder = self.folder / session_id
        path = folder / LOG_NAME
        try:
            with contextlib.suppress(FileNotFoundError):
                (folder / COMPACTING_NAME).unlink()  # a compaction cut off: the log is intact
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                contents = read_log(f.read(), self.key, session_id)
            if contents.torn:
                log.warning(
                    "session %s: dropped a partly written last record (the daemon was stopped "
                    "mid-write); %d records kept",
                    session_id,
                    len(contents.records),
                )
                os.truncate(path, contents.valid_size)  # later appends follow the good ones
        except FileNotFoundError:
            # Created but cut off before its first record landed: nothing to keep.
            log.info("session %s: no log, removed", session_id)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        except (LogCorrupt, ValueError) as e:
            log.error("session %s: %s: %s; skipped, the file is left in place", session_id, path, e)
            return None
        except OSError:
            log.error("session %s: cannot read %s; skipped", session_id, path, exc_info=True)
            return None
        cipher = file_cipher(self.key, contents.salt, session_id)
        self._logs[session_id] = _OpenLog(cipher, len(contents.records))
        return contents.records

    def _lock(self) -> None:
        """Two daemons appending to the same logs would corrupt them: the second one stops."""
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{self.folder} is in use by another llmwsd (same state_dir)"
            ) from None
        self._lock_fd = fd

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmwsd-sessions", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write everything queued, then stop the writer (blocking: call it from a thread)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def out_of_room(self) -> bool:
        """Whether the sessions' file system is (nearly) full: one statvfs, cheap on the loop."""
        try:
            stats = os.statvfs(self.folder)
        except OSError:
            log.error("cannot check the free space of %s", self.folder, exc_info=True)
            return False  # the writes themselves will tell
        return stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES

    # -- what the event loop queues ----------------------------------------------------

    # Encoded here, on the loop: a snapshot holds the session's live lists.
    def append(self, session_id: str, record: Record, durable: bool) -> None:
        self._queue.put(_Operation("append", session_id, encode_record(record), durable))

    def rewrite(self, session_id: str, snapshot: Record) -> None:
        self._queue.put(_Operation("rewrite", session_id, encode_record(snapshot)))

    def remove(self, session_id: str) -> None:
        self._queue.put(_Operation("remove", session_id))

    # -- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while batch[-1] is not None:
                    batch.append(self._queue.get_nowait())
            # Appends to one session go out in one write; other operations keep their order.
            appends: dict[str, list[bytes]] = {}
            durable: set[str] = set()
            for operation in batch:
                if operation is None:
                    break
                if operation.kind == "append":
                    appends.setdefault(operation.session_id, []).append(operation.data)
                    if operation.durable:
                        durable.add(operation.session_id)
                    continue
                # A snapshot holds every change queued before it; a removal ends them all.
                appends.pop(operation.session_id, None)
                method = self._rewrite if operation.kind == "rewrite" else self._remove
                self._guarded(method, operation.session_id, operation.data)
            for session_id, records in appends.items():
                self._guarded(self._append, session_id, records, session_id in durable)
            if batch[-1] is None:
                return

    def _guarded(self, method: Any, session_id: str, *args: Any) -> None:
        try:
            method(session_id, *args)
        except Exception:
            # Logged once per spell of failures (a full disk fails every record).
            if session_id not in self.failed:
                log.error("session %s: writing its file failed", session_id, exc_info=True)
            self.failed.add(session_id)

    def _append(self, session_id: str, records: list[bytes], durable: bool) -> None:
        if not records:
            return
        open_log = self._logs.get(session_id)
        if open_log is None:  # removed meanwhile, or never written after a failure
            return
        index = open_log.next_index
        frames = b"".join(seal(open_log.cipher, index + i, r) for i, r in enumerate(records))
        fd = os.open(self.folder / session_id / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, frames)
                if durable:
                    os.fsync(fd)
            except OSError:
                # Leave no partial record before the ones that later writes append.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        open_log.next_index = index + len(records)

    def _rewrite(self, session_id: str, snapshot: bytes) -> None:
        """Write a new log holding one snapshot record, then rename it over the old one."""
        self._logs.pop(session_id, None)  # appends wait for a log that is whole again
        folder = self.folder / session_id
        new_folder = not folder.exists()
        folder.mkdir(mode=0o700, exist_ok=True)
        salt = os.urandom(SALT_SIZE)
        cipher = file_cipher(self.key, salt, session_id)
        path = folder / COMPACTING_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, MAGIC + salt + seal(cipher, 0, snapshot))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(path, folder / LOG_NAME)
        _fsync_folder(folder)
        if new_folder:
            _fsync_folder(self.folder)
        self._logs[session_id] = _OpenLog(cipher, 1)
        self.failed.discard(session_id)

    def _remove(self, session_id: str, _: bytes = b"") -> None:
        self._logs.pop(session_id, None)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.folder / session_id)


def encode_record(record: Record) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def _is_session_id(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
