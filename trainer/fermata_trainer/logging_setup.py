"""structlog configured to write one JSON object per line (stdout), for people and machines."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_configured = False


class LiveStream:
    """``sys.stdout`` / ``sys.stderr`` looked up at each write, not when logging is configured
    (so a stream swapped later — by pytest's capture, say — never leaves a closed file behind)."""

    def __init__(self, name: str = "stdout") -> None:
        self.name = name

    def write(self, text: str) -> int:
        return int(getattr(sys, self.name).write(text))

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def configure_logging(level: str = "INFO", stream: TextIO | LiveStream | None = None) -> None:
    """Route structlog and the standard library's logging to JSON lines on ``stream``."""
    global _configured
    out: Any = stream if stream is not None else LiveStream("stdout")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # one write per line (message and newline together): two ranks sharing a pipe never splice lines
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries log through the standard library: send their warnings to stderr so
    # stdout stays pure JSON lines from the trainer.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    _configured = True


class _LazyLogger:
    """A logger that builds its structlog logger when it logs, from the configuration of that
    moment. (``structlog.get_logger(...).bind(...)`` builds one at once: a module-level
    ``log = get_logger(__name__)`` imported before :func:`configure_logging` would keep
    structlog's default console format instead of the JSON lines.)"""

    def __init__(self, name: str, context: dict[str, Any]) -> None:
        self._name = name
        self._context = context

    def bind(self, **values: Any) -> _LazyLogger:
        return _LazyLogger(self._name, {**self._context, **values})

    def __getattr__(self, method: str) -> Any:
        return getattr(structlog.get_logger(self._name).bind(**self._context), method)


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``logger=name``, following :func:`configure_logging` even
    when made before it (at import time)."""
    return _LazyLogger(name, {"logger": name})


def bind_context(**values: Any) -> None:
    """Add key/values to every later log line of this process (rank, run name, pod)."""
    structlog.contextvars.bind_contextvars(**values)
