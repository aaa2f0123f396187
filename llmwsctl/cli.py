"""llmwsctl: the operator's console for llmwsd, over its admin socket: its parser and main.

The commands are in :mod:`llmwsctl.commands`, the text they print in
:mod:`llmwsctl.render`, ``chat`` in :mod:`llmwsctl.chat`.

Exit codes: 0 done, 1 the command failed, 2 usage error, 3 llmwsd is not
running, 4 permission denied on the socket.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from llmwsctl import chat, commands
from llmwsctl import format as fmt
from llmwsctl.adminclient import DEV_SOCKET
from llmwsctl.commands import UsageError, exit_code, wants_json
from llmwsd import __version__
from llmwsd.errors import LLMWSError
from llmwsd.protocol import admin as adminproto

DESCRIPTION = """\
Manage a running llmwsd from the machine it runs on: see what it serves, switch
and remove models, watch resources, list and drop sessions, reload its
configuration. llmwsctl talks to the daemon's admin socket, which root and
members of the daemon's group (llmws) may use."""

EPILOG = """\
examples:
  llmwsctl status
  llmwsctl models
  llmwsctl switch SmolLM2-135M-Instruct
  llmwsctl resources --watch
  llmwsctl --json sessions | jq '.[].id'

exit codes: 0 done, 1 the command failed, 2 usage error, 3 llmwsd is not running,
4 permission denied on the socket."""

Command = Callable[[argparse.Namespace], int]


