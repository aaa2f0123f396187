"""``llmwsctl chat``: talk to llmwsd's model from a terminal, interactively or one-shot.

The original LLMWS ``python llm.py`` client's features: streaming answers, readline line
editing and history, slash commands, resuming a session with ``--session``. It
speaks the public WebSocket protocol through :class:`~llmwsctl.sync_client.SyncClient`,
so it works from any machine that can reach the port, and a dropped connection
is resumed without losing the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmwsctl import format as fmt
from llmwsctl.client import DEFAULT_URL
from llmwsctl.render import render_resources
from llmwsctl.sync_client import SyncClient
from llmwsd.errors import BadRequest, LLMWSError
from llmwsd.protocol import messages

try:
    import readline
except ImportError:  # not on every platform: input() still works, without editing
    readline = None  # type: ignore[assignment]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EPILOG = """\
interactive commands:
  /config KEY=VALUE ...   change generation settings (temperature, max_new_tokens, top_p,
                          top_k, repetition_penalty, do_sample, stop, seed); alone: show them
  /system TEXT            set the system prompt for the next questions; alone: show it
  /resources              show the server's device and memory figures
  /models                 list the server's models
  /switch NAME            switch the server to another model (when the server allows it)
  /download REPO DIR      download a model (when the server allows it)
  /session                show the session id (resume later with --session ID)
  /history                show the conversation
  /reset                  forget the conversation
  /help                   this list
  /quit                   leave (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C during an answer stops it.

examples:
  llmwsctl chat
  llmwsctl chat ws://gpu-box:8765 --system "You are terse"
  llmwsctl chat --prompt "What is the capital of France?" --temperature 0
  echo "Summarize: ..." | llmwsctl chat --max-tokens 200 > summary.txt
  llmwsctl chat --session 123e4567-e89b-12d3-a456-426614174000"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "chat",
        help="chat with the model over the WebSocket API",
        description="Chat with llmwsd's model: interactively, or one question with --prompt "
        "or on standard input (the answer goes to stdout, the session id to stderr).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url",
        nargs="?",
        metavar="URL",
        help=f"llmwsd's address, ws://HOST:PORT or HOST:PORT (default: $LLMWS_URL or "
        f"{DEFAULT_URL})",
    )
    parser.add_argument("-p", "--prompt", metavar="TEXT", help="ask one question and exit")
    parser.add_argument(
        "--session",
        metavar="ID",
        help="resume this session (--temperature and --max-tokens leave its settings as they are)",
    )
    parser.add_argument(
        "--system", metavar="TEXT", default="", help="the system prompt, for this run's questions"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="0 answers greedily; for this run's answers only (the session's settings "
        "change only with /config)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="the longest answer, in tokens; for this run's answers only (the session's "
        "settings change only with /config)",
    )
    parser.add_argument(
        "--token", metavar="TOKEN", help="access token, if the server needs one ($LLMWS_TOKEN)"
    )
    parser.add_argument(
        "--resume-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to keep trying to resume a dropped connection (default: 60)",
    )
    # SUPPRESS: `llmwsctl --json chat` sets it on the main parser; do not overwrite it.
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="one-shot: print the answer's events as JSON lines",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    one_shot = args.prompt is not None or not sys.stdin.isatty()
    client = SyncClient(args.url, args.token, resume_timeout=args.resume_timeout)
    try:
        try:
            welcome = client.connect(args.session)
        except LLMWSError as e:
            report(e, args)
            return EXIT_FAILED
        if args.session and not welcome.get("resumed"):
            print(f"session {args.session} is gone: starting a new one", file=sys.stderr)
        # The options go with each answer of this run (the inference's `config`), never
        # into the session: only /config (a `config` message) changes the session.
        overrides = settings_from_args(args)
        if one_shot:
            return ask_once(client, args, overrides)
        return Chat(client, args.system, overrides).loop(welcome)
    finally:
        client.close()


