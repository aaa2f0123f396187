"""llmwsctl's commands: each asks the daemon over its admin socket and prints the answer.

A command prints the daemon's answer as JSON with --json, else as
:mod:`llmwsctl.render` puts it for people; its failures are raised as
:class:`~llmwsd.errors.LLMWSError` for :func:`llmwsctl.cli.main` to report, with
the exit code :func:`exit_code` gives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from llmwsctl import format as fmt
from llmwsctl import render
from llmwsctl.adminclient import AdminClient, NotRunning, PermissionDenied, default_socket_path
from llmwsd import __version__
from llmwsd.errors import LLMWSError
from llmwsd.protocol import admin as adminproto

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # argparse's own
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4


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


def exit_code(error: LLMWSError) -> int:
    if isinstance(error, NotRunning):
        return EXIT_NOT_RUNNING
    if isinstance(error, PermissionDenied):
        return EXIT_PERMISSION
    if isinstance(error, UsageError):
        return EXIT_USAGE
    return EXIT_FAILED
