"""The Service owns the lifecycle: start-up, serve, then an ordered drain.

    incoming/ --intake--> jobs --preprocess (threads)--> ready --batching--> devices (fleet)
                                                                              |
    output/, done/, failed/ <--results (aiofiles)-- outcomes <----------------+

Every queue is bounded, and `Capacity` bounds the number of claimed, unfinished inputs.
SIGTERM or SIGINT: intake stops, in-flight work drains within `drain_timeout_s`, devices stop,
exit 0. A second signal skips the drain; claimed files stay in processing/ for the next start.
SIGHUP re-reads the config (`daemon.reload`). The devices and their supervision are the
fleet's (`daemon.fleet`); the watchdog, STATUS line and stats are `daemon.health`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from daemon import __version__, batching, export, intake, logs, metrics, preprocess, progress, results, state, tiling
from daemon.config import Config, Decode, TilingConfig
from daemon.devices import Device
from daemon.fleet import Fleet
from daemon.health import Health
from daemon.jobs import Capacity, FailReason, Failure, Inferred, Job, Outcome, Prepared
from daemon.notify import Notifier
from daemon.reload import Reloader
from daemon.sinks import Sink
from daemon.sinks.database import Database, open_database
from daemon.tasks import Task, checkpoint
from daemon.threads import name_os_thread
from daemon.workers import (
    JPEG_SLOT_BYTES,
    cores,
    resolve_decode,
    torch_threads,
)

log = structlog.get_logger("daemon.service")
T = TypeVar("T")
QUEUES = ("jobs", "ready", "outcomes", "batching")


def prep_settings(config: Config, task: str = "detect") -> preprocess.Settings:
    """`task`: the model's, from its device processes (classification crops on the host)."""
    p = config.pipeline
    classify = task == Task.CLASSIFY.value
    device_max_bytes = JPEG_SLOT_BYTES if p.decode is Decode.DEVICE and not classify else 0
    # A classifier is never tiled: refused at start for a .pt (checkpoint.resolve); an exported
    # classifier's task is known only from its devices, and its images are then taken whole.
    tiles = TilingConfig() if classify else config.tiling
    return preprocess.Settings(config.model.imgsz, p.reduced_decode, p.max_pixels, device_max_bytes, classify, tiles)


