"""The Service owns the lifecycle: start-up, serve, then an ordered drain.

    incoming/ --intake--> jobs --preprocess (threads)--> ready --batching--> devices (fleet)
                                                                              |
    output/, done/, failed/ <--results (aiofiles)-- outcomes <----------------+

Every queue is bounded, and `Capacity` bounds the number of claimed, unfinished inputs.
SIGTERM or SIGINT: intake stops, in-flight work drains within `drain_timeout_s`, devices stop,
exit 0. A second signal skips the drain; claimed files stay in processing/ for the next start.
SIGHUP re-reads the config (`daemon.reload`). The devices and their supervision are the
fleet's (`daemon.fleet`); the watchdog, STATUS line and stats are `daemon.health`'s.

`run` is three phases, as uvicorn's Server: `startup` (sinks, devices resolved, the model
exported and loaded), `serve` (the stages, until a stop request) and `drain`. Every resource is
entered into one AsyncExitStack as it is acquired, so an early exit from any phase releases
exactly what was acquired, in reverse order. The modules below are handed what they need (a
`Snapshot` callable, the reloader's narrow interface), never the Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

from daemon import __version__, export, intake, logs, metrics, preprocess, progress, results, sinks, state
from daemon.config import Config
from daemon.errors import ExportStopped
from daemon.fleet import Fleet
from daemon.health import Health
from daemon.jobs import Capacity, FailReason, Failure, Inferred, Outcome
from daemon.local import (
    cores,
    resolve_decode,
    torch_threads,
)
from daemon.messages import DeviceInfo
from daemon.notify import Notifier
from daemon.pipeline import QUEUES, Pipeline, knobs
from daemon.pipeline import prep_settings as prep_settings  # re-exported: its old home
from daemon.reload import Reloader
from daemon.sinks import Sink
from daemon.snapshot import DeviceStatus, Snapshot
from daemon.tasks import checkpoint

log = structlog.get_logger("daemon.service")
T = TypeVar("T")


class Service:
    def __init__(self, config: Config, *, once: bool = False, notifier: Notifier | None = None) -> None:
        self.config = config
        self.once = once
        self.notifier = notifier or Notifier(None, None)
        self.metrics = metrics.Metrics(devices=(), failure_reasons=[r.value for r in FailReason], queues=QUEUES)
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.intake_stop = asyncio.Event()
        self.serving = asyncio.Event()  # the pipeline runs: a reload can be applied
        self.done = 0
        self.failed = 0
        self.exit_status = 0
        self.started = time.monotonic()
        self.capacity = Capacity(config.pipeline.max_pending)
        self.health = Health(self.metrics, self.notifier, self.snapshot)
        self.fleet = Fleet(self.metrics, lambda: self.config, self._devices_changed, self.health.cluster_state)
        self.reloader = Reloader(
            self.fleet,
            self.notifier,
            running=lambda: self.config,
            apply=self.apply,
            stop=self.stop,
            serving=self.serving,
            fail=self.fail,
        )
        self.sinks: list[Sink] = []
        self.reporter: state.Reporter | None = None
        self.pipeline: Pipeline | None = None
        self.settings: preprocess.PrepSettings | None = None
        self.stopped_during: str | None = None  # the start-up phase a stop request ended the run in

    def snapshot(self) -> Snapshot:
        """The counters of the running pipeline (safe from another thread: ints and copies)."""
        p = self.pipeline
        backend = self.fleet.backend
        return Snapshot(
            done=self.done,
            failed=self.failed,
            in_flight=self.capacity.in_flight,
            found=p.intake.found if p else 0,
            queues={name: q.qsize() for name, q in p.queues.items()} if p else {},
            batching=p.batcher.waiting if p else 0,
            batches=p.batcher.batches if p else 0,
            devices=tuple(DeviceStatus(d.device, d.state, d.up, d.pid, d.restarts) for d in list(self.fleet.devices)),
            progress=self.done
            + self.failed
            + (p.writer.write_errors if p else 0)
            + sum(x.failures for x in self.sinks),
            sinks=tuple(s.name for s in self.sinks),
            cluster=backend.state if backend is not None else None,
            cluster_problem=backend is not None and backend.problem is not None,
        )

    def fail(self, exit_status: int) -> None:
        """Stop the daemon, to exit with `exit_status` (a reload crashed: a bug)."""
        self.exit_status = exit_status
        self.stop.set()

    def _devices_changed(self) -> None:
        if self.pipeline is not None:
            self.pipeline.batcher.wake.set()

    def _on_signal(self, signum: int) -> None:
        if self.stop.is_set():
            log.warning("forced_stop", signal=signal.Signals(signum).name, in_flight=self.capacity.in_flight)
            self.force.set()
        else:
            log.info("stop_requested", signal=signal.Signals(signum).name)
            self.stop.set()

    def _finished(self, outcome: Outcome, written: bool) -> None:
        """An input left the pipeline: done, failed, or (not written) left in processing/."""
        if isinstance(outcome, Inferred) and written:
            job = outcome.prepared.job
            total = (time.monotonic() - job.claimed_at) * 1000
            self.metrics.image_done(outcome.device, {**job.timings_ms, "total": total}, outcome.batch_size)
            self.metrics.found(outcome.payload.task.value, outcome.payload.counts(outcome.model.names))
            self.done += 1
        else:
            reason = outcome.error.reason.value if isinstance(outcome, Failure) and written else "write_error"
            self.metrics.image_failed(reason)
            self.failed += 1
        self.capacity.release()

    def apply(self, new: Config) -> None:
        """Make `new` the running config; the devices already serve its model."""
        assert self.pipeline is not None  # a reload waits for `serving`
        logs.set_level(new.log.level)
        self.fleet.set_level(new.log.level)
        self.health.stats_every(new.log.stats_interval_s)
        self.pipeline.batcher.knobs = knobs(new)
        self.pipeline.writer.output = new.output
        # An image prepared meanwhile has the old or the new size: both fit the new slots.
        self.settings = prep_settings(new, self.fleet.task)
        self.config = new

    async def run(self) -> int:
        """Serve until stopped (or, with --once, until incoming/ is drained). Returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        self.started = time.monotonic()
        log.info("daemon_starting", version=__version__, config=str(self.config.source), pid=os.getpid())
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.fleet.close)  # the Ray backend's driver, if any
            stack.push(self._log_stopped)
            if await self.startup(stack):
                await self.serve(stack)
        return self.exit_status

    async def startup(self, stack: contextlib.AsyncExitStack) -> bool:
        """Sinks, devices, the model exported and loaded on each; False if a stop request came first."""
        cfg = checkpoint.resolve_config(self.config)  # imgsz "auto", refusals: before anything starts
        try:  # runtime/precision "auto" on a CPU: measured on the first start, then cached
            cfg = await export.resolve(cfg, stop=self.stop, notifier=self.notifier)
        except ExportStopped:
            self.stopped_during = "runtime_tune"
            return False
        self.sinks = sinks.make(cfg.output, self.health.sink_state)  # a missing driver: ConfigError (exit 78)
        for sink in self.sinks:
            stack.push_async_callback(sink.close)
        devices = await self._unless_stopped(self.fleet.resolve(cfg))
        if devices is None:
            self.stopped_during = "start-up"
            return False
        cfg = self.config = resolve_decode(cfg, devices)
        reporter = self.reporter = state.Reporter(
            state.path(cfg.paths.work), config=cfg.source, once=self.once, metrics=cfg.metrics.listen
        )
        reporter.start(devices)  # `inferd status` reads this file
        stack.callback(lambda: reporter.stop((self.snapshot(), self.metrics) if self.pipeline else None))
        if cfg.metrics.listen:
            server = await metrics.serve(self.metrics, *cfg.metrics.listen)
            stack.push_async_callback(_close_server, server)
        try:
            plans = await self.fleet.prepare(cfg, devices, stop=self.stop, notifier=self.notifier)
        except ExportStopped:
            self.stopped_during = "model_export"
            return False
        infos = await self._start_up(cfg, devices)
        if infos is None:  # a stop request during start-up: every device process is already gone
            self.stopped_during = "start-up"
            return False
        log.info(
            "daemon_started",
            version=__version__,
            devices=devices,
            model=infos[0].weights,
            task=infos[0].task,
            imgsz=cfg.model.imgsz,
            runtime=infos[0].runtime,
            precision=infos[0].precision,
            artefact=infos[0].artefact,
            runtimes={p.device: f"{p.runtime} {p.precision}" for p in plans},
            config=str(cfg.source),
            incoming=str(cfg.paths.incoming),
            preprocess_threads=cfg.pipeline.preprocess_threads or cores(),
            torch_threads=torch_threads(cfg, devices),
            decode=cfg.pipeline.decode.value,
            once=self.once,
            pids=self.fleet.pids,
            startup_s=round(time.monotonic() - self.started, 2),
        )
        return True

    async def serve(self, stack: contextlib.AsyncExitStack) -> None:
        """Run the stages until a stop request (or a stage that dies), then drain."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        p = self.pipeline = Pipeline.build(cfg, self.fleet.devices, self.capacity, self._finished, self.sinks)
        stack.callback(p.pool.shutdown, wait=False, cancel_futures=True)
        q = p.queues
        self.settings = prep_settings(cfg, self.fleet.task)
        stages = [
            loop.create_task(
                preprocess.run(q["jobs"], q["ready"], q["outcomes"], p.pool, self._settings, 2 * p.threads)
            ),
            loop.create_task(p.batcher.run()),
            loop.create_task(results.run(q["outcomes"], p.writer, concurrency=8)),
            loop.create_task(self.fleet.supervise()),
            loop.create_task(self.fleet.grow()),  # a device for each one the backend gains (Ray)
            *(loop.create_task(sink.run()) for sink in self.sinks),
        ]
        feeders = [loop.create_task(self._feed(p.intake))]
        self.metrics.on_scrape = self.health.sample
        self.metrics.healthy = True
        self.serving.set()
        self.notifier.ready()
        watchdog = self.health.start(cfg.log.stats_interval_s)
        stack.callback(self.health.stop)
        assert self.reporter is not None
        self.reporter.serving()
        reporting = loop.create_task(self.reporter.run(self.snapshot, self.metrics))
        for task in [*watchdog, reporting]:
            stack.callback(task.cancel)
        display = progress.show(self.snapshot, once=self.once, log=cfg.log)  # a terminal only
        try:
            await self._until_stopped(stages + feeders)
        finally:
            self.metrics.healthy = False
            self.notifier.stopping()
            display.close()
            self.reporter.draining()
            await self.drain(p, stages, feeders)

    def _settings(self) -> preprocess.PrepSettings:
        assert self.settings is not None
        return self.settings

    def _log_stopped(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        """The run's last line (none if it ends in an exception: the caller reports that)."""
        uptime_s = round(time.monotonic() - self.started, 2)
        if exc_type is not None:
            return False
        if self.pipeline is None:
            log.info("daemon_stopped", during=self.stopped_during, uptime_s=uptime_s)
            return False
        log.info(
            "daemon_stopped",
            done=self.done,
            failed=self.failed,
            claimed=self.pipeline.intake.claimed,
            left_in_processing=self.capacity.in_flight,
            uptime_s=uptime_s,
        )
        return False

    async def _start_up(self, cfg: Config, devices: list[str]) -> list[DeviceInfo] | None:
        """Start a device process per device and wait for READY; None if a stop came first."""
        self.notifier.status("loading the model on " + ", ".join(devices))
        log.info("workers_starting", devices=devices, timeout_s=cfg.pipeline.worker_start_timeout_s)
        fleet = self.fleet.make(cfg, devices)
        return await self._unless_stopped(self.fleet.start(fleet, cfg.pipeline.worker_start_timeout_s))

    async def _unless_stopped(self, step: Coroutine[Any, Any, T]) -> T | None:
        """`step`'s result, or None if a stop request came first (`step` is then cancelled: it
        must leave nothing running). SIGTERM is handled promptly in every phase of start-up."""
        task = asyncio.ensure_future(step)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        log.info("start_abandoned", reason="stop requested")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _feed(self, intake: intake.Intake) -> None:
        await intake.recover()
        if self.once:
            await intake.scan()
            await intake.wait_settled()
            await self.capacity.wait_idle()
            self.stop.set()
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(intake.watch(self.intake_stop))
            await intake.watching.wait()  # the watcher is in place: nothing falls between it and the scan
            await intake.scan()
            group.create_task(intake.reconcile(self.intake_stop))

    async def _until_stopped(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Wait for a stop request; a stage that dies is a bug, so it stops the daemon too."""
        stopper = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def drain(self, p: Pipeline, stages: list[asyncio.Task[Any]], feeders: list[asyncio.Task[Any]]) -> None:
        """Intake closes, in-flight work finishes within drain_timeout_s, the stages and devices stop."""
        await self.reloader.cancel()  # a reload still starting its devices is dropped; a switch completes
        self.intake_stop.set()
        p.intake.close()
        for task in feeders:
            task.cancel()
        await asyncio.gather(*feeders, return_exceptions=True)
        if self.capacity.in_flight and not self.force.is_set():
            log.info("draining", in_flight=self.capacity.in_flight, timeout_s=self.config.pipeline.drain_timeout_s)
            waiters = [asyncio.create_task(self.capacity.wait_idle()), asyncio.create_task(self.force.wait())]
            await asyncio.wait(
                waiters, timeout=self.config.pipeline.drain_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waiters:
                waiter.cancel()
        if self.capacity.in_flight:
            log.warning("drain_incomplete", left_in_processing=self.capacity.in_flight)
        for task in stages:
            task.cancel()
        await asyncio.gather(*stages, return_exceptions=True)
        await self.fleet.stop(0 if self.force.is_set() else 10)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()
