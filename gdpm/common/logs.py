"""structlog set-up shared by every role."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(role: str, *, level: str = "info", json_output: bool = False) -> None:
    """Send structured log lines to stderr, tagged with the process's role."""
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    logging.basicConfig(level=numeric_level, stream=sys.stderr, format="%(message)s")
    # aiohttp logs each request at INFO; keep the access log out of the way.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    renderer = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(role=role)
