"""The llmwsd command: read the configuration, then serve until told to stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from llmwsd import __version__
from llmwsd.config import DEFAULT_CONFIG_PATH, Config, load_config, override
from llmwsd.errors import ConfigError
from llmwsd.logsetup import setup_logging

EXIT_CONFIG = 2

DESCRIPTION = """\
Serve a local LLM (transformers) over the LLMWS WebSocket protocol on one port,
together with the web page, /healthz and /metrics, and an admin socket for
llmwsctl. Under systemd it reports READY=1 once the model is loaded.

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


def serve(config: Config, log_level: str) -> int:
    from llmwsd.daemon import Daemon, StartFailed

    setup_logging(config.log_dir, getattr(logging, log_level.upper()))
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
    # Progress bars (model loading, downloads) would reach the journal as binary lines;
    # llmwsd reports progress in its own log lines and to llmwsctl.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from llmwsd.frontends.websocket.security import HostAllowList

    try:
        config = load_config(args.config)
        if args.port is not None:
            config = override(config, "server", "port", args.port, "--port")
        HostAllowList.from_config(config)  # its entries are checked here, like every key
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
