"""llmwsd.engines.detokenize with a byte-level stand-in tokenizer: no model needed.

Written against the mutants `make mutate` found alive (docs/testing.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from llmwsd.engines.detokenize import IncrementalDetokenizer, StopStringFilter

EOS = 256  # a special token: its text is "<eos>" unless special tokens are skipped


class ByteTokenizer:
    """Token i < 256 is byte i; EOS is special."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for i in ids:
            if i == EOS:
                if not skip_special_tokens:
                    out += b"<eos>"
            else:
                out.append(i)
        return out.decode("utf-8", errors="replace")


def test_special_tokens_never_reach_the_answer():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    chunks = [detokenizer.push(i) for i in [*b"hi", EOS, *b"!"]]
    assert "".join(chunks) + detokenizer.flush() == "hi!"


def test_text_after_a_flush_is_not_repeated():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    e_acute = "é".encode()
    assert detokenizer.push(ord("a")) == "a"
    assert detokenizer.push(e_acute[0]) == ""  # half a character: held back
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.flush() == ""
    assert detokenizer.push(ord("b")) == "b"
    assert detokenizer.push(ord("c")) == "c"


def test_nothing_is_held_after_a_stop_string():
    stops = StopStringFilter(["STOP"])
    assert stops.push("x ST") == ("x ", False)
    assert stops.push("OP and more") == ("", True)
    assert stops.flush() == ""


def test_text_after_a_flush_starts_afresh():
    stops = StopStringFilter(["END"])
    assert stops.push("aE") == ("a", False)
    assert stops.flush() == "E"
    assert stops.flush() == ""
    assert stops.push("z") == ("z", False)