# -- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # The global options work before or after the command (`llmwsctl status --json`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"llmwsd's admin socket (default: ${adminproto.SOCKET_ENV}, else "
        f"{adminproto.DEFAULT_SOCKET}, else {DEV_SOCKET} of a `make run` daemon when run "
        "from its checkout)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the daemon's raw answer as JSON, for scripts",
    )
    parser = argparse.ArgumentParser(
        prog="llmwsctl",
        description=DESCRIPTION,
        epilog=EPILOG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # llmwsctl's own version (`llmwsctl version` asks the daemon for its own too).
    parser.add_argument("--version", action="version", version=f"llmwsctl {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, func: Command, help: str, description: str, under: Any = subcommands, **kw: Any
    ) -> Any:
        """A sub-command (of ``under``: a command's actions, such as ``sessions drop``)."""
        sub = under.add_parser(name, help=help, description=description, parents=[common], **kw)
        sub.set_defaults(func=func)
        return sub

    add(
        "status",
        commands.cmd_status,
        "version, uptime, model, sessions, queue and memory",
        "Show what llmwsd is doing: its version and uptime, the loaded model and its "
        "device, the sessions and the queue of generations, memory in use.",
    )
    add(
        "models",
        commands.cmd_models,
        "list the models in the model folders",
        "List every model in the model folders with its size, age, architecture and "
        "context length; the loaded one is marked with *.",
        aliases=["list", "ls"],
    )
    switch = add(
        "switch",
        commands.cmd_switch,
        "load another model and serve it",
        "Load MODEL and serve it instead of the current one. The current model keeps "
        "serving while the new one loads; if loading fails it stays, and the error is "
        "reported (exit 1).",
    )
    switch.add_argument("model", metavar="MODEL", help="a model name from `llmwsctl models`")
    pull = add(
        "pull",
        commands.cmd_pull,
        "download a model (Hugging Face org/name, git URL, local .gguf)",
        "Download a model into llmwsd's models folder, with progress (bytes, speed, ETA). "
        "The files go to a staging folder first; the model appears only once it is complete "
        "and its config and tokenizer load. Ctrl-C stops following, not the pull.",
    )
    pull.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="org/name or https://huggingface.co/org/name; any git URL (https://, ssh://, "
        "file://) or absolute path of a repository with git-lfs; an absolute path to a .gguf",
    )
    pull.add_argument("--name", metavar="NAME", help="the folder name to give the model")
    pull.add_argument("--revision", metavar="REV", help="a branch, tag or commit")
    pull.add_argument(
        "--detach", action="store_true", help="print the pull's id and return; it goes on"
    )
    pull.add_argument("--cancel", metavar="ID", help="stop the pull ID and remove its files")
    pulls = add(
        "pulls",
        commands.cmd_pulls,
        "list pulls: running, failed, interrupted by a restart",
        "List the pulls that are running, and those a failure or a restart left unfinished "
        "(pulling the same source again resumes them). --clean removes the unfinished ones.",
    )
    pulls.add_argument(
        "--clean", action="store_true", help="delete the files of every pull that is not running"
    )
    rm = add(
        "rm",
        commands.cmd_rm,
        "delete a downloaded model",
        "Delete a model that was downloaded into llmwsd's models folder. The loaded "
        "model and models in other folders are refused unless --force.",
    )
    rm.add_argument("model", metavar="MODEL", help="a model name from `llmwsctl models`")
    rm.add_argument(
        "--force",
        action="store_true",
        help="also the loaded model (switch to another first, or unload) and models "
        "outside llmwsd's models folder",
    )
    resources = add(
        "resources",
        commands.cmd_resources,
        "CPU, memory and GPU use, once or --watch",
        "Show the host's CPU and memory, llmwsd's own memory, the GPUs, the engine's "
        "load and what its prefix cache holds. With --watch, refresh in place until "
        "Ctrl-C (one JSON line per refresh with --json).",
    )
    resources.add_argument(
        "--watch",
        nargs="?",
        type=positive_seconds,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    sessions = add(
        "sessions",
        commands.cmd_sessions,
        "list sessions, or drop one (sessions drop ID)",
        "List the sessions with their age, idle time, messages, buffered events and "
        "whether a client is connected; `sessions drop ID` deletes one (its running "
        "generation is cancelled).",
    )
    actions = sessions.add_subparsers(dest="action", metavar="ACTION")
    drop = add(
        "drop",
        commands.cmd_session_drop,
        "delete a session and cancel its generation",
        "Delete the session ID (see `llmwsctl sessions`) and cancel its running "
        "generation; its client's next resume starts a new session.",
        under=actions,
    )
    drop.add_argument("id", metavar="ID", help="the session id")
    tokens = add(
        "tokens",
        commands.cmd_tokens,
        "list access tokens, or add / revoke one",
        "List the access tokens for the public port ([api] tokens_file) and the admin "
        "tokens ([api] admin_tokens_file); `tokens add NAME [--admin]` makes one and "
        "prints it once, `tokens revoke NAME` withdraws one at once. Only salted hashes "
        "are stored.",
    )
    token_actions = tokens.add_subparsers(dest="action", metavar="ACTION")
    token_add = add(
        "add",
        commands.cmd_token_add,
        "make a token and print it (once)",
        "Make a new token called NAME and print it; llmwsd keeps only a salted hash, so "
        "it cannot be shown again.",
        under=token_actions,
    )
    token_add.add_argument("name", metavar="NAME", help="who or what the token is for")
    token_add.add_argument(
        "--admin",
        action="store_true",
        help="an admin token: may also manage models over the public port, where "
        "[api] allow_model_management is true",
    )
    token_revoke = add(
        "revoke",
        commands.cmd_token_revoke,
        "withdraw a token",
        "Withdraw the token NAME (or its id); clients using it are refused from their "
        "next connection.",
        under=token_actions,
    )
    token_revoke.add_argument("name", metavar="NAME", help="the token's name or id")
    add(
        "reload",
        commands.cmd_reload,
        "re-read the configuration (like SIGHUP)",
        "Re-read llmwsd's configuration file and apply what can change while running "
        "(generation defaults, model folders); sections that need a restart are named.",
    )
    add(
        "version",
        commands.cmd_version,
        "the versions of llmwsctl and of the running llmwsd",
        "Print llmwsctl's version and, when it answers, the running llmwsd's; like "
        "status, exit 3 when llmwsd is not running.",
    )
    chat_parser = chat.add_parser(subcommands)
    chat_parser.formatter_class = LaidOutEpilogFormatter  # its description wraps like the others'
    chat_parser.set_defaults(func=chat.run)
    return parser


class LaidOutEpilogFormatter(argparse.HelpFormatter):
    """Wrap the description to the terminal, keep a laid-out text (one with line breaks) as is.

    ``chat`` has a table of its commands as its epilog; RawDescriptionHelpFormatter,
    which keeps that, also left its one-line description unwrapped.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError("SECONDS must be between 0.1 and 86400")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LLMWSError as e:
        # Every command's failures end here: the message on stderr (JSON with --json).
        prefix = f"llmwsctl {args.command}: error: " if isinstance(e, UsageError) else ""
        fmt.error(e.message, e.code, wants_json(args), prefix, **e.details)
        return exit_code(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
