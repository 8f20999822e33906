"""What the service tells the outside while it serves: systemd's watchdog and STATUS line, the
periodic `stats` record, the gauges sampled before a metrics scrape, and the sinks' state.

It is given what it reports on, never the service: the metrics, the notifier, and a callable
that returns a `Snapshot` of the running pipeline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.snapshot import Snapshot, Snapshotter

log = structlog.get_logger("daemon.service")


class Health:
    def __init__(self, metrics: Metrics, notifier: Notifier, snapshot: Snapshotter) -> None:
        self.metrics = metrics
        self.notifier = notifier
        self.snapshot = snapshot
        self.sink_errors: dict[str, str | None] = {}  # sink name -> why it fails now (absent while it works)
        self._stats: asyncio.Task[None] | None = None
        self._interval_s = 0.0

    def start(self, stats_interval_s: float) -> list[asyncio.Task[None]]:
        """The watchdog and the stats tasks (the stats one is replaced by `stats_every`)."""
        loop = asyncio.get_running_loop()
        self.stats_every(stats_interval_s)
        return [loop.create_task(self._watchdog())]

    def stats_every(self, interval_s: float) -> None:
        """A `stats` record every `interval_s` from now on (a config reload may change it)."""
        if self._stats is not None and interval_s == self._interval_s:
            return
        if self._stats is not None:
            self._stats.cancel()
        self._interval_s = interval_s
        self._stats = asyncio.get_running_loop().create_task(self._stats_loop(interval_s))

    def stop(self) -> None:
        if self._stats is not None:
            self._stats.cancel()

    def summary(self, snap: Snapshot | None = None) -> dict[str, Any]:
        s = snap or self.snapshot()
        return {
            "done": s.done,
            "failed": s.failed,
            "in_flight": s.in_flight,
            **{f"{name}_queue": n for name, n in s.queues.items()},
            "batching": s.batching,
            "batches": s.batches,
            "workers_up": s.devices_up,
            "workers": len(s.devices),
            **{f"{name}_up": name not in self.sink_errors for name in s.sinks},
            **({"cluster": s.cluster} if s.cluster is not None else {}),
        }

    def sample(self) -> None:
        """Refresh the gauges (called just before a metrics scrape)."""
        s = self.snapshot()
        for name, n in s.queues.items():
            self.metrics.set_queue_depth(name, n)
        self.metrics.set_queue_depth("batching", s.batching)
        self.metrics.set_in_flight(s.in_flight)
        for device in s.devices:
            self.metrics.device_up(device.device, device.up)

    def sink_state(self, name: str, up: bool, error: str | None) -> None:
        """The sink `name` failed an attempt (it retries), or works again."""
        if up:
            self.metrics.sink_state(name, True)
            if name in self.sink_errors:
                self.notifier.status(f"{name} back after: {self.sink_errors.pop(name)}")
            return
        self.metrics.sink_failed(name)
        if name not in self.sink_errors:
            self.metrics.sink_state(name, False)
            self.notifier.status(f"{name} unavailable, retrying; intake paused: {error}")
        self.sink_errors[name] = error

    def cluster_state(self, up: bool, error: str | None) -> None:
        """The Ray cluster was lost (intake pauses as the claimed inputs wait), or is back."""
        self.metrics.unavailable = None if up else f"Ray cluster lost, reconnecting: {error}"
        self.notifier.status("Ray cluster back" if up else f"Ray cluster lost, reconnecting; intake paused: {error}")

    async def _stats_loop(self, interval_s: float) -> None:
        """A `stats` log line and systemd STATUS every `interval_s` (0: never)."""
        last, last_t = self.snapshot().done, time.monotonic()
        while interval_s > 0:
            await asyncio.sleep(interval_s)  # a period, not a wait for something
            now = time.monotonic()
            snap = self.snapshot()
            summary = self.summary(snap)
            rate = (summary["done"] - last) / (now - last_t)
            last, last_t = summary["done"], now
            log.info("stats", images_per_s=round(rate, 2), **summary)
            self.notifier.status(
                f"{summary['done']} done, {summary['failed']} failed, {summary['in_flight']} in flight, "
                f"{rate:.1f} img/s, {summary['workers_up']}/{summary['workers']} devices up"
                + "".join(f"; {name} unavailable, retrying" for name in self.sink_errors)
                + ("; Ray cluster lost, reconnecting" if snap.cluster_problem else "")
            )

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half the interval, only while the pipeline makes progress or is idle.

        A stuck device or stage therefore lets systemd's watchdog fire. A device being restarted
        counts as alive: its supervisor is making progress of its own.
        """
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        last = -1
        while True:
            await asyncio.sleep(interval)  # a period, not a wait for something
            # Results retrying a write (disk full) are alive too: a restart would not help them.
            # So is a sink retrying a database that is down or locked (both are in `progress`).
            s = self.snapshot()
            if s.progress != last or s.in_flight == 0 or not s.all_up:
                self.notifier.watchdog()
            else:
                log.warning("watchdog_withheld", in_flight=s.in_flight, done=s.done)
            last = s.progress
