"""The daemon's state file, `work/inferd.status.json`: how it is doing, for `inferd status`.

One small JSON object: who is running (pid, its start time, the config), the phase, devices and
their state, done and failed by reason, in flight, queue depths, img/s over the last minute, the
last error and the last failed input. It is rebuilt every TICK_S on the event loop (a dozen
counters) and written only when it changed, or every HEARTBEAT_S, by a thread: a temp file
renamed over the old one, so a reader always finds a whole file. No fsync: after a power cut
the daemon is not running, and that is what a reader concludes from a dead pid.

Each `inferd@NAME` instance has its own paths.work (/var/lib/inferd/NAME), hence its own file;
a daemon that finds the file held by another live daemon (two configs sharing paths.work)
says so in the log.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon import __version__

if TYPE_CHECKING:
    from daemon.metrics import Metrics
    from daemon.snapshot import Snapshot, Snapshotter

log = structlog.get_logger("daemon.state")
FILE_NAME = "inferd.status.json"
TICK_S = 1.0  # how often the state is rebuilt (and written if it changed)
HEARTBEAT_S = 30.0  # written at least this often, so `updated_at` shows the loop is alive
RATE_WINDOW_S = 60.0
FIELD_CHARS = 300  # a logged field longer than this is cut in last_error / last_failure
SKIPPED_FIELDS = frozenset({"event", "level", "ts", "process", "exc_info", "stack_info", "_record", "_from_structlog"})


class Phase(enum.Enum):
    STARTING = "starting"  # loading the model on the devices
    SERVING = "serving"
    DRAINING = "draining"  # a stop was asked: intake closed, in-flight work finishing
    STOPPED = "stopped"


def path(work: Path) -> Path:
    return work / FILE_NAME


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def process_identity(pid: int) -> dict[str, Any] | None:
    """What tells this process from a later one with the same pid: its start time (clock ticks
    after boot) and the boot id. None if there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return {"pid": pid, "start_ticks": int(fields[19]), "boot_id": boot}


def is_alive(state: dict[str, Any]) -> bool:
    """Whether the process that wrote `state` still runs (not merely a process with its pid)."""
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    identity = process_identity(pid)
    if identity is None:
        return False
    return identity == {"pid": pid, "start_ticks": state.get("start_ticks"), "boot_id": state.get("boot_id")}


