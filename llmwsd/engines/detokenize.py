"""Token ids to streamed text: incremental detokenization and stop strings.

Decoding one token at a time loses spaces (SentencePiece-style tokenizers drop a
leading space at the start of a decoded sequence) and splits UTF-8 characters
that span several byte-level tokens. :class:`IncrementalDetokenizer` decodes a
short window that starts at an already emitted character boundary and emits the
difference, holding back while the text ends in U+FFFD (an incomplete
character). Joining everything it returns, plus :meth:`flush`, equals
``tokenizer.decode(ids, skip_special_tokens=True)``: the approach of TGI and vLLM.

:class:`StopStringFilter` then holds back text that might be the start of a stop
string, so a stop string is never emitted, even across tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids, pushed one by one, into text chunks."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # ids[prefix_offset:read_offset] were emitted already; both are character boundaries.
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def _pending_text(self) -> str:
        window = self._ids[self._prefix_offset :]
        prefix = self._decode(window[: self._read_offset - self._prefix_offset])
        return self._decode(window)[len(prefix) :]

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        text = self._pending_text()
        if not text or text.endswith(REPLACEMENT_CHARACTER):
            return ""  # nothing visible yet, or an incomplete UTF-8 character: wait
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text

    def flush(self) -> str:
        """The text held back at the end (an incomplete character decodes as U+FFFD)."""
        text = self._pending_text()
        self._prefix_offset = self._read_offset = len(self._ids)
        return text


class StopStringFilter:
    """Cuts a text stream before the first stop string; never emits any part of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return (text safe to emit, whether a stop string was found)."""
        held = self._held + text
        found = [i for i in (held.find(s) for s in self._stops) if i >= 0]
        if found:
            self._held = ""
            return held[: min(found)], True
        keep = self._partial_stop_length(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        """The text held back at the end of the stream (it never became a stop string)."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start of some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class AnswerText:
    """An answer's text as its tokens come: detokenized, with its stop strings cut.

    What both engines stream: :meth:`push` gives each token's text (``stopped``
    tells when a stop string ended the answer), :meth:`flush` what was held back
    at its end.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringFilter(stops) if stops else None
        self.stopped = False

    def push(self, token_id: int) -> str:
        text = self._detokenizer.push(token_id)
        if self._stops is not None and text:
            text, self.stopped = self._stops.push(text)
        return text

    def flush(self) -> str:
        text = self._detokenizer.flush()
        if self._stops is not None:
            text, stopped = self._stops.push(text)
            if not stopped:
                text += self._stops.flush()
        return text
