"""llmwsd.protocol.wire's parsing, exactly: what a client sends, what it is told back.

Written against the mutants `make mutate` found alive (docs/testing.md): each test is a
behaviour a client relies on.
"""

from __future__ import annotations

import json
import math

import pytest

from llmwsd.errors import BadRequest, InvalidJSON
from llmwsd.protocol.wire import (
    decode_message,
    encode_message,
    is_legacy_end_frame,
    parse_legacy_prompt,
    parse_prompt,
    parse_seq,
    parse_session_id,
)


def refused(call, *args) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        call(*args)
    return caught.value


def test_a_legacy_frame_without_tags_is_all_user_text():
    assert parse_legacy_prompt("  hello there \n") == {"system": "", "user": "hello there"}


def test_a_legacy_frame_with_unknown_tags_keeps_its_text_without_them():
    assert parse_legacy_prompt("<|assistant|>hi <|foo|>there") == {
        "system": "",
        "user": "hi there",
    }


@pytest.mark.parametrize(
    ("frame", "ends"),
    [
        ("<|end|>", True),
        ("  <|end|>\n", True),
        ("<|endoftext|>", True),
        ("<|user|>", False),
        ("end", False),
        ("<|user|>the end<|end|>", False),
    ],
)
def test_only_a_lone_end_tag_ends_a_text_client(frame, ends):
    assert is_legacy_end_frame(frame) is ends


def test_what_a_bad_frame_is_told():
    binary = refused(decode_message, b"{}")
    assert binary.code == "bad_request"
    assert binary.message == "binary frames are not supported: send JSON text"
    array = refused(decode_message, "[1, 2]")
    assert array.code == "bad_request" and array.message == "a message must be a JSON object"
    broken = refused(decode_message, "{nope")
    assert isinstance(broken, InvalidJSON) and broken.message.startswith("invalid JSON: ")


def test_a_lone_surrogate_is_refused_and_a_valid_pair_is_not():
    lone = refused(decode_message, '{"type": "inference", "prompt": "a\\ud800b"}')
    assert lone.code == "bad_request"
    assert lone.message == "invalid text: a lone surrogate escape (\\ud800-\\udfff)"
    # A pair written as two escapes is one valid character, an escaped backslash is no escape.
    assert decode_message('{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}
    assert decode_message('{"prompt": "\\\\ud800"}') == {"prompt": "\\ud800"}


def test_messages_are_compact_utf8_json_and_never_nan():
    assert encode_message({"type": "token", "data": "é ✓", "seq": 1}) == (
        '{"type":"token","data":"é ✓","seq":1}'
    )
    with pytest.raises(ValueError):
        encode_message({"value": math.nan})
    with pytest.raises(ValueError):
        encode_message({"value": math.inf})


def test_what_a_bad_session_id_is_told():
    short = refused(parse_session_id, "123")
    assert short.message == (
        "session_id must be a UUID such as 123e4567-e89b-12d3-a456-426614174000"
    )
    not_hex = refused(parse_session_id, "z" * 36)
    assert not_hex.message == "session_id must be a UUID"
    value = "123E4567-E89B-12D3-A456-426614174000"
    assert parse_session_id(value) == value.lower()


def test_seqs_are_the_integers_json_numbers_hold_exactly():
    assert parse_seq(None) is None
    assert parse_seq(0) == 0
    assert parse_seq(2**53 - 1) == 2**53 - 1
    for bad in (-1, 2**53, True, 1.0, "3"):
        error = refused(parse_seq, bad)
        assert error.message == "last_seq must be a non-negative integer", bad
    assert refused(parse_seq, -1, "seq").message == "seq must be a non-negative integer"


def test_a_prompt_object_without_a_system_text_has_an_empty_one():
    assert parse_prompt({"user": "hi"}) == {"system": "", "user": "hi"}
    assert parse_prompt({"user": "hi", "system": None}) == {"system": "", "user": "hi"}
    assert parse_prompt({"user": "hi", "system": "be brief"}) == {
        "system": "be brief",
        "user": "hi",
    }


def test_what_a_bad_prompt_is_told():
    assert refused(parse_prompt, {"system": "x"}).message == "prompt.user must be a string"
    assert refused(parse_prompt, {"user": "u", "system": 3}).message == (
        "prompt.system must be a string"
    )
    assert refused(parse_prompt, 7).message == (
        'inference needs a prompt: {"system": "...", "user": "..."} or a string'
    )
    assert refused(parse_prompt, {"user": "  \n"}).message == "the prompt's user text is empty"
    assert refused(parse_prompt, "<|system|>only a system<|end|>").message == (
        "the prompt's user text is empty"
    )


def test_error_messages_survive_a_round_trip_as_json():
    error = refused(parse_prompt, {"user": ""})
    assert json.loads(encode_message(error.to_message())) == {
        "type": "error",
        "code": "bad_request",
        "message": "the prompt's user text is empty",
    }
