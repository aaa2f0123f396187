"""Where sessions persist: the interface the session store writes its logs through.

A session at rest is a log of records (JSON objects, see :meth:`Session.apply`):
its first record is a snapshot of the whole session, each later one a change.
:class:`llmwsd.sessions.files.SessionFiles` keeps them in encrypted files; a
store shared between replicas (Redis) is the next implementation.

What the event loop calls (``append``, ``rewrite``, ``remove``, ``failed``,
``out_of_room``) must not block: an implementation queues the work for a thread
of its own, in order. ``load`` and ``close`` block, and are called from a thread.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any, Protocol

Record = dict[str, Any]


class SessionLogs(Protocol):
    """The sessions' logs: read them all once, then append, rewrite and remove."""

    @property
    def location(self) -> str:
        """Where the logs are, for log lines."""
        ...

    @property
    def failed(self) -> Set[str]:
        """The sessions whose last write failed: their next change rewrites them whole."""
        ...

    def load(self) -> list[tuple[str, list[Record]]]:
        """Every readable session's id and records, then start taking writes (blocking).

        A record is encoded when it is handed over, so later changes to the
        session do not reach it.
        """
        ...

    def append(self, session_id: str, record: Record, durable: bool) -> None:
        """Add ``record`` to the session's log; ``durable``: it must survive a power loss."""
        ...

    def rewrite(self, session_id: str, snapshot: Record) -> None:
        """Replace the session's log (or start it) with the one record ``snapshot``."""
        ...

    def remove(self, session_id: str) -> None: ...

    def out_of_room(self) -> bool:
        """Whether a new session could not be stored (a full disk): cheap, for the loop."""
        ...

    def close(self) -> None:
        """Write out everything handed over, then stop (blocking)."""
        ...
