"""llmwsctl: the operator's console for llmwsd, over its admin socket.

Exit codes: 0 done, 1 the command failed, 2 usage error, 3 llmwsd is not
running, 4 permission denied on the socket.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from llmwsctl import chat, render
from llmwsctl import format as fmt
from llmwsctl.adminclient import (
    DEV_SOCKET,
    AdminClient,
    NotRunning,
    PermissionDenied,
    default_socket_path,
)
from llmwsd import __version__
from llmwsd.errors import LLMWSError
from llmwsd.protocol import admin as adminproto

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # argparse's own
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4

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


class UsageError(LLMWSError):
    """A command's arguments that argparse alone cannot check (exit 2)."""

    code = "usage"


# -- talking to the daemon ---------------------------------------------------------------


def socket_path(args: argparse.Namespace) -> str:
    return getattr(args, "socket", None) or default_socket_path()


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def call(
    args: argparse.Namespace,
    cmd: str,
    cmd_args: dict[str, Any] | None = None,
    long_running: bool = False,
) -> Any:
    """Run one admin command; long ones show their progress on stderr and wait unbounded."""
    with AdminClient.connect(socket_path(args)) as admin:
        if not long_running:
            return admin.call(cmd, cmd_args)
        progress = fmt.ProgressPrinter()
        try:
            return admin.call(cmd, cmd_args, on_progress=progress, timeout=None)
        finally:
            progress.finish()


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def show(args: argparse.Namespace, result: Any, as_text: Callable[[Any], str]) -> int:
    """Print ``result`` as JSON with --json, else as ``as_text`` (from :mod:`render`) puts it."""
    if wants_json(args):
        print_json(result)
    else:
        print(as_text(result))
    return EXIT_OK


# -- commands ----------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    return show(args, call(args, adminproto.STATUS), render.render_status)


def cmd_models(args: argparse.Namespace) -> int:
    return show(args, call(args, adminproto.MODELS), render.render_models)


def cmd_switch(args: argparse.Namespace) -> int:
    result = call(args, adminproto.SWITCH, {"model": args.model}, long_running=True)
    return show(args, result, render.render_switch)


def cmd_pull(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.cancel is None):
        raise UsageError("give either SOURCE or --cancel ID")
    if args.cancel is not None:
        cancelled = call(args, adminproto.PULL_CANCEL, {"id": args.cancel})
        return show(args, cancelled, render.render_pull_cancelled)
    cmd_args: dict[str, Any] = {"source": args.source, "detach": args.detach}
    for key in ("name", "revision"):
        if getattr(args, key) is not None:
            cmd_args[key] = getattr(args, key)
    if args.detach:
        return show(args, call(args, adminproto.PULL, cmd_args), render.render_pull_started)
    printer = fmt.ProgressPrinter()
    pull_id: list[str] = []

    def on_progress(progress: dict[str, Any]) -> None:
        pull_id[:] = [str(progress.get("id"))]
        printer(progress)

    with AdminClient.connect(socket_path(args)) as admin:
        try:
            result = admin.call(adminproto.PULL, cmd_args, on_progress=on_progress, timeout=None)
        except KeyboardInterrupt:
            printer.finish()
            which = pull_id[0] if pull_id else "ID"
            print(
                f"the pull goes on in llmwsd: `llmwsctl pulls` shows it, "
                f"`llmwsctl pull --cancel {which}` stops it",
                file=sys.stderr,
            )
            return 130
        finally:
            printer.finish()
    return show(args, result, render.render_pulled)


def cmd_pulls(args: argparse.Namespace) -> int:
    if args.clean:
        return show(args, call(args, adminproto.PULLS_CLEAN), render.render_pulls_cleaned)
    return show(args, call(args, adminproto.PULLS), render.render_pulls)


def cmd_rm(args: argparse.Namespace) -> int:
    cmd_args: dict[str, Any] = {"model": args.model, "force": args.force}
    result = call(args, adminproto.RM, cmd_args, long_running=args.force)
    return show(args, result, render.render_removed)


def cmd_resources(args: argparse.Namespace) -> int:
    if args.watch is None:
        return show(args, call(args, adminproto.RESOURCES), render.render_resources)
    # One connection for the whole watch; Ctrl-C ends it normally.
    tty = sys.stdout.isatty()
    with AdminClient.connect(socket_path(args)) as admin:
        try:
            while True:
                report = admin.call(adminproto.RESOURCES)
                if wants_json(args):
                    print(json.dumps(report, ensure_ascii=False))
                elif tty:
                    stamp = time.strftime("%H:%M:%S")
                    header = f"every {args.watch:g} s, {stamp} (Ctrl-C to stop)\n\n"
                    print("\x1b[H\x1b[2J" + header + render.render_resources(report))
                else:
                    print(render.render_resources(report) + "\n")
                sys.stdout.flush()
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return EXIT_OK


def cmd_sessions(args: argparse.Namespace) -> int:
    return show(args, call(args, adminproto.SESSIONS), render.render_sessions)


def cmd_session_drop(args: argparse.Namespace) -> int:
    result = call(args, adminproto.SESSION_DROP, {"id": args.id})
    return show(args, result, render.render_session_dropped)


def cmd_tokens(args: argparse.Namespace) -> int:
    return show(args, call(args, adminproto.TOKENS), render.render_tokens)


