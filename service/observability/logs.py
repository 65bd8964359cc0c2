"""Logging setup: JSON lines for log pipelines, or plain text for people; and the access log.

Structured fields travel in `extra={"fields": {...}}` and become keys of the JSON object.
The access log (one line per call) skips the logging machinery: see `AccessLog`.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import sys
import time
from typing import Any, TextIO

_STANDARD = {"ts", "level", "logger", "message"}
#: The most characters of a traceback in one log line: its last frames and the exception fit.
MAX_TRACEBACK_CHARS = 4096
#: The most characters of one traceback line (an exception's message may repeat request data).
MAX_TRACEBACK_LINE_CHARS = 512


@functools.lru_cache(maxsize=4)
def _utc_second(epoch_second: int) -> str:
    """ISO 8601 up to the second; cached, as a busy server logs many lines per second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_second))


def clip_traceback(text: str, limit: int = MAX_TRACEBACK_CHARS) -> str:
    """A formatted traceback cut to about `limit` characters, so that no failure makes a log line as
    long as a request: each line to MAX_TRACEBACK_LINE_CHARS, and from the end, which says what
    failed and where (the first line and a count stand for what is cut)."""
    if len(text) <= limit:
        return text
    lines = [
        line
        if len(line) <= MAX_TRACEBACK_LINE_CHARS
        else f"{line[:MAX_TRACEBACK_LINE_CHARS]}... ({len(line)} characters)"
        for line in text.splitlines()
    ]
    kept: list[str] = []
    size = len(lines[0])
    for line in reversed(lines[1:]):
        size += len(line) + 1
        if size > limit:
            break
        kept.append(line)
    cut = len(lines) - 1 - len(kept)
    head = [*lines[:1], f"  ... ({cut} lines cut)"] if cut else lines[:1]
    return "\n".join(head + kept[::-1])


class _ClippedTracebacks(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return clip_traceback(super().formatException(ei))


class JsonFormatter(_ClippedTracebacks):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": f"{_utc_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in _STANDARD})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(_ClippedTracebacks):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record to stderr in the chosen format; the access log too, in blocks."""
    ACCESS_LOG.configure(sys.stderr, fmt, logging.getLogger(ACCESS_LOGGER))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Neither format shows threads, processes or source lines: skip collecting them for every
    # record (the access log writes one per call), as the logging HOWTO's "Optimization" advises.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record


ACCESS_LOGGER = "convserve.access"


class AccessLog:
    """One line per call, in the format of the other log lines, formatted and written in blocks.

    Through `logging`, a line costs a LogRecord, two locks, a formatter and a write and a flush of
    its own: 8-10% of a small model's throughput. Here a call leaves its time and fields in a
    buffer; the lines are formatted and written together when `max_lines` are waiting or
    `flush_after` seconds after the first (a timer on the event loop), and at shutdown. So a line
    may reach the stream up to `flush_after` later than the lines around it; none is lost on a
    clean exit. The logger's level still decides (INFO: every call, WARNING: failures only).
    Until `configure` (embedded use, unit tests) lines go through `logging` as any other record.
    """

    def __init__(self, flush_after: float = 0.1, max_lines: int = 512) -> None:
        self.flush_after = flush_after
        self.max_lines = max_lines
        self._stream: TextIO | None = None
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._json = True
        self._waiting: list[tuple[float, int, str, dict[str, Any]]] = []  # time, level, message, fields
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def configure(self, stream: TextIO, fmt: str, logger: logging.Logger) -> None:
        self.flush()
        self._stream, self._json, self._logger = stream, fmt == "json", logger

    def write(self, level: int, message: str, fields: dict[str, Any]) -> None:
        """Log one call; `fields` is kept as it is until the line is formatted: do not change it."""
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        if self._stream is None:
            logger.log(level, message, extra={"fields": fields})
            return
        self._waiting.append((time.time(), level, message, fields))
        if len(self._waiting) >= self.max_lines:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: nothing would flush later
            self.flush()
            return
        if self._timer is not None and self._timer_loop is not loop:
            self.flush()  # buffered under a loop that is gone, whose timer never fires: all now
            return
        if self._timer is None:
            self._timer, self._timer_loop = loop.call_later(self.flush_after, self.flush), loop

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiting or self._stream is None:
            return
        waiting, self._waiting = self._waiting, []
        text = "".join([self._format(*entry) for entry in waiting])
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: as logging does, do not fail the call
            pass

    def _format(self, now: float, level: int, message: str, fields: dict[str, Any]) -> str:
        second = int(now)
        millis = int((now - second) * 1000)
        name = logging.getLevelName(level)
        if self._json:
            stamp = f"{_utc_second(second)}.{millis:03d}Z"
            parts = [f'{{"ts": "{stamp}", "level": "{name}", "logger": "{ACCESS_LOGGER}"']
            parts.append(f'"message": {_json_value(message)}')
            # keys are the server's own names: plain text
            parts += [f'"{key}": {_json_value(value)}' for key, value in fields.items()]
            return ", ".join(parts) + "}\n"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{stamp},{millis:03d} {name} {ACCESS_LOGGER}: {message} {pairs}\n"


def _json_value(value: Any) -> str:
    """`json.dumps(value, default=str)` for one value, without its machinery for the values an
    access line holds: plain text (printable ASCII without quotes or backslashes) goes in as it is."""
    if isinstance(value, str):
        if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            return f'"{value}"'
    elif type(value) is int:
        return str(value)
    elif type(value) is float and value - value == 0:  # finite
        return repr(value)
    return json.dumps(value, default=str)


ACCESS_LOG = AccessLog()
atexit.register(ACCESS_LOG.flush)
