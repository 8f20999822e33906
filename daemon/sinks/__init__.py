"""Sinks: where a result must be durable before its source is released.

The results stage writes the files (results.py), then hands the outcome to every sink and waits
until each says it is durable; only then does the source move to done/ or failed/. A sink that
cannot make an outcome durable retries and keeps the outcome's capacity slot meanwhile, so a
failing sink pauses the intake instead of losing or duplicating anything.
"""

from __future__ import annotations

from typing import Protocol

from daemon.errors import SinkError as SinkError  # re-exported: its old home
from daemon.jobs import Outcome


class Sink(Protocol):
    """Something an outcome must reach before its source is released."""

    name: str
    failures: int  # failed attempts, retried: the watchdog counts them as progress

    async def put(self, outcome: Outcome) -> None:
        """Return once `outcome` is durable in this sink; raise SinkError if it never can be."""
        ...
