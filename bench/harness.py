"""The daemon as a child process, for the bench and the tests: one implementation of both.

`Daemon` starts `python -m daemon run` on a config file; a reader thread takes its stdout's JSON
lines as they come (stamped with their arrival time), so the daemon never blocks on a full pipe,
and keeps them in `daemon.log` beside the config. `toml` writes the config such a run reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

Record = dict[str, Any]


class DaemonExited(AssertionError):
    """The daemon's stdout closed before what was waited for came: it exited (the message says how)."""


def toml(sections: dict[str, dict[str, Any]]) -> str:
    """A config file's text: JSON writes these strings, numbers, booleans and lists as TOML does."""
    return "".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items()) for s, t in sections.items())


class Daemon:
    """`python -m daemon run --config CONFIG ARGS` in a session of its own (so that `kill` takes
    its device processes with it, even hung ones), started in the config's folder."""

    def __init__(
        self, config: Path, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> None:
        self.root = config.parent
        self.lines: list[Record] = []  # the records taken so far (wait_for, next_record), in order
        self.raw: list[str] = []  # every stdout line, JSON or not
        self.peak_rss_kib: int | None = None  # VmHWM, read as it logs daemon_stopped
        # Unbounded on purpose: the reader must never block the daemon's stdout.
        self._queue: queue.SimpleQueue[tuple[float, Record] | None] = queue.SimpleQueue()
        self._ended = False
        self._stderr = open(self.root / "daemon.stderr", "w+")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "daemon", "run", "--config", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=self.root,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="daemon-log-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.root / "daemon.log", "w") as log:  # kept, to see where the time went
            for line in self.proc.stdout:
                arrived = time.monotonic()
                self.raw.append(line)
                log.write(line)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict):  # a stray print by a library, not an event
                    record = {"event": "<not json>", "raw": line}
                elif record.get("event") == "daemon_stopped":  # still alive: it exits just after this line
                    self.peak_rss_kib = vm_hwm_kib(self.proc.pid)
                self._queue.put((arrived, record))
        self._queue.put(None)

    def next_record(self, timeout_s: float) -> tuple[float, Record]:
        """The next record and its arrival time (monotonic); TimeoutError if none comes in
        `timeout_s`, DaemonExited once the daemon's stdout has closed."""
        if not self._ended:
            try:
                item = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no log line within {timeout_s} s; last lines: {self.raw[-5:]}") from None
            if item is not None:
                self.lines.append(item[1])
                return item
            self._ended = True
        raise DaemonExited(f"daemon exited ({self.proc.wait()}): {self.stderr()}\n{''.join(self.raw[-10:])}")

    def wait_for(self, predicate: Callable[[Record], bool], timeout_s: float = 120) -> Record:
        """Block until a log record matching `predicate` arrives (records already seen count too)."""
        for record in self.lines:
            if predicate(record):
                return record
        deadline = time.monotonic() + timeout_s
        while True:
            _, record = self.next_record(max(0.0, deadline - time.monotonic()))
            if predicate(record):
                return record

    def wait_event(self, event: str, timeout_s: float = 120, **fields: Any) -> Record:
        return self.wait_for(lambda r: r["event"] == event and all(r.get(k) == v for k, v in fields.items()), timeout_s)

    def events(self, event: str) -> list[Record]:
        return [r for r in self.lines if r["event"] == event]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Send `sig`, wait for the exit status; every record it logged is then in `lines`."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self._reader.join(timeout_s)
        while not self._ended:
            with contextlib.suppress(DaemonExited):
                self.next_record(timeout_s)
        return code

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def kill(self) -> None:
        """SIGKILL the daemon and whatever of its process group is left (a device process that
        hangs while loading never reads the pipe that would tell it its parent is gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(60)  # the group is gone, so its stdout has closed: the reader ends
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.kill()


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size of a live process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