def read(file: Path) -> dict[str, Any]:
    """The state in `file`: OSError if it cannot be read, ValueError if it is not a state."""
    state = json.loads(file.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        raise ValueError(f"{file} is not an inferd state file")
    return state


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class LastProblems(logging.Filter):
    """Sees every record the daemon logs (a filter on the log handler; it never drops one) and
    keeps the last error and the last image_failed, for the state file."""

    def __init__(self) -> None:
        super().__init__("daemon.state")
        self.error: dict[str, Any] | None = None
        self.failure: dict[str, Any] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.msg if isinstance(record.msg, dict) else {"event": record.getMessage()}
        if record.levelno >= logging.ERROR:
            self.error = summarize(fields, record)
        elif fields.get("event") == "image_failed":
            self.failure = summarize(fields, record)
        return True


def summarize(fields: dict[str, Any], record: logging.LogRecord) -> dict[str, Any]:
    """A record as a small JSON-ready dict: ts, level, event, and its other fields cut short."""
    out: dict[str, Any] = {
        "ts": fields.get("ts") or datetime.fromtimestamp(record.created, UTC).isoformat(),
        "level": record.levelname.lower(),
        "event": str(fields.get("event", "")),
    }
    for key, value in fields.items():
        if key not in SKIPPED_FIELDS:
            ok = isinstance(value, bool | int | float) or value is None
            out[key] = value if ok else str(value)[:FIELD_CHARS]
    exc = fields.get("exc_info")
    if not isinstance(exc, BaseException):
        exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        out["exception"] = f"{type(exc).__name__}: {exc}"[:FIELD_CHARS]
    return out


class Reporter:
    """Keeps `path` up to date for one daemon run: start() -> run(snapshot, metrics) as a task -> stop()."""

    def __init__(self, file: Path, *, config: Path | None, once: bool, metrics: tuple[str, int] | None) -> None:
        self.file = file
        identity = process_identity(os.getpid()) or {"pid": os.getpid(), "start_ticks": None, "boot_id": None}
        self.head: dict[str, Any] = {
            "version": 1,
            **identity,
            "inferd_version": __version__,
            "config": str(config.absolute()) if config else None,
            "once": once,
            "metrics": f"http://{_host(metrics[0])}:{metrics[1]}/metrics" if metrics else None,
            "started_at": now_iso(),
        }
        self.phase = Phase.STARTING
        self.serving_since: str | None = None
        self.problems = LastProblems()
        self.body: dict[str, Any] = {}
        self._rates: collections.deque[tuple[float, int]] = collections.deque()
        self._written = ""  # the last body written (without updated_at)
        self._written_at = 0.0
        self._lock = threading.Lock()  # one write at a time; the newest wins
        self._seq = 0
        self._written_seq = -1

    def start(self, devices: list[str]) -> None:
        """Before the model loads: say so in the file, and watch the log for errors."""
        try:
            other = read(self.file)
        except (OSError, ValueError):
            other = None
        if other is not None and other["pid"] != os.getpid() and other.get("phase") != "stopped" and is_alive(other):
            log.warning(
                "state_file_in_use",
                path=str(self.file),
                pid=other["pid"],
                config=other.get("config"),
                hint="another daemon uses this paths.work: give each config its own",
            )
        for handler in logging.getLogger().handlers:
            handler.addFilter(self.problems)
        self.body = {"devices": [{"device": d, "state": "starting"} for d in devices]}
        self._write_now()

    def serving(self) -> None:
        self.phase = Phase.SERVING
        self.serving_since = now_iso()

    def draining(self) -> None:
        self.phase = Phase.DRAINING

    async def run(self, snapshot: Snapshotter, metrics: Metrics) -> None:
        """Every TICK_S: rebuild the state from a `snapshot()`, write it if it changed (or for the heartbeat)."""
        warned = False
        while True:
            self.update(snapshot(), metrics)
            if self._due():
                try:
                    await asyncio.to_thread(self._write, *self._render())
                    warned = False
                except OSError as exc:  # disk full, read-only: the daemon's work matters more
                    self._written = ""  # try again at the next tick
                    if not warned:
                        log.warning("state_write_failed", path=str(self.file), error=str(exc))
                    warned = True
            await asyncio.sleep(TICK_S)  # a period: the file's resolution

    def update(self, s: Snapshot, metrics: Metrics) -> None:
        """Rebuild the body from the service's counters (cheap: no I/O)."""
        now = time.monotonic()
        self._rates.append((now, s.done))
        while now - self._rates[0][0] > RATE_WINDOW_S:
            self._rates.popleft()
        t0, d0 = self._rates[0]
        by_reason = {
            sample.labels["reason"]: int(sample.value)
            for family in metrics.images_failed_total.collect()
            for sample in family.samples
            if sample.name.endswith("_total") and sample.value
        }
        self.body = {
            "devices": [
                {"device": d.device, "state": d.state.value, "pid": d.pid, "restarts": d.restarts} for d in s.devices
            ],
            "done": s.done,
            "failed": s.failed,
            "failed_by_reason": by_reason,
            "in_flight": s.in_flight,
            "queues": {**{q: s.queues.get(q, 0) for q in ("jobs", "ready", "outcomes")}, "batching": s.batching},
            "batches": s.batches,
            "images_per_s_1min": round((s.done - d0) / (now - t0), 3) if now > t0 else 0.0,
            "rate_window_s": round(now - t0, 1),
        }

    def stop(self, last: tuple[Snapshot, Metrics] | None) -> None:
        """The run is over (after the drain): the `last` counts, phase stopped; the log is left alone."""
        if last is not None:
            self.update(*last)
        self.phase = Phase.STOPPED
        self.head["stopped_at"] = now_iso()
        self._write_now()
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self.problems)

    def _current(self) -> dict[str, Any]:
        return {
            **self.head,
            "phase": self.phase.value,
            "serving_since": self.serving_since,
            **self.body,
            "last_error": self.problems.error,
            "last_failure": self.problems.failure,
        }

    def _due(self) -> bool:
        text = json.dumps(self._current(), sort_keys=True)
        return text != self._written or time.monotonic() - self._written_at >= HEARTBEAT_S

    def _render(self) -> tuple[str, int]:
        current = self._current()
        self._written = json.dumps(current, sort_keys=True)
        self._written_at = time.monotonic()
        self._seq += 1
        return json.dumps({**current, "updated_at": now_iso()}, indent=1) + "\n", self._seq

    def _write_now(self) -> None:
        """A write on the caller's thread: at start-up and after the drain, when nothing waits on the loop."""
        try:
            self._write(*self._render())
        except OSError as exc:
            log.warning("state_write_failed", path=str(self.file), error=str(exc))

    def _write(self, text: str, seq: int) -> None:
        """Replace the file whole: a temp file beside it, then a rename. A write that lost the race
        to a newer one (the last write after a cancelled tick) is dropped."""
        with self._lock:
            if seq < self._written_seq:
                return
            tmp = self.file.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.file)
            self._written_seq = seq
