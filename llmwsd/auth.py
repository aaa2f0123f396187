"""Access tokens for the public port: stored hashed, compared in constant time.

A token file is JSON, mode 0600, written atomically: a list of entries with a
name, a random salt and SHA-256(salt + token). Tokens carry 256 random bits,
so a salted fast hash is enough (a slow KDF protects guessable passwords, not
random keys). The plain token is shown once, when it is made. Verification
hashes the presented token with every entry's salt and compares all of them
with :func:`hmac.compare_digest`, so the time taken does not tell which entry,
or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmwsd.errors import BadRequest, ConfigError, NotFound

TOKEN_PREFIX = "llmws_"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


@dataclass(frozen=True)
class TokenEntry:
    id: str
    name: str
    salt: str
    digest: str
    created: float
    admin: bool = False

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the salt and the digest."""
        return {"id": self.id, "name": self.name, "created": self.created, "admin": self.admin}


def _digest(salt: str, token: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    """The tokens in one file; an empty path means this kind of token is not used."""

    def __init__(self, path: str | Path, admin: bool = False) -> None:
        self.path = Path(path) if path else None
        self.admin = admin
        self.entries: list[TokenEntry] = []
        # add and revoke fsync, so they run in worker threads (never on the event loop):
        # one at a time, each swapping in a new list once it is on disk, so that verify
        # on the loop reads one list or the other, never a half-changed one.
        self._writing = threading.Lock()
        self.load()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            self.entries = []
            return
        try:
            data = json.loads(self.path.read_text())
            self.entries = [TokenEntry(**entry) for entry in data["tokens"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.path}: unreadable token file: {e}") from None

    def _save(self, entries: list[TokenEntry]) -> None:
        """Write ``entries`` to the file and make them the store's (blocks: fsync)."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokens.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"tokens": [asdict(e) for e in entries]}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.entries = entries

    def off(self) -> BadRequest:
        """The error for managing tokens of a kind that is not used (no file configured)."""
        kind = "admin_tokens_file" if self.admin else "tokens_file"
        return BadRequest(f"tokens are off: set [api] {kind} in the configuration first")

    def add(self, name: str) -> tuple[TokenEntry, str]:
        """Make a token called ``name``; return its entry and the plain token (shown once).

        Blocks on the disk: call it in a worker thread.
        """
        if self.path is None:
            raise self.off()
        if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
            raise BadRequest("a token name is 1-64 letters, digits, '.', '_', '@' or '-'")
        with self._writing:
            if any(e.name == name for e in self.entries):
                raise BadRequest(f"a token called {name!r} exists already")
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            salt = secrets.token_hex(16)
            entry = TokenEntry(
                secrets.token_hex(4), name, salt, _digest(salt, token), time.time(), self.admin
            )
            self._save([*self.entries, entry])
        return entry, token

    def revoke(self, name_or_id: str) -> TokenEntry:
        """Remove the token called (or with the id) ``name_or_id``; blocks like :meth:`add`."""
        with self._writing:
            for entry in self.entries:
                if name_or_id in (entry.name, entry.id):
                    self._save([e for e in self.entries if e is not entry])
                    return entry
        raise NotFound(f"no token called {name_or_id!r}")

    def verify(self, token: str) -> TokenEntry | None:
        """The entry ``token`` belongs to, or None; every entry is compared every time."""
        found = None
        for entry in self.entries:
            if hmac.compare_digest(_digest(entry.salt, token), entry.digest):
                found = entry
        return found


class FailureLimiter:
    """At most ``limit`` failed attempts per address within ``window`` seconds."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float]:
        failures = self._failures.get(address, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            self._failures.pop(address, None)
        return failures

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        now = time.monotonic()
        failures = self._recent(address, now)
        if self.limit and len(failures) >= self.limit:
            return round(failures[0] + self.window - now, 1)
        return 0.0

    def failed(self, address: str) -> None:
        now = time.monotonic()
        failures = self._recent(address, now)
        failures.append(now)
        self._failures[address] = failures


@dataclass(frozen=True)
class Identity:
    """Who a connection is: the token entry it presented (None when tokens are off)."""

    token: TokenEntry | None = None

    @property
    def token_id(self) -> str | None:
        return self.token.id if self.token else None

    @property
    def admin(self) -> bool:
        return self.token is not None and self.token.admin


class Authenticator:
    """Checks tokens against the access and admin token files."""

    def __init__(self, tokens_file: str, admin_tokens_file: str, max_failures: int) -> None:
        self.access = TokenStore(tokens_file)
        self.admin = TokenStore(admin_tokens_file, admin=True)
        self.limiter = FailureLimiter(max_failures)

    @property
    def required(self) -> bool:
        return self.access.enabled

    def reload(self) -> None:
        self.access.load()
        self.admin.load()

    def identify(self, token: str | None) -> Identity | None:
        """The identity ``token`` proves; None when it proves nothing that is required."""
        entry = None
        if isinstance(token, str) and token:
            entry = self.admin.verify(token) or self.access.verify(token)
        if entry is None and self.required:
            return None
        return Identity(entry)

    def store(self, admin: bool) -> TokenStore:
        return self.admin if admin else self.access
