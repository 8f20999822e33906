"""What a person at a terminal sees while inferd works: a progress bar, a live status line.

`inferd run --once` draws a bar over the backlog (done/total, img/s, ETA, failures); `inferd run`
keeps one status line (in flight, done, failed, img/s, devices up). Only when stdout is a
terminal and the log renders for a console: on a pipe or under journald nothing here runs and
the JSON lines are exactly what they are without it.

tqdm, not rich: structlog's ConsoleRenderer hands over finished lines with their own colours,
and `tqdm.write` prints such a line as it is, above the bar (rich would parse the escapes back
into its own markup and wrap the line again, and its Live display swaps sys.stdout). The log
handler's stream is pointed at the bar for as long as it is drawn, so a line never tears it.
The bar is drawn by a thread of its own: the event loop never writes to a terminal, which may
be slow or paused (Ctrl-S). That thread only reads counters (plain ints) off a snapshot of the service.
Device processes write to the terminal directly; they log at start-up and at exit, when no bar
is drawn, and when one crashes, and then the bar is drawn again on the next line.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TextIO, TypeVar

from daemon import logs
from daemon.config import LogConfig

if TYPE_CHECKING:
    from tqdm import tqdm

    from daemon.snapshot import Snapshot, Snapshotter

T = TypeVar("T")
REFRESH_S = 0.25  # how often the bar is redrawn
RATE_WINDOW_S = 10.0  # the status line's img/s is over this window
ONCE_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| {percentage:3.0f}% {rate_noinv_fmt} ETA {remaining}{postfix}"
BENCH_FORMAT = "{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}, {rate_noinv_fmt}"


@dataclass(frozen=True, slots=True)
class Counts:
    """What the bar shows, read off the service."""

    done: int
    failed: int
    in_flight: int
    found: int  # inputs the start-up scan found (recovered + incoming/): the backlog of --once
    devices_up: int
    devices: int


def counts(s: Snapshot) -> Counts:
    """What the bar shows of a snapshot of the service."""
    return Counts(s.done, s.failed, s.in_flight, s.found, s.devices_up, len(s.devices))


def _bar_class() -> type[tqdm[Any]]:
    """A tqdm subclass of our own: its lock (a thread lock, no multiprocessing semaphore), its
    list of bars and its monitor setting stay off tqdm's class, which other code may use."""
    from weakref import WeakSet

    from tqdm import tqdm

    class Bar(tqdm):  # type: ignore[type-arg]
        monitor_interval = 0  # no monitor thread: we refresh on our own period
        _instances: ClassVar[WeakSet[tqdm[Any]]] = WeakSet()  # its bars, not every tqdm's

    Bar.set_lock(threading.RLock())
    return Bar


class _Through:
    """A text stream that prints each log line above the bar (the log handler writes here)."""

    def __init__(self, bar: type[tqdm[Any]], terminal: TextIO) -> None:
        self.bar = bar
        self.terminal = terminal

    def write(self, text: str) -> int:
        self.bar.write(text, file=self.terminal, end="")  # clears the bar, writes, redraws it
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()


class Display:
    """The bar (--once) or the status line (continuous) of a running service; close() ends it."""

    def __init__(self, read: Callable[[], Counts], *, once: bool, terminal: TextIO) -> None:
        self.read = read
        self.once = once
        self.terminal = terminal
        self.Bar = _bar_class()
        self.bar: tqdm[Any] | None = None
        self._rates: collections.deque[tuple[float, int]] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw_loop, name="progress", daemon=True)
        self._previous = logs.set_stream(_Through(self.Bar, terminal))
        self._thread.start()

    def _draw_loop(self) -> None:
        while not self._stop.wait(REFRESH_S):  # a period: the display's refresh rate
            self._draw(self.read())

    def _draw(self, c: Counts) -> None:
        finished = c.done + c.failed
        if self.once:
            total = max(c.found, finished)
            if self.bar is None:
                if not total:
                    return  # the scan has not counted the backlog yet
                self.bar = self.Bar(
                    total=total, desc="inferd", unit=" img", file=self.terminal, bar_format=ONCE_FORMAT,
                    dynamic_ncols=True, mininterval=0, smoothing=0.1, leave=True,
                )  # fmt: skip
            self.bar.total = total
            self.bar.set_postfix_str(f"{c.failed} failed, {c.in_flight} in flight", refresh=False)
            self.bar.update(finished - self.bar.n)  # refreshes (mininterval 0), with the rate and ETA
            return
        if self.bar is None:
            self.bar = self.Bar(file=self.terminal, bar_format="{desc}", dynamic_ncols=True, leave=False)
        line = status_line(c, self._rate(c.done))
        if line != self.bar.desc:  # an idle daemon's line stays still: nothing is written
            self.bar.set_description_str(line, refresh=True)

    def _rate(self, done: int) -> float:
        """img/s over the last RATE_WINDOW_S."""
        now = time.monotonic()
        self._rates.append((now, done))
        while now - self._rates[0][0] > RATE_WINDOW_S:
            self._rates.popleft()
        t0, d0 = self._rates[0]
        return (done - d0) / (now - t0) if now > t0 else 0.0

    def close(self) -> None:
        """Draw the last counts (the --once bar stays on screen), then give the terminal back to the log."""
        self._stop.set()
        self._thread.join()
        self._draw(self.read())
        if self.bar is not None:
            self.bar.close()
        if self._previous is not None:
            logs.set_stream(self._previous)


def status_line(c: Counts, rate: float) -> str:
    return (
        f"inferd: {c.in_flight} in flight, {c.done} done, {c.failed} failed, {rate:.1f} img/s,"
        f" {c.devices_up}/{c.devices} devices up"
    )


class _Off:
    def close(self) -> None:
        pass


def show(snapshot: Snapshotter, *, once: bool, log: LogConfig) -> Display | _Off:
    """A Display of the service's `snapshot()` (called from the display's thread: it must be safe
    there) when stdout is a terminal and the log renders for one; else nothing."""
    if not (sys.stdout.isatty() and logs.is_console(log)):
        return _Off()
    return Display(lambda: counts(snapshot()), once=once, terminal=sys.stdout)


# The bench's progress: on stderr, and only when stderr is a terminal (its report and --json
# go to stdout and files, which stay as they are).


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        pass


def bar(desc: str, total: int, unit: str = "img") -> tqdm[Any] | _NoBar:
    """A bar on stderr if it is a terminal (use it as a context manager; update() per `unit`)."""
    if not sys.stderr.isatty():
        return _NoBar()
    return _bar_class()(
        total=total, desc=desc, unit=f" {unit}", file=sys.stderr, bar_format=BENCH_FORMAT, dynamic_ncols=True
    )


def note(text: str) -> None:
    """One line on stderr if it is a terminal: a step that has no bar."""
    if sys.stderr.isatty():
        sys.stderr.write(f"inferd bench: {text}\n")


def track(items: Iterable[T], desc: str, total: int, unit: str = "img") -> Iterator[T]:
    """`items`, with a bar on stderr (if a terminal) that advances as each is taken."""
    with bar(desc, total, unit) as b:
        for item in items:
            yield item
            b.update(1)
