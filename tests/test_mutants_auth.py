"""llmwsd.auth's token files: what an operator makes, sees and is told.

Written against the mutants `make mutate` found alive (docs/testing.md).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from llmwsd import auth
from llmwsd.errors import BadRequest, ConfigError, NotFound
from tests.conftest import Clock


def test_tokens_made_have_their_documented_shape(tmp_path: Path):
    store = auth.TokenStore(tmp_path / "tokens.json")
    before = time.time()
    entry, token = store.add("alice")
    assert re.fullmatch(r"llmws_[A-Za-z0-9_-]{43}", token)  # 32 bytes, base64url
    assert re.fullmatch(r"[0-9a-f]{8}", entry.id)
    assert before <= entry.created <= time.time()
    assert entry.public() == {
        "id": entry.id,
        "name": "alice",
        "created": entry.created,
        "admin": False,
    }
    assert store.verify(token) == entry


def test_a_token_with_a_lone_surrogate_is_refused_not_a_crash(tmp_path: Path):
    store = auth.TokenStore(tmp_path / "tokens.json")
    store.add("alice")
    assert store.verify("llmws_\ud800") is None


def test_the_token_file_folder_is_made_when_missing(tmp_path: Path):
    path = tmp_path / "state" / "api" / "tokens.json"
    store = auth.TokenStore(path)
    _, token = store.add("alice")
    assert auth.TokenStore(path).verify(token) is not None


def test_the_token_file_is_replaced_from_beside_it(tmp_path: Path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(auth.os, "replace", replace)
    auth.TokenStore(tmp_path / "tokens.json").add("alice")
    [(src, dst)] = replaced
    assert src.parent == dst.parent == tmp_path  # one filesystem: the rename is atomic


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path: Path, monkeypatch):
    store = auth.TokenStore(tmp_path / "tokens.json")
    _, token = store.add("alice")
    before = (tmp_path / "tokens.json").read_text()

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(auth.os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        store.add("bob")
    assert (tmp_path / "tokens.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json"]
    assert auth.TokenStore(tmp_path / "tokens.json").verify(token) is not None


def test_what_the_operator_is_told(tmp_path: Path):
    with pytest.raises(BadRequest) as off:
        auth.TokenStore("").add("alice")
    assert off.value.message == "tokens are off: set [api] tokens_file in the configuration first"
    with pytest.raises(BadRequest) as admin_off:
        auth.TokenStore("", admin=True).add("alice")
    assert admin_off.value.message == (
        "tokens are off: set [api] admin_tokens_file in the configuration first"
    )
    store = auth.TokenStore(tmp_path / "tokens.json")
    with pytest.raises(BadRequest) as bad:
        store.add("a b")
    assert bad.value.message == "a token name is 1-64 letters, digits, '.', '_', '@' or '-'"
    store.add("alice")
    with pytest.raises(BadRequest) as twice:
        store.add("alice")
    assert twice.value.message == "a token called 'alice' exists already"
    with pytest.raises(NotFound) as missing:
        store.revoke("bob")
    assert missing.value.message == "no token called 'bob'"


def test_a_token_name_may_have_64_characters(tmp_path: Path):
    store = auth.TokenStore(tmp_path / "tokens.json")
    entry, _ = store.add("a" * 64)
    assert entry.name == "a" * 64


def test_each_kind_of_token_has_its_own_store(tmp_path: Path):
    authenticator = auth.Authenticator(
        str(tmp_path / "tokens.json"), str(tmp_path / "admin.json"), 3
    )
    assert authenticator.store(admin=False) is authenticator.access
    assert authenticator.store(admin=True) is authenticator.admin
    _, token = authenticator.store(admin=False).add("alice")
    identity = authenticator.identify(token)
    assert identity is not None and not identity.admin


def test_an_unreadable_token_file_is_named_in_the_error(tmp_path: Path):
    path = tmp_path / "tokens.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError) as bad:
        auth.TokenStore(path)
    assert bad.value.message.startswith(f"{path}: unreadable token file: ")


def test_failed_attempts_count_for_exactly_the_window(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("llmwsd.auth.time", clock)
    limiter = auth.FailureLimiter(limit=2, window=60.0)
    limiter.failed("a")
    clock.now += 10
    limiter.failed("a")
    clock.now += 10.53
    assert limiter.retry_after("a") == 39.5  # until the oldest is a window old, in tenths
    assert limiter.retry_after("b") == 0.0
    clock.now = 1060.0  # the first failure is a window old: it no longer counts
    assert limiter.retry_after("a") == 0.0
    limiter.failed("a")  # locked again by the second and this one, until the second expires
    assert limiter.retry_after("a") == 10.0
    clock.now = 1120.0
    assert limiter.retry_after("a") == 0.0
    assert limiter._failures == {}  # an address with no recent failures is forgotten
