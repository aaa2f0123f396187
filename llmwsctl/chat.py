"""``llmwsctl chat``: talk to the model from a terminal (a stub until the chat client lands)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_FAILED = 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "chat",
        help="chat with the loaded model (coming soon)",
        description="Chat with the loaded model from the terminal. Not available yet: "
        "use the web page on llmwsd's port meanwhile.",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    print(
        "llmwsctl chat is coming in a later release; meanwhile open llmwsd's web page "
        "(http://HOST:8765/) or use any WebSocket client.",
        file=sys.stderr,
    )
    return EXIT_FAILED
