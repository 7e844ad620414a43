"""structlog configuration: JSON lines in containers, readable lines on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _Stderr:
    """``sys.stderr`` looked up at each write (a stream swapped later, e.g. by pytest's capture,
    never leaves a closed file behind)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """``FERMATA_LOG_FORMAT`` = json | console (default: console on a TTY, else json)."""
    fmt = fmt or os.environ.get("FERMATA_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    name = level or os.environ.get("FERMATA_LOG_LEVEL") or "INFO"
    lvl = getattr(logging, name.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # Route the stdlib loggers (kopf, kubernetes, botocore) through the same format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    # kopf logs every handler call at INFO; keep its warnings and errors only.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