def knobs(config: Config) -> batching.Knobs:
    p = config.pipeline
    return batching.Knobs(p.max_batch, p.max_wait_ms, config.model.conf, config.model.iou, p.max_attempts)


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
        self.capacity = Capacity(config.pipeline.max_pending)
        self.health = Health(self)
        self.fleet = Fleet(self.metrics, lambda: self.config, self._devices_changed, self.health.cluster_state)
        self.reloader = Reloader(self)
        self.exit_status = 0
        self.database: Database | None = None
        self.queues: dict[str, asyncio.Queue[Any]] = {}

    @property
    def workers(self) -> list[Device]:
        return self.fleet.devices

    def summary(self) -> dict[str, Any]:
        return self.health.summary()

    def _devices_changed(self) -> None:
        self.batcher.wake.set()

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
        logs.set_level(new.log.level)
        self.fleet.set_level(new.log.level)
        self.health.stats_every(new.log.stats_interval_s)
        self.batcher.knobs = knobs(new)
        self.writer.output = new.output
        # An image prepared meanwhile has the old or the new size: both fit the new slots.
        self.settings = prep_settings(new, self.fleet.task)
        self.config = new

    async def run(self) -> int:
        """Serve until stopped (or, with --once, until incoming/ is drained). Returns the exit status."""
        try:
            return await self._run()
        finally:
            await self.fleet.close()  # the Ray backend's driver, if any

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        started = time.monotonic()
        log.info("daemon_starting", version=__version__, config=str(self.config.source), pid=os.getpid())
        cfg = self.config
        cfg = checkpoint.resolve_config(cfg)  # imgsz "auto", refusals: before anything starts
        if cfg.output.database is not None:  # a missing driver stops the start (ConfigError: exit 78)
            self.database = open_database(cfg.output.database, fsync=cfg.output.fsync, on_state=self.health.sink_state)
        devices = await self._unless_stopped(self.fleet.resolve(cfg))
        if devices is None:
            log.info("daemon_stopped", during="start-up", uptime_s=round(time.monotonic() - started, 2))
            return 0
        cfg = self.config = resolve_decode(cfg, devices)
        self.reporter = state.Reporter(
            state.path(cfg.paths.work), config=cfg.source, once=self.once, metrics=cfg.metrics.listen
        )
        self.reporter.start(devices)  # `inferd status` reads this file
        server = await metrics.serve(self.metrics, *cfg.metrics.listen) if cfg.metrics.listen else None
        try:
            plans = await export.prepare(cfg, devices, stop=self.stop, notifier=self.notifier)
        except export.ExportStopped:
            await self._close_server(server)
            self.reporter.stop(None)
            log.info("daemon_stopped", during="model_export", uptime_s=round(time.monotonic() - started, 2))
            return 0
        except BaseException:
            await self._close_server(server)
            self.reporter.stop(None)
            raise
        try:
            infos = await self._start_up(cfg, devices)
        except BaseException:
            await self._close_server(server)
            self.reporter.stop(None)
            raise
        if infos is None:  # a stop request during start-up: every device process is already gone
            await self._close_server(server)
            self.reporter.stop(None)
            log.info("daemon_stopped", during="start-up", uptime_s=round(time.monotonic() - started, 2))
            return 0
        threads = cfg.pipeline.preprocess_threads or cores()
        log.info(
            "daemon_started",
            version=__version__,
            devices=devices,
            model=infos[0]["weights"],
            task=infos[0]["task"],
            imgsz=cfg.model.imgsz,
            runtime=infos[0]["runtime"],
            precision=infos[0]["precision"],
            artefact=infos[0]["artefact"],
            runtimes={p.device: f"{p.runtime} {p.precision}" for p in plans},
            config=str(cfg.source),
            incoming=str(cfg.paths.incoming),
            preprocess_threads=threads,
            torch_threads=torch_threads(cfg, devices),
            decode=cfg.pipeline.decode.value,
            once=self.once,
            pids=self.fleet.pids,
            startup_s=round(time.monotonic() - started, 2),
        )
        size = cfg.pipeline.max_pending
        jobs: asyncio.Queue[Job] = asyncio.Queue(size)
        # Decoded images: only as many as the batcher has room for (Batcher.room); more wait undecoded.
        ready: asyncio.Queue[Prepared] = asyncio.Queue(cfg.pipeline.max_batch * (len(self.fleet.devices) + 1))
        outcomes: asyncio.Queue[list[Outcome]] = asyncio.Queue(size)  # a batch's, or one failure
        pool = ThreadPoolExecutor(threads, "preprocess", initializer=name_os_thread, initargs=("preprocess",))
        # A tiled image's tiles are merged into its result between the batcher and the results stage.
        assembler = tiling.Assembler(outcomes, pool)
        self.batcher = batching.Batcher(ready, self.fleet.devices, assembler, knobs(cfg))
        sinks: list[Sink] = [self.database] if self.database is not None else []
        self.writer = results.Writer(cfg.paths, cfg.output, self._finished, sinks)
        intake_settings = intake.Settings(
            cfg.paths.incoming,
            cfg.paths.work / "processing",
            cfg.intake.settle_ms / 1000,
            cfg.intake.ignore_suffixes,
            cfg.intake.reconcile_interval_s,
            cfg.intake.debounce_ms,
            cfg.intake.force_polling,
            cfg.intake.claim_by_copy,
        )
        self.intake = intake.Intake(intake_settings, self.capacity, jobs, outcomes)
        self.settings = prep_settings(cfg, self.fleet.task)
        stages = [
            loop.create_task(preprocess.run(jobs, ready, outcomes, pool, lambda: self.settings, threads * 2)),
            loop.create_task(self.batcher.run()),
            loop.create_task(results.run(outcomes, self.writer, concurrency=8)),
            loop.create_task(self.fleet.supervise()),
            *([loop.create_task(self.fleet.grow())] if self.fleet.cluster is not None else []),
            *([loop.create_task(self.database.run())] if self.database is not None else []),
        ]
        feeders = [loop.create_task(self._feed())]
        self.queues = {"jobs": jobs, "ready": ready, "outcomes": outcomes}
        self.metrics.on_scrape = self.health.sample
        self.metrics.healthy = True
        self.serving.set()
        self.notifier.ready()
        watchdog = self.health.start(cfg.log.stats_interval_s)
        self.reporter.serving()
        reporting = loop.create_task(self.reporter.run(self))
        display = progress.show(self, once=self.once, log=cfg.log)  # a terminal only
        try:
            await self._until_stopped(stages + feeders)
        finally:
            self.metrics.healthy = False
            self.notifier.stopping()
            display.close()
            self.reporter.draining()
            await self._drain(stages, feeders)
            pool.shutdown(wait=False, cancel_futures=True)
            for task in watchdog:
                task.cancel()
            self.health.stop()
            reporting.cancel()
            await self._close_server(server)
            if self.database is not None:
                await self.database.close()
            self.reporter.stop(self)
        log.info(
            "daemon_stopped",
            done=self.done,
            failed=self.failed,
            claimed=self.intake.claimed,
            left_in_processing=self.capacity.in_flight,
            uptime_s=round(time.monotonic() - started, 2),
        )
        return self.exit_status

    async def _start_up(self, cfg: Config, devices: list[str]) -> list[dict[str, Any]] | None:
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

    @staticmethod
    async def _close_server(server: asyncio.Server | None) -> None:
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _feed(self) -> None:
        await self.intake.recover()
        if self.once:
            await self.intake.scan()
            await self.intake.wait_settled()
            await self.capacity.wait_idle()
            self.stop.set()
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self.intake.watch(self.intake_stop))
            await self.intake.watching.wait()  # the watcher is in place: nothing falls between it and the scan
            await self.intake.scan()
            group.create_task(self.intake.reconcile(self.intake_stop))

    async def _until_stopped(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Wait for a stop request; a stage that dies is a bug, so it stops the daemon too."""
        stopper = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _drain(self, stages: list[asyncio.Task[Any]], feeders: list[asyncio.Task[Any]]) -> None:
        await self.reloader.cancel()  # a reload still starting its devices is dropped; a switch completes
        self.intake_stop.set()
        self.intake.close()
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
