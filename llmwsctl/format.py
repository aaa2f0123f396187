"""Human output for llmwsctl: aligned tables, sizes, durations, and progress lines."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

_DECIMAL = ("B", "kB", "MB", "GB", "TB")
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB")
PLAIN_LINE_INTERVAL_S = 5.0  # progress lines when stderr is not a terminal


def size(n: float | None, binary: bool = False) -> str:
    """``1.2 GB`` (powers of 1000, for files) or ``1.2 GiB`` (powers of 1024, for memory)."""
    if n is None:
        return "-"
    step, units = (1024.0, _BINARY) if binary else (1000.0, _DECIMAL)
    value = float(n)
    for unit in units:
        if abs(value) < step or unit == units[-1]:
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
        value /= step
    raise AssertionError("unreachable")


def gib(gigabytes: float | None) -> str:
    """A memory figure the daemon reports in GiB (its ``*_gb`` fields)."""
    return "-" if gigabytes is None else size(gigabytes * 1024**3, binary=True)


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min``, ``2 h 5 min``, ``3 days``."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        hours, minutes = divmod(s // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days = s // 86400
    return f"{days} day{'s' if days != 1 else ''}"


def ago(timestamp: float | None, now: float | None = None) -> str:
    """``just now``, ``3 min ago`` for a Unix timestamp."""
    if timestamp is None:
        return "-"
    elapsed = (time.time() if now is None else now) - timestamp
    return "just now" if elapsed < 5 else f"{duration(elapsed)} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; the ``right`` columns (numbers) right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def error(message: str, code: str, as_json: bool = False, prefix: str = "", **details: Any) -> None:
    """Report a failure on stderr: ``prefix + message`` for people, and with ``as_json``
    ``{"error": {"code": ..., "message": ..., ...}}`` on one line, for scripts.

    Every llmwsctl command (chat included) reports its failures here; the caller
    picks the exit code.
    """
    if as_json:
        report = {"code": code, "message": message, **details}
        print(json.dumps({"error": report}, ensure_ascii=False, default=str), file=sys.stderr)
    else:
        print(prefix + message, file=sys.stderr)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """``label  value`` lines with the values aligned."""
    width = max((len(label) for label, _ in pairs), default=0)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in pairs)


class ProgressPrinter:
    """Shows a command's ``progress`` lines: a redrawn bar on a terminal, plain lines elsewhere.

    A progress line has ``message`` and, for transfers, ``done`` and ``total`` bytes
    (optionally ``file``, ``file_done`` and ``file_total``); speed and ETA are
    worked out here from successive lines.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._first: tuple[float, float] | None = None  # (time, done) of the first transfer line
        self._drawn = False
        self._last_message = ""
        self._last_line_at = 0.0

    def __call__(self, progress: dict[str, Any]) -> None:
        message = str(progress.get("message", progress.get("stage", "")))
        done, total = progress.get("done"), progress.get("total")
        if isinstance(done, int | float):
            line = f"{message} {self._transfer(float(done), total, progress)}".strip()
        else:
            line = message
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self._drawn = True
        elif message != self._last_message or self._due(done, total):
            # Plain lines go to logs: a new stage at once, a transfer every few seconds.
            self.stream.write(line + "\n")
            self._last_line_at = time.monotonic()
        self._last_message = message
        self.stream.flush()

    def _due(self, done: Any, total: Any) -> bool:
        finished = done is not None and done == total
        return finished or time.monotonic() - self._last_line_at >= PLAIN_LINE_INTERVAL_S

    def _transfer(self, done: float, total: Any, progress: dict[str, Any]) -> str:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, done)
        elapsed = now - self._first[0]
        speed = (done - self._first[1]) / elapsed if elapsed > 0.5 else 0.0
        parts = []
        if isinstance(total, int | float) and total > 0:
            fraction = min(done / total, 1.0)
            if self.tty:
                filled = int(fraction * 20)
                parts.append("[" + "#" * filled + "-" * (20 - filled) + "]")
            parts.append(f"{fraction * 100:.0f}% {size(done)}/{size(total)}")
            if speed > 0:
                parts.append(f"ETA {duration((total - done) / speed)}")
        else:
            parts.append(size(done))
        if speed > 0:
            parts.append(f"{size(speed)}/s")
        if progress.get("file"):
            file_part = str(progress["file"])
            if isinstance(progress.get("file_total"), int | float):
                file_part += f" {size(progress.get('file_done'))}/{size(progress['file_total'])}"
            parts.append(file_part)
        return "  ".join(parts)

    def finish(self) -> None:
        """End a redrawn line so that the next output starts on its own line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