def report(error: LLMWSError, args: argparse.Namespace) -> None:
    """A failure on stderr, as every llmwsctl command reports it (JSON with --json)."""
    fmt.error(
        error.message, error.code, getattr(args, "json", False), "llmwsctl chat: ", **error.details
    )


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args.temperature is not None:
        settings["temperature"] = args.temperature
    if args.max_tokens is not None:
        settings["max_new_tokens"] = args.max_tokens
    return with_sampling_switch(settings)


def with_sampling_switch(settings: dict[str, Any]) -> dict[str, Any]:
    """Temperature 0 means greedy to a user; the server wants do_sample to say so."""
    temperature = settings.get("temperature")
    if isinstance(temperature, int | float) and "do_sample" not in settings:
        return {**settings, "do_sample": temperature > 0}
    return settings


def ask_once(
    client: SyncClient, args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> int:
    print(f"session {client.session_id}", file=sys.stderr)
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if not text.strip():
        report(BadRequest("nothing to ask: give --prompt TEXT or text on stdin"), args)
        return EXIT_USAGE
    try:
        finish = stream_answer(
            client, text, args.system, as_json=getattr(args, "json", False), **(overrides or {})
        )
    except LLMWSError as e:
        report(e, args)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if finish == "cancelled" else EXIT_OK


def stream_answer(
    client: SyncClient, text: str, system: str, as_json: bool = False, **settings: Any
) -> str:
    """Print one answer as it comes; return its finish reason. Ctrl-C cancels the answer.

    ``settings`` apply to this answer only. A second Ctrl-C stops waiting for
    it. A server error raises (after it is printed, with ``as_json``).
    """
    events = client.events(text, system, **settings)
    cancelling = False
    finish = ""
    try:
        while True:
            # Ctrl-C may come while waiting for an event or while printing one.
            try:
                received = next(events)
                event = messages.parse_server_message(received)
                if as_json:
                    print(json.dumps(received, ensure_ascii=False), flush=True)
                elif isinstance(event, messages.Token):
                    sys.stdout.write(event.data)
                    sys.stdout.flush()
            except StopIteration:
                break
            except KeyboardInterrupt:
                if cancelling:
                    events.close()
                    raise
                cancelling = True
                client.cancel()  # the answer ends with finish_reason "cancelled"
                continue
            if isinstance(event, messages.Error):
                raise event.exception()
            if isinstance(event, messages.Done):
                finish = event.finish_reason
    finally:
        if not as_json:
            sys.stdout.write("\n")
            sys.stdout.flush()
    if finish == "cancelled":
        print("[cancelled]", file=sys.stderr)
    return finish


def parse_value(text: str) -> Any:
    """``0.8`` → 0.8, ``true`` → True, ``["a"]`` → list; anything else stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "llmws" / "chat_history"


class Chat:
    """The interactive loop: questions are streamed, lines starting with / are commands."""

    def __init__(
        self, client: SyncClient, system: str = "", overrides: dict[str, Any] | None = None
    ) -> None:
        self.client = client
        self.system = system
        # Settings of the command line, sent with every answer of this run (not stored in
        # the session); a /config of the same setting supersedes them.
        self.overrides = dict(overrides or {})
        self.commands: dict[str, Callable[[str], bool]] = {
            "/config": self.do_config,
            "/system": self.do_system,
            "/resources": self.do_resources,
            "/models": self.do_models,
            "/switch": self.do_switch,
            "/download": self.do_download,
            "/session": self.do_session,
            "/history": self.do_history,
            "/reset": self.do_reset,
            "/help": self.do_help,
            "/quit": self.do_quit,
            "/exit": self.do_quit,
        }

    def loop(self, welcome: dict[str, Any]) -> int:
        model = welcome.get("model") or "no model loaded"
        print(f"Connected to {self.client.client.url}: {model}")
        print(f"Session {self.client.session_id}")
        print("Type /help for commands; Ctrl-C stops an answer, Ctrl-D quits.")
        self.load_history()
        try:
            while True:
                try:
                    line = input("> ").strip()
                except (EOFError, KeyboardInterrupt):
                    print()
                    return EXIT_OK
                if line and not self.handle(line):
                    return EXIT_OK
        finally:
            self.save_history()

    def handle(self, line: str) -> bool:
        """Run one line; False means leave."""
        try:
            if line.startswith("/"):
                name, _, rest = line.partition(" ")
                command = self.commands.get(name)
                if command is None:
                    raise BadRequest(f"unknown command {name}: /help lists them")
                return command(rest.strip())
            stream_answer(self.client, line, self.system, **self.overrides)
        except LLMWSError as e:
            print(f"error: {e.message}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        return True

    # -- history (readline) ----------------------------------------------------------

    def load_history(self) -> None:
        if readline is None:
            return
        readline.set_history_length(1000)
        with contextlib.suppress(FileNotFoundError):
            readline.read_history_file(history_path())

    def save_history(self) -> None:
        if readline is None:
            return
        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as e:
            print(f"could not save the line history to {path}: {e}", file=sys.stderr)

    # -- commands: each takes the rest of the line, returns False to leave -------------

    def do_config(self, rest: str) -> bool:
        settings: dict[str, Any] = {}
        for pair in rest.split():
            key, sep, value = pair.partition("=")
            if not sep:
                raise BadRequest(f"expected KEY=VALUE, got {pair!r}")
            settings[key] = parse_value(value)
        settings = with_sampling_switch(settings)
        merged = self.client.set_config(**settings)
        for key in settings:  # the session's new value is the one asked for now
            self.overrides.pop(key, None)
        print(fmt.fields(sorted(merged.items())))
        if self.overrides:
            options = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(self.overrides.items()))
            print(f"(this run's answers use {options} from the command line)")
        return True

    def do_system(self, rest: str) -> bool:
        if rest:
            self.system = rest
            print("system prompt set for the next questions")
        else:
            print(self.system or "(no system prompt)")
        return True

    def do_resources(self, rest: str) -> bool:
        print(render_resources(self.client.get_resources()))
        return True

    def do_models(self, rest: str) -> bool:
        entries = self.client.list_models()
        if not entries:
            print("no models on the server")
            return True
        rows = [
            ["*" if e.get("loaded") else "", e.get("name"), fmt.size(e.get("size_bytes"))]
            for e in entries
        ]
        print(fmt.table(["", "NAME", "SIZE"], rows, right=(2,)))
        return True

    def do_switch(self, rest: str) -> bool:
        if not rest:
            raise BadRequest("usage: /switch NAME (a name from /models, or a folder path)")
        reply = self.client.switch_model(rest)
        print(f"switched to {reply.get('model', rest)}")
        return True

    def do_download(self, rest: str) -> bool:
        parts = rest.split()
        if len(parts) != 2:
            raise BadRequest("usage: /download REPO DIR (REPO: org/name or a URL)")
        progress = fmt.ProgressPrinter()
        try:
            self.client.download_model(parts[0], parts[1], on_progress=progress)
        finally:
            progress.finish()
        print(f"downloaded {parts[0]} into {parts[1]}")
        return True

    def do_session(self, rest: str) -> bool:
        print(self.client.session_id)
        return True

    def do_history(self, rest: str) -> bool:
        messages = self.client.history()
        for message in messages:
            print(f"{message['role']}: {message['content']}")
        if not messages:
            print("(no messages yet)")
        return True

    def do_reset(self, rest: str) -> bool:
        self.client.reset()
        print("conversation cleared")
        return True

    def do_help(self, rest: str) -> bool:
        print(EPILOG.split("\n\nexamples:")[0])
        return True

    def do_quit(self, rest: str) -> bool:
        return False