def cmd_token_add(args: argparse.Namespace) -> int:
    result = call(args, adminproto.TOKEN_ADD, {"name": args.name, "admin": args.admin})
    return show(args, result, render.render_token_added)


def cmd_token_revoke(args: argparse.Namespace) -> int:
    result = call(args, adminproto.TOKEN_REVOKE, {"name": args.name})
    return show(args, result, render.render_token_revoked)


def cmd_reload(args: argparse.Namespace) -> int:
    return show(args, call(args, adminproto.RELOAD), render.render_reload)


def cmd_version(args: argparse.Namespace) -> int:
    """llmwsctl's own version always; the daemon's when it answers, else its error's exit
    code (3 when it is not running, as for ``status``) after the versions are printed."""
    daemon: str | None = None
    failure: LLMWSError | None = None
    try:
        with AdminClient.connect(socket_path(args)) as admin:
            daemon = admin.server_version
    except LLMWSError as e:
        failure = e
    if wants_json(args):
        print_json(
            {
                "llmwsctl": __version__,
                "llmwsd": daemon,
                "admin_protocol": adminproto.ADMIN_PROTOCOL_VERSION,
            }
        )
    else:
        print(f"llmwsctl {__version__} (admin protocol {adminproto.ADMIN_PROTOCOL_VERSION})")
        print(f"llmwsd   {daemon}" if daemon else "llmwsd   unknown")
    if failure is not None:
        sys.stdout.flush()  # the versions first, then why the daemon's is unknown
        raise failure
    return EXIT_OK


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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, func: Command, help: str, description: str, under: Any = commands, **kw: Any
    ) -> Any:
        """A sub-command (of ``under``: a command's actions, such as ``sessions drop``)."""
        sub = under.add_parser(name, help=help, description=description, parents=[common], **kw)
        sub.set_defaults(func=func)
        return sub

    add(
        "status",
        cmd_status,
        "version, uptime, model, sessions, queue and memory",
        "Show what llmwsd is doing: its version and uptime, the loaded model and its "
        "device, the sessions and the queue of generations, memory in use.",
    )
    add(
        "models",
        cmd_models,
        "list the models in the model folders",
        "List every model in the model folders with its size, age, architecture and "
        "context length; the loaded one is marked with *.",
        aliases=["list", "ls"],
    )
    switch = add(
        "switch",
        cmd_switch,
        "load another model and serve it",
        "Load MODEL and serve it instead of the current one. The current model keeps "
        "serving while the new one loads; if loading fails it stays, and the error is "
        "reported (exit 1).",
    )
    switch.add_argument("model", metavar="MODEL", help="a model name from `llmwsctl models`")
    pull = add(
        "pull",
        cmd_pull,
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
        cmd_pulls,
        "list pulls: running, failed, interrupted by a restart",
        "List the pulls that are running, and those a failure or a restart left unfinished "
        "(pulling the same source again resumes them). --clean removes the unfinished ones.",
    )
    pulls.add_argument(
        "--clean", action="store_true", help="delete the files of every pull that is not running"
    )
    rm = add(
        "rm",
        cmd_rm,
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
        cmd_resources,
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
        cmd_sessions,
        "list sessions, or drop one (sessions drop ID)",
        "List the sessions with their age, idle time, messages, buffered events and "
        "whether a client is connected; `sessions drop ID` deletes one (its running "
        "generation is cancelled).",
    )
    actions = sessions.add_subparsers(dest="action", metavar="ACTION")
    drop = add(
        "drop",
        cmd_session_drop,
        "delete a session and cancel its generation",
        "Delete the session ID (see `llmwsctl sessions`) and cancel its running "
        "generation; its client's next resume starts a new session.",
        under=actions,
    )
    drop.add_argument("id", metavar="ID", help="the session id")
    tokens = add(
        "tokens",
        cmd_tokens,
        "list access tokens, or add / revoke one",
        "List the access tokens for the public port ([api] tokens_file) and the admin "
        "tokens ([api] admin_tokens_file); `tokens add NAME [--admin]` makes one and "
        "prints it once, `tokens revoke NAME` withdraws one at once. Only salted hashes "
        "are stored.",
    )
    token_actions = tokens.add_subparsers(dest="action", metavar="ACTION")
    token_add = add(
        "add",
        cmd_token_add,
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
        cmd_token_revoke,
        "withdraw a token",
        "Withdraw the token NAME (or its id); clients using it are refused from their "
        "next connection.",
        under=token_actions,
    )
    token_revoke.add_argument("name", metavar="NAME", help="the token's name or id")
    add(
        "reload",
        cmd_reload,
        "re-read the configuration (like SIGHUP)",
        "Re-read llmwsd's configuration file and apply what can change while running "
        "(generation defaults, model folders); sections that need a restart are named.",
    )
    add(
        "version",
        cmd_version,
        "the versions of llmwsctl and of the running llmwsd",
        "Print llmwsctl's version and, when it answers, the running llmwsd's; like "
        "status, exit 3 when llmwsd is not running.",
    )
    chat_parser = chat.add_parser(commands)
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


def exit_code(error: LLMWSError) -> int:
    if isinstance(error, NotRunning):
        return EXIT_NOT_RUNNING
    if isinstance(error, PermissionDenied):
        return EXIT_PERMISSION
    if isinstance(error, UsageError):
        return EXIT_USAGE
    return EXIT_FAILED


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
