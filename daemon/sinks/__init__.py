"""Sinks: where a result must be durable before its source is released.

The results stage writes the files (results.py), then hands the outcome to every sink and waits
until each says it is durable; only then does the source move to done/ or failed/. A sink that
cannot make an outcome durable retries and keeps the outcome's capacity slot meanwhile, so a
failing sink pauses the intake instead of losing or duplicating anything.

A sink's lifecycle: made from the config (`make`, by the URL's scheme in `SINKS`; a ConfigError
if it can never work) -> `run()` as a stage (connect, then store what is put) -> `put()` per
outcome from the results stage -> `close()` after the drain. `check()` is `inferd check`'s.
A new kind of sink is one class and one line in `SINKS` (or `register` from elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from daemon.checks import DatabaseUrl
from daemon.config import OutputConfig
from daemon.errors import ConfigError
from daemon.errors import SinkError as SinkError  # re-exported: its old home
from daemon.jobs import Outcome

OnState = Callable[[bool, str | None], None]  # (up, why it fails): each failed attempt, and the recovery


class Sink(Protocol):
    """Something an outcome must reach before its source is released."""

    name: str  # its key in health, metrics and the STATUS line
    failures: int  # failed attempts, retried: the watchdog counts them as progress

    async def run(self) -> None:
        """A stage: connect, then store what `put` queues, until cancelled by the drain."""
        ...

    async def put(self, outcome: Outcome) -> None:
        """Return once `outcome` is durable in this sink; raise SinkError if it never can be."""
        ...

    async def check(self) -> None:
        """Connect once (`inferd check`); raise whatever stops it."""
        ...

    async def close(self) -> None:
        """After the drain: release the connection."""
        ...


# (the URL, output.fsync, on_state) -> a sink; ConfigError if it can never work as configured
SinkFactory = Callable[[DatabaseUrl, bool, OnState], Sink]


def _database(url: DatabaseUrl, fsync: bool, on_state: OnState) -> Sink:
    from daemon.sinks.database import open_database  # its drivers only when configured

    return open_database(url, fsync=fsync, on_state=on_state)


SINKS: dict[str, SinkFactory] = {"sqlite": _database, "postgresql": _database}


def register(scheme: str, factory: SinkFactory) -> None:
    """Make URLs of `scheme` build sinks with `factory`."""
    SINKS[scheme] = factory


def make(output: OutputConfig, on_state: Callable[[str, bool, str | None], None]) -> list[Sink]:
    """The sinks `output` configures (today: `output.database`), each told to report its state as
    `on_state(its name, up, error)`."""
    url = output.database
    if url is None:
        return []
    factory = SINKS.get(url.dialect)
    if factory is None:
        raise ConfigError("output.database", f"no sink handles {url.dialect}:// URLs", f"use one of {sorted(SINKS)}")
    sink: Sink | None = None

    def state(up: bool, error: str | None) -> None:
        on_state(sink.name if sink is not None else url.dialect, up, error)

    sink = factory(url, output.fsync, state)
    return [sink]
