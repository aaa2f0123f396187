"""The llmwsd command: read the configuration, then serve until told to stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from importlib import metadata
from pathlib import Path

from llmwsd import __version__, children
from llmwsd.config import DEFAULT_CONFIG_PATH, Config, load_config, override
from llmwsd.errors import ConfigError
from llmwsd.logsetup import setup_logging

if children.is_daemon_child():  # one of vLLM's engine processes, importing this module
    children.die_with_parent()

# A bad configuration or installation: restarting cannot help.
EXIT_CONFIG = 2
SERVER_INSTALL = "pip install 'llmws[server]'"

DESCRIPTION = """\
Serve a local LLM (with llmws's transformers engine or with vLLM: [engine]
backend) over the LLMWS WebSocket protocol on one port, together with OpenAI's
and Anthropic's HTTP APIs under /v1/, the web page, /healthz and /metrics, and an
admin socket for llmwsctl. Under systemd it
reports READY=1 once the model is loaded.

Signals: SIGTERM/SIGINT stop (running answers get [server] drain_timeout to
finish), SIGHUP reloads the configuration."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmwsd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--port",
        type=int,
        metavar="N",
        help="listen on port N instead of the configuration's [server] port",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    parser.add_argument(
        "--daemon",
        action="store_true",
        help="detach from the terminal (for hosts without systemd): pid file in the runtime "
        "folder, log in the log folder",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
    parser.add_argument("--version", action="version", version=f"llmwsd {__version__}")
    return parser


def missing_server_dependencies() -> list[str]:
    """The distributions of llmws's ``server`` extra that are not installed.

    The plain ``pip install llmws`` is the client only (pyproject.toml); llmws's own metadata
    names what the daemon needs besides. Run from a source tree where llmws is not installed,
    there is no metadata to compare with: nothing is reported.
    """
    try:
        requirements = metadata.requires("llmws") or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if not re.search(r"""\bextra\s*==\s*["']server["']""", marker):
            continue
        name = re.split(r"[\s\[<>=!~(]", spec.strip(), maxsplit=1)[0]
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def serve(config: Config, log_level: str) -> int:
    from llmwsd.daemon import Daemon, StartFailed

    setup_logging(config.log_dir, getattr(logging, log_level.upper()))
    children.mark_daemon()
    try:
        asyncio.run(Daemon(config).run())
    except StartFailed as e:  # logged by the daemon already, before its shutdown's lines
        # What the configuration can fix (a busy port, an unusable key) exits as a bad file.
        return EXIT_CONFIG if isinstance(e.__cause__, ConfigError) else 1
    return 0


def detach_and_serve(config: Config, log_level: str) -> int:
    import daemon
    import daemon.pidfile

    config.runtime_dir.mkdir(parents=True, exist_ok=True)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    pidfile = daemon.pidfile.TimeoutPIDLockFile(str(config.runtime_dir.resolve() / "llmwsd.pid"))
    if pidfile.is_locked():
        print(f"llmwsd: already running (pid file {pidfile.path})", file=sys.stderr)
        return 1
    with daemon.DaemonContext(pidfile=pidfile, working_directory=os.getcwd(), umask=0o027):
        return serve(config, log_level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A client-only install has the llmwsd script too: say what to install, not a traceback.
    if missing := missing_server_dependencies():
        print(
            f"llmwsd: the server's dependencies are not installed ({', '.join(missing)}): "
            f"{SERVER_INSTALL}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    # Progress bars (model loading, downloads) would reach the journal as binary lines;
    # llmwsd reports progress in its own log lines and to llmwsctl.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from llmwsd.engines.loader import check_backend
    from llmwsd.frontends.websocket.security import HostAllowList

    try:
        config = load_config(args.config)
        if args.port is not None:
            config = override(config, "server", "port", args.port, "--port")
        HostAllowList.from_config(config)  # its entries are checked here, like every key
        check_backend(config)  # vLLM installed, and [engine.vllm] its arguments
    except ConfigError as e:
        print(f"llmwsd: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{args.config}: configuration OK")
        return 0
    if args.daemon:
        return detach_and_serve(config, args.log_level)
    return serve(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
