"""Logging to stderr (with syslog priorities for journald) and, off systemd, to a file."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

# journald reads a "<N>" prefix on each stderr line as the syslog priority.
_PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6)
        text = super().format(record)
        # Each line of a traceback keeps the priority, so journald does not split it as info.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


def setup_logging(log_dir: Path | None, level: int = logging.INFO) -> None:
    """Configure the root logger once; ``log_dir`` gets llmwsd.log when not under journald."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    stderr = logging.StreamHandler(sys.stderr)
    if under_journal():
        stderr.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(stderr)
    if log_dir is not None and not under_journal():
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.WatchedFileHandler(log_dir / "llmwsd.log")
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
        root.addHandler(file_handler)
    # Libraries' chatter (progress bars, HTTP) is not the operator's business at INFO.
    for noisy in ("transformers", "urllib3", "filelock", "websockets.server"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
