"""The registry of sessions: create, get, drop, the caps and expiry, and their logs.

:class:`SessionStore` holds every :class:`~llmwsd.sessions.session.Session` by
id, evicts the longest idle one when a cap is reached, sweeps the expired ones,
and appends each session's records to its log (compacting it when it is mostly
garbage); at start it rebuilds the stored sessions from their logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from llmwsd.config import SessionsConfig
from llmwsd.errors import Busy, NotFound
from llmwsd.sessions.files import SessionFiles
from llmwsd.sessions.session import Session, client_of
from llmwsd.sessions.store import Record, SessionLogs
from llmwsd.settings import GenerationSettings

log = logging.getLogger("llmwsd.sessions")

# A log is compacted once it has this many records and more than half are garbage.
COMPACT_MIN_RECORDS = 64


class SessionStore:
    """All sessions by id, their limits and expiry; persisted under ``state_dir`` when given.

    The logs are kept by ``logs`` (any :class:`SessionLogs`), by default the
    encrypted files under ``state_dir``; with neither, sessions live in memory only.
    ``list``, ``get`` and ``drop`` are what the admin channel uses.
    """

    def __init__(
        self,
        default_settings: GenerationSettings,
        config: SessionsConfig | None = None,
        state_dir: Path | None = None,
        *,
        logs: SessionLogs | None = None,
    ) -> None:
        self.default_settings = default_settings
        self.config = config or SessionsConfig()
        if logs is None and state_dir is not None:
            logs = SessionFiles(state_dir)
        self.logs = logs
        self._sessions: dict[str, Session] = {}
        self._records_in_log: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Load the stored sessions, end the generations a stop cut off, start the sweeper."""
        if self.logs is not None:
            loaded = await asyncio.to_thread(self._load, self.logs)
            deadline = time.time() - self.config.idle_ttl
            kept = [s for s in loaded if s.last_active >= deadline]
            for session in loaded:
                if session.last_active < deadline:  # expired while the daemon was down
                    self.logs.remove(session.id)
            for session in kept:
                self._sessions[session.id] = session
            for session in kept:
                session.end_interrupted()
            log.info(
                "%d stored sessions loaded from %s (%d expired)",
                len(kept),
                self.logs.location,
                len(loaded) - len(kept),
            )
        self.sweep()
        self._sweeper = asyncio.create_task(self._sweep_periodically())

    def _load(self, logs: SessionLogs) -> list[Session]:
        """Rebuild every stored session from its records (blocking: runs in a thread)."""
        sessions = []
        for session_id, records in logs.load():
            session = Session(self, session_id, self.default_settings)
            try:
                for record in records:
                    session.apply(record)
            except Exception:
                log.error("session %s: its log does not replay; skipped", session_id, exc_info=True)
                continue
            self._records_in_log[session_id] = len(records)
            sessions.append(session)
        return sessions

    async def close(self) -> None:
        """Stop sweeping and write out everything recorded."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.logs is not None:
            await asyncio.to_thread(self.logs.close)

    # -- the sessions -----------------------------------------------------------------

    def create(self, token_id: str | None = None, address: str | None = None) -> Session:
        """A new session; at a cap, the longest idle one under it makes room, or Busy.

        The caps: ``max_sessions`` in all, ``max_per_client`` per token (per address
        when tokens are off), so that one client cannot push out everyone else's.
        """
        if self.logs is not None and self.logs.out_of_room():
            log.warning("refusing a new session: %s is full", self.logs.location)
            raise Busy(
                "the server's state folder is full: no new session can be stored; try again later"
            )
        client = client_of(token_id, address)
        if client is not None:
            own = [s for s in self._sessions.values() if s.client == client]
            if len(own) >= self.config.max_per_client and not self._evict_one(own):
                raise Busy(
                    f"this client's {self.config.max_per_client} sessions are all in use "
                    "(connected or generating); try again later"
                )
        if len(self._sessions) >= self.config.max_sessions and not self._evict_one():
            raise Busy(
                f"all {self.config.max_sessions} sessions are in use (connected or generating); "
                "try again later"
            )
        session = Session(self, str(uuid.uuid4()), self.default_settings, token_id, address)
        self._sessions[session.id] = session
        self._write_snapshot(session)
        return session

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def list(self) -> list[Session]:
        return sorted(self._sessions.values(), key=lambda s: s.created_at)

    def drop(self, session_id: str) -> Session:
        """Forget a session, in memory and on disk; its running generation is cancelled."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"no session {session_id[:64]}")
        if session.running is not None:
            session.running.request_cancel()
        self._records_in_log.pop(session.id, None)
        if self.logs is not None:
            self.logs.remove(session.id)
        return session

    def _evict_one(self, among: Iterable[Session] | None = None) -> bool:
        sessions = self._sessions.values() if among is None else among
        idle = [s for s in sessions if s.owner is None and s.running is None]
        if not idle:
            return False
        oldest = min(idle, key=lambda s: s.last_active)
        log.info("session limit reached: dropping %s, idle for the longest", oldest.id)
        self.drop(oldest.id)
        return True

    def sweep(self) -> int:
        """Drop sessions idle beyond ``idle_ttl`` (and any beyond the cap); return how many."""
        deadline = time.time() - self.config.idle_ttl
        expired = [
            s
            for s in self._sessions.values()
            if s.owner is None and s.running is None and s.last_active < deadline
        ]
        for session in expired:
            self.drop(session.id)
        if expired:
            log.info("%d idle sessions expired", len(expired))
        while len(self._sessions) > self.config.max_sessions and self._evict_one():
            pass
        return len(expired)

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                self.sweep()
            except Exception:
                log.error("sweeping sessions failed", exc_info=True)

    # -- persistence ------------------------------------------------------------------

    def record(self, session: Session, record: Record) -> None:
        """Append ``record`` (a change ``session`` already applied) to the session's log.

        When the log holds mostly garbage (acknowledged events, cleared history) or
        its last write failed, the session is written anew as one snapshot instead.
        """
        if self.logs is None or self._sessions.get(session.id) is not session:
            return  # a dropped session's generation can still report in
        count = self._records_in_log.get(session.id, 0) + 1
        live = len(session.events) + len(session.messages) + 1
        if session.id in self.logs.failed or (count > COMPACT_MIN_RECORDS and count > 2 * live):
            self._write_snapshot(session)
            return
        self._records_in_log[session.id] = count
        durable = not (record["kind"] == "event" and record["event"]["type"] == "token")
        self.logs.append(session.id, record, durable)

    def _write_snapshot(self, session: Session) -> None:
        if self.logs is not None:
            self._records_in_log[session.id] = 1
            self.logs.rewrite(session.id, session.snapshot())
