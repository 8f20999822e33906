"""structlog configuration shared by the main process and the device processes.

One JSON object per line on stdout (journald keeps them): `ts` (ISO 8601 UTC), `level`, `event`,
`process`, then the event's fields. Standard-library loggers (Ultralytics, asyncio) are routed
through the same renderer, so the stream has one schema.
"""

from __future__ import annotations

import logging
import sys

import structlog

from daemon.config import LogConfig, LogFormat

# Third-party loggers whose info lines are banners, progress or per-event chatter (watchfiles logs
# "N changes detected" for every batch of events): only their warnings reach our stream.
FOREIGN_LOGGERS = ("ultralytics", "watchfiles")


def configure(config: LogConfig, *, process: str) -> None:
    """Send structlog and stdlib records to stdout, rendered as JSON or for a console."""
    console = config.format is LogFormat.CONSOLE or (config.format is LogFormat.AUTO and sys.stdout.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _add_process(process),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(sort_keys=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    for name in FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
        foreign.setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level at run time (config reload)."""
    logging.getLogger().setLevel(level.upper())


def _add_process(process: str) -> structlog.types.Processor:
    def add(_logger: object, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        event.setdefault("process", process)
        return event

    return add
