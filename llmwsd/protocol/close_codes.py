"""The WebSocket close codes llmwsd sends, each defined once (docs/protocol.md, "Close codes").

An :class:`~enum.IntEnum`, so a code compares equal to the number a socket library reports.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    # RFC 6455
    NORMAL = 1000  # text mode: the answer is complete; JSON mode: idle
    GOING_AWAY = 1001  # the daemon is stopping (websockets sends it when the server closes)
    INVALID_DATA = 1007  # a frame that is not valid UTF-8
    POLICY = 1008  # no first frame in time, no valid token, an empty text-mode prompt
    TOO_BIG = 1009  # a frame over [server] max_message_size (websockets sends it)
    INTERNAL_ERROR = 1011  # a bug, or no answer to the server's pings
    TRY_AGAIN_LATER = 1013  # no session slot, or text mode without a model
    # llmws's own (4000-4999 is for applications)
    TAKEN_OVER = 4000  # the session was taken over by another connection
    SESSION_DROPPED = 4001  # the operator dropped the session (llmwsctl sessions drop)
