"""structlog configuration shared by the main process and the device processes.

One JSON object per line on stdout (journald keeps them): `ts` (ISO 8601 UTC), `level`, `event`,
`process`, then the event's fields. Standard-library loggers (Ultralytics, asyncio) are routed
through the same renderer, so the stream has one schema.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import logging.handlers
import queue
import sys
from typing import Protocol

import structlog

from daemon.config import LogConfig, LogFormat
from daemon.threads import name_os_thread

# Third-party loggers whose info lines are banners, progress or per-event chatter (watchfiles logs
# "N changes detected" for every batch of events): only their warnings reach our stream.
FOREIGN_LOGGERS = ("ultralytics", "watchfiles")


BACKLOG_RECORDS = 10_000  # rendered lines that may wait for a slow stdout before logging blocks


class LineStream(Protocol):
    """Where rendered lines are written: a text stream, or anything with its write and flush."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


_output: logging.StreamHandler[LineStream] | None = None  # the handler that writes the rendered lines
_lines: queue.Queue[logging.LogRecord] | None = None  # the writer thread's queue (background JSON)
_process = "main"


class _BlockingQueueHandler(logging.handlers.QueueHandler):
    """Renders a record in the caller's thread and hands the line to a writer thread; waits only
    when BACKLOG_RECORDS lines are already queued (the stdlib's drops them: a log must not)."""

    def __init__(self, lines: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(lines)
        self.lines = lines

    def enqueue(self, record: logging.LogRecord) -> None:
        self.lines.put(record)


def configure(config: LogConfig, *, process: str, background: bool = False) -> None:
    """Send structlog and stdlib records to stdout, rendered as JSON or for a console.

    `background`: the writes to stdout happen in a thread of their own, so an event loop never
    waits on a slow reader (journald under load, a full pipe); queued lines are written at exit.
    """
    global _output, _lines, _process
    console = is_console(config)
    _lines, _process = None, process
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
    stream = _output = logging.StreamHandler(sys.stdout)
    handler: logging.Handler = stream
    if background:
        lines: queue.Queue[logging.LogRecord] = queue.Queue(BACKLOG_RECORDS)
        handler = _BlockingQueueHandler(lines)  # its prepare() renders the line before it is queued
        stream.setFormatter(logging.Formatter("%(message)s"))
        _lines = None if console else lines  # records() renders JSON lines itself and queues them
        writer = logging.handlers.QueueListener(lines, stream)
        writer.start()
        name_os_thread("log", writer._thread)  # its CPU, told apart from the caller's (bench --modes pipeline)
        atexit.register(writer.stop)  # writes what is queued, then ends the thread
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


def records(logger: structlog.stdlib.BoundLogger, event: str, rows: list[dict[str, object]]) -> None:
    """One info record `event` per row: the same lines as `logger.info(event, **row)` for each.

    With JSON lines written by the background thread (the daemon), the rows are rendered here
    with one timestamp and handed over as one block: some 6 us a line instead of structlog's
    60, so a record per image costs the main process almost nothing. Otherwise (a console, the
    tests' in-process loggers) each row goes through structlog as usual.
    """
    if not logging.getLogger().isEnabledFor(logging.INFO) or not rows:
        return
    if _lines is None:
        for row in rows:
            logger.info(event, **row)
        return
    ts = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    tail = {"event": event, "level": "info", "ts": ts, "process": _process}
    text = "\n".join(json.dumps({**row, **tail}, default=repr) for row in rows)
    _lines.put(logging.makeLogRecord({"msg": text, "levelno": logging.INFO, "levelname": "INFO"}))


def is_console(config: LogConfig) -> bool:
    """Whether lines are rendered for a person (a console) rather than as JSON."""
    return config.format is LogFormat.CONSOLE or (config.format is LogFormat.AUTO and sys.stdout.isatty())


def set_stream(stream: LineStream) -> LineStream | None:
    """Send the rendered lines to `stream` from now on (a progress bar writes them above itself);
    returns the stream they went to, None before configure()."""
    if _output is None:
        return None
    return _output.setStream(stream)


def set_level(level: str) -> None:
    """Change the level at run time (config reload)."""
    logging.getLogger().setLevel(level.upper())


def _add_process(process: str) -> structlog.types.Processor:
    def add(_logger: object, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        event.setdefault("process", process)
        return event

    return add
