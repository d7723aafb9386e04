"""structlog JSON logs with a request id, and a redaction step so prompts, keys and user ids never reach a log."""

from __future__ import annotations

import logging
import sys
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


def configure_logging(level: str = "info", json: bool = True, service: str = "") -> None:
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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    # Libraries that use the standard logging module: warnings and above, to stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
