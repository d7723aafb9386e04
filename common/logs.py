"""structlog JSON logs with a request id, and a redaction step so prompts, keys and user ids never reach a log."""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
import threading
import time
import typing

import structlog

# Event fields that may carry user content or secrets. Their values are replaced, whatever the caller logs.
REDACTED_FIELDS = frozenset({
    "prompt", "prompts", "messages", "content", "input", "inputs", "text", "texts", "completion",
    "api_key", "key", "authorization", "token", "password", "secret", "user", "email",
})


def redact(_logger: typing.Any, _method: str, event_dict: typing.MutableMapping[str, typing.Any]
           ) -> typing.MutableMapping[str, typing.Any]:
    for name in REDACTED_FIELDS.intersection(event_dict):
        event_dict[name] = "[redacted]"
    return event_dict


class BufferedLineWriter:
    """The log's lines go out in batches: one write per `max_delay_s` (or per `max_bytes`) instead of one per line,
    a syscall the gateway paid for every request's summary line. Warnings and errors are written at once; a
    process killed by SIGKILL loses at most max_delay_s of info lines (nothing of accounting: that is in Redis or
    the journal)."""

    def __init__(self, file: typing.TextIO | None = None, max_delay_s: float = 0.2, max_bytes: int = 64 * 1024):
        self._file, self.max_delay_s, self.max_bytes = file, max_delay_s, max_bytes
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="log flusher", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def write_line(self, line: str, urgent: bool = False) -> None:
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            if not (urgent or self._size >= self.max_bytes):
                return
        self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._lines:
                return
            data, self._lines, self._size = "".join(self._lines), [], 0
            out = self._file or sys.stderr  # looked up now: whatever stderr is at the time
            with contextlib.suppress(OSError, ValueError):
                out.write(data)
                out.flush()

    def _run(self) -> None:
        while True:
            time.sleep(self.max_delay_s)
            self.flush()


class BufferedLogger:
    """A structlog logger writing through a BufferedLineWriter (info and debug batched; warning and above at once)."""

    def __init__(self, writer: BufferedLineWriter):
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write_line(message + "\n")

    def urgent(self, message: str) -> None:
        self._writer.write_line(message + "\n", urgent=True)

    debug = info = msg
    warning = warn = error = critical = exception = fatal = failure = err = urgent


def configure_logging(level: str = "info", json: bool = True, service: str = "", buffered: bool = False) -> None:
    """buffered: info lines are written in batches (BufferedLineWriter), for services; the CLI writes at once."""
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_buffered_factory() if buffered else structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    # Libraries that use the standard logging module: warnings and above, to stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


_WRITER: BufferedLineWriter | None = None


def _buffered_factory() -> typing.Callable[..., BufferedLogger]:
    global _WRITER
    if _WRITER is None:
        _WRITER = BufferedLineWriter()
    writer = _WRITER
    return lambda *_args: BufferedLogger(writer)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
