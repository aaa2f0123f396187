"""Constrained decoding: an answer's format (OutputFormat) as a grammar over the model's tokens.

Both engines use xgrammar (vLLM's default structured-output backend), so a format
means the same on either: the transformers engine masks each constrained row's
logits with its matcher's token bitmask every step; the vLLM engine hands the
format to vLLM, which does the same inside its scheduler. Either way a format is
compiled here first, in a worker thread before admission, so that one the library
cannot compile is a ``bad_request`` before any token; compiled grammars are cached.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import xgrammar

from llmwsd.errors import BadRequest
from llmwsd.settings import OutputFormat

# Compiled grammars kept for reuse, per model; bounded, since clients choose the schemas.
GRAMMAR_CACHE_BYTES = 64 * 1024 * 1024


def json_schema_of(fmt: OutputFormat) -> str:
    """The schema a JSON format enforces: its own, or any object for ``json``."""
    return fmt.schema if fmt.type == "json_schema" else '{"type":"object"}'


class Grammars:
    """The formats compiled for one model's tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, end_token_ids: list[int]) -> None:
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=end_token_ids or None
        )
        self.end_token_ids = end_token_ids
        self.compiler = xgrammar.GrammarCompiler(
            self.info, max_threads=1, cache_enabled=True, cache_limit_bytes=GRAMMAR_CACHE_BYTES
        )
        self._lock = threading.Lock()  # worker threads check formats, the engine's uses them

    def compile(self, fmt: OutputFormat) -> xgrammar.CompiledGrammar:
        """``fmt`` compiled (from the cache after the first time); BadRequest naming why not."""
        with self._lock:
            return self._compile(fmt)

    def _compile(self, fmt: OutputFormat) -> xgrammar.CompiledGrammar:
        try:
            if fmt.type in ("json_schema", "json"):
                # Compact JSON: a small model let loose on optional whitespace can spend
                # its whole budget on newlines.
                return self.compiler.compile_json_schema(
                    json_schema_of(fmt), any_whitespace=False, strict_mode=True
                )
            if fmt.type == "regex":
                return self.compiler.compile_regex(fmt.pattern)
            rules = " | ".join(json.dumps(choice) for choice in fmt.choices)
            return self.compiler.compile_grammar(f"root ::= {rules}")
        except (RuntimeError, ValueError) as e:
            # xgrammar's message starts with a timestamp and its source file: keep the reason.
            reason = str(e).strip().rsplit(": ", 1)[-1] if ".cc:" in str(e) else str(e)
            raise BadRequest(
                f"format ({fmt.type}) cannot be enforced: {reason[:300]}", param="format"
            ) from None

    def matcher(self, fmt: OutputFormat) -> xgrammar.GrammarMatcher:
        """A new matcher for one answer (the engine thread's; compiled grammars are cached)."""
        return xgrammar.GrammarMatcher(self.compile(fmt), override_stop_tokens=self.end_token_ids)
