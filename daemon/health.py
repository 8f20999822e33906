"""What the service tells the outside while it serves: systemd's watchdog and STATUS line, the
periodic `stats` record, the gauges sampled before a metrics scrape, and the sinks' state."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from daemon.service import Service

log = structlog.get_logger("daemon.service")


class Health:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.sink_error: str | None = None  # why the database sink fails now; None while it works
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

    def summary(self) -> dict[str, Any]:
        s = self.service
        return {
            "done": s.done,
            "failed": s.failed,
            "in_flight": s.capacity.in_flight,
            **{f"{name}_queue": q.qsize() for name, q in s.queues.items()},
            "batching": s.batcher.waiting,
            "batches": s.batcher.batches,
            "workers_up": s.fleet.up,
            "workers": len(s.fleet.devices),
            **({"database_up": self.sink_error is None} if s.database is not None else {}),
            **({"cluster": s.fleet.cluster.state.value} if s.fleet.cluster is not None else {}),
        }

    def sample(self) -> None:
        """Refresh the gauges (called just before a metrics scrape)."""
        s = self.service
        for name, q in s.queues.items():
            s.metrics.set_queue_depth(name, q.qsize())
        s.metrics.set_queue_depth("batching", s.batcher.waiting)
        s.metrics.set_in_flight(s.capacity.in_flight)
        for device in s.fleet.devices:
            s.metrics.worker_up(device.device, device.up)

    def sink_state(self, up: bool, error: str | None) -> None:
        """The database sink failed an attempt (it retries), or works again."""
        s = self.service
        if up:
            s.metrics.sink_state("database", True)
            if self.sink_error is not None:
                s.notifier.status(f"database back after: {self.sink_error}")
            self.sink_error = None
            return
        s.metrics.sink_failed("database")
        if self.sink_error is None:
            s.metrics.sink_state("database", False)
            s.notifier.status(f"database unavailable, retrying; intake paused: {error}")
        self.sink_error = error

    def cluster_state(self, up: bool, error: str | None) -> None:
        """The Ray cluster was lost (intake pauses as the claimed inputs wait), or is back."""
        s = self.service
        s.metrics.unavailable = None if up else f"Ray cluster lost, reconnecting: {error}"
        s.notifier.status("Ray cluster back" if up else f"Ray cluster lost, reconnecting; intake paused: {error}")

    async def _stats_loop(self, interval_s: float) -> None:
        """A `stats` log line and systemd STATUS every `interval_s` (0: never)."""
        s = self.service
        last, last_t = s.done, time.monotonic()
        while interval_s > 0:
            await asyncio.sleep(interval_s)  # a period, not a wait for something
            now = time.monotonic()
            summary = self.summary()
            cluster = s.fleet.cluster
            rate = (summary["done"] - last) / (now - last_t)
            last, last_t = summary["done"], now
            log.info("stats", images_per_s=round(rate, 2), **summary)
            s.notifier.status(
                f"{summary['done']} done, {summary['failed']} failed, {summary['in_flight']} in flight, "
                f"{rate:.1f} img/s, {summary['workers_up']}/{summary['workers']} devices up"
                + ("" if self.sink_error is None else "; database unavailable, retrying")
                + ("" if cluster is None or cluster.problem is None else "; Ray cluster lost, reconnecting")
            )

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half the interval, only while the pipeline makes progress or is idle.

        A stuck device or stage therefore lets systemd's watchdog fire. A device being restarted
        counts as alive: its supervisor is making progress of its own.
        """
        s = self.service
        interval = s.notifier.watchdog_interval_s
        if interval is None:
            return
        last = -1
        while True:
            await asyncio.sleep(interval)  # a period, not a wait for something
            # Results retrying a write (disk full) are alive too: a restart would not help them.
            # So is a sink retrying a database that is down or locked.
            progress = s.done + s.failed + s.writer.write_errors + sum(sink.failures for sink in s.writer.sinks)
            if progress != last or s.capacity.in_flight == 0 or not s.fleet.all_up:
                s.notifier.watchdog()
            else:
                log.warning("watchdog_withheld", in_flight=s.capacity.in_flight, done=s.done)
            last = progress
