"""The Service owns the lifecycle: workers READY, stages running, then an ordered drain.

    incoming/ --intake--> jobs --preprocess (threads)--> ready --batching--> device processes
                                                                              |
    output/, done/, failed/ <--results (aiofiles)-- outcomes <----------------+

Every queue is bounded, and `Capacity` bounds the number of claimed, unfinished inputs.
SIGTERM or SIGINT: intake stops, in-flight work drains within `drain_timeout_s`, workers stop,
exit 0. A second signal skips the drain; claimed files stay in processing/ for the next start.
SIGHUP re-reads the config: thresholds, batching, output and log level apply at once; a new
model, input size, device list or slot size starts new device processes beside the old ones and
switches over once they are READY. A new config that fails to load or to start changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from daemon import __version__, batching, config, export, intake, logs, metrics, preprocess, progress, results, state
from daemon.config import Backend, Config, ConfigError, Decode
from daemon.devices import Device, WorkerStartError, start_all
from daemon.jobs import Capacity, FailReason, Failure, Inferred, Job, Outcome, Prepared
from daemon.notify import Notifier
from daemon.sinks import Sink
from daemon.sinks.database import Database, open_database
from daemon.tasks import Task, checkpoint
from daemon.threads import name_os_thread
from daemon.workers import (
    JPEG_SLOT_BYTES,
    cores,
    resolve_decode,
    resolve_devices,
    start_workers,
    torch_threads,
)

log = structlog.get_logger("daemon.service")
T = TypeVar("T")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_S = 60.0  # a device process that ran this long before dying restarts at the first backoff step
QUEUES = ("jobs", "ready", "outcomes", "batching")
# Keys whose change needs new device processes (a reload starts them beside the old ones).
ROLL_KEYS = frozenset(
    {
        "model.weights",
        "model.imgsz",
        "model.runtime",
        "model.precision",
        "model.max_det",
        "model.devices",
        "pipeline.torch_threads",
        "pipeline.cpu_workers",
        "pipeline.max_batch",
    }
)
# Keys only a restart applies: the watched folders, the queues, the thread pool, the HTTP endpoint.
RESTART_KEYS = frozenset(
    {"pipeline.max_pending", "pipeline.preprocess_threads", "pipeline.decode", "log.format", "output.database"}
)
RESTART_SECTIONS = ("paths.", "intake.", "metrics.", "cluster.")


def needs_restart(key: str) -> bool:
    return key in RESTART_KEYS or key.startswith(RESTART_SECTIONS)


def reloadable(running: Config, new: Config) -> Config:
    """`new`, with the keys only a restart can change kept at their running values."""
    return dataclasses.replace(
        new,
        paths=running.paths,
        intake=running.intake,
        metrics=running.metrics,
        cluster=running.cluster,
        pipeline=dataclasses.replace(
            new.pipeline,
            max_pending=running.pipeline.max_pending,
            preprocess_threads=running.pipeline.preprocess_threads,
            decode=running.pipeline.decode,  # the slots are sized for it
        ),
        log=dataclasses.replace(new.log, format=running.log.format),
        output=dataclasses.replace(new.output, database=running.output.database),  # the sink's connection
    )


def prep_settings(config: Config, task: str = "detect") -> preprocess.Settings:
    """`task`: the model's, from its device processes (classification crops on the host)."""
    p = config.pipeline
    classify = task == Task.CLASSIFY.value
    device_max_bytes = JPEG_SLOT_BYTES if p.decode is Decode.DEVICE and not classify else 0
    return preprocess.Settings(config.model.imgsz, p.reduced_decode, p.max_pixels, device_max_bytes, classify)


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
        self.workers: list[Device] = []  # the batcher's list: a reload swaps its contents
        self.supervisors = asyncio.TaskGroup()
        self.supervised: dict[Device, asyncio.Task[None]] = {}
        self.reloading: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None]
        self.reload_again = False
        self.exit_status = 0
        self.database: Database | None = None
        self.sink_error: str | None = None  # why the database sink fails now; None while it works
        self.cluster: Any = None  # daemon.cluster.Cluster with [cluster] backend = "ray" (imported only then)

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

    def _sink_state(self, up: bool, error: str | None) -> None:
        """The database sink failed an attempt (it retries), or works again."""
        if up:
            self.metrics.sink_state("database", True)
            if self.sink_error is not None:
                self.notifier.status(f"database back after: {self.sink_error}")
            self.sink_error = None
            return
        self.metrics.sink_failed("database")
        if self.sink_error is None:
            self.metrics.sink_state("database", False)
            self.notifier.status(f"database unavailable, retrying; intake paused: {error}")
        self.sink_error = error

    def _on_reload(self) -> None:
        """SIGHUP: reload in a task; a SIGHUP during a reload asks for one more pass after it."""
        if self.stop.is_set():
            log.warning("reload_refused", reason="stopping")
        elif self.reloading is not None and not self.reloading.done():
            self.reload_again = True
            log.info("reload_queued", reason="a reload is in progress")
        else:
            self.reloading = asyncio.get_running_loop().create_task(self._reload())
            self.reloading.add_done_callback(self._reload_ended)

    async def _reload(self) -> None:
        await self.serving.wait()  # a SIGHUP during start-up is served once the pipeline runs
        self.reload_again = True
        while self.reload_again and not self.stop.is_set():
            self.reload_again = False
            self.notifier.reloading()
            await self._reload_once()
            self.notifier.ready()

    def _reload_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("reload_crashed", exc_info=exc)  # a bug: stop rather than run half reloaded
            self.exit_status = 1
            self.stop.set()

    async def _reload_once(self) -> None:
        """Apply the config file: all of it, or (it does not load, its model does not start) nothing."""
        running = self.config
        try:
            read = config.load(running.source) if running.source else running
            read = checkpoint.resolve_config(read)  # imgsz "auto": the new checkpoint's
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        read = resolve_decode(read, [w.device for w in self.workers])  # "auto" as it was resolved at start
        restart = sorted(key for key in config.differences(running, read) if needs_restart(key))
        if restart:
            log.warning("reload_needs_restart", keys=restart)
        new = reloadable(running, read)
        changed = sorted(config.differences(running, new))
        roll = not ROLL_KEYS.isdisjoint(changed)
        log.info("reload_started", changed=changed, restart_workers=roll)
        fresh: list[Device] = []
        if roll:
            try:
                fresh = await self._start_fresh(new)
            except (WorkerStartError, OSError) as exc:
                log.error("reload_failed", error=str(exc), changed=changed)
                return
            await self._switch(new, fresh)
        else:
            self._apply(new)
        log.info("reload_done", applied=changed, workers_restarted=len(fresh), pids=[w.pid for w in self.workers])

    async def _start_fresh(self, new: Config) -> list[Device]:
        """Start the new config's workers one at a time, while the old ones serve.

        Their slots keep room for images letterboxed before the switch, at the old imgsz.
        """
        room = max([new.model.imgsz, *(w.slot_imgsz for w in self.workers)])
        devices = await self._resolve_devices(new)
        try:
            await export.prepare(new, devices, stop=self.stop, notifier=self.notifier)
        except export.ExportStopped:
            raise WorkerStartError("stopping during the model export", permanent=False) from None
        fresh = self._make_devices(new, devices, slot_imgsz=room)
        try:
            for worker in fresh:
                await worker.start(new.pipeline.worker_start_timeout_s)
        except BaseException:  # a start failed, or the drain cancelled the reload: leave nothing running
            await asyncio.gather(*(w.stop(0) for w in fresh))
            raise
        return fresh

    async def _switch(self, new: Config, fresh: list[Device]) -> None:
        """Retire the old workers, then hand the batcher the new ones and apply `new`.

        Retiring: no new batch goes to them, they answer the batches they hold (stop() queues its
        None behind those), and exit; their supervisors are cancelled first, so this is neither a
        crash nor a retry. Until then (a batch time) no batch is sent at all, so the results of
        the old model are in before the writer names the new one.
        """
        old = self.workers[:]
        self.workers.clear()
        for worker in old:
            self.supervised.pop(worker).cancel()
        log.info("reload_switching", retiring=[w.pid for w in old], batches_in_flight=sum(w.in_flight for w in old))
        retiring = asyncio.ensure_future(self._retire(old, new.pipeline.drain_timeout_s))
        try:
            await asyncio.shield(retiring)
        except asyncio.CancelledError:  # a stop request: the switch is short, finish it first
            await retiring
            raise
        finally:
            self.workers.extend(fresh)
            for worker in fresh:
                self._supervise_worker(worker)
            for device in {w.device for w in old} - {w.device for w in fresh}:
                self.metrics.worker_up(device, False)
            self._apply(new)
            self.batcher.wake.set()

    @staticmethod
    async def _retire(workers: list[Device], timeout_s: float) -> None:
        # stop() first sends the batches being copied into their slots; a batch handed over that
        # had not reached its slot yet comes back to the batcher (WorkerRetired) for the new ones.
        await asyncio.gather(*(w.stop(timeout_s) for w in workers))

    def _apply(self, new: Config) -> None:
        """Make `new` the running config; the workers already serve its model."""
        logs.set_level(new.log.level)
        for worker in self.workers:
            worker.set_level(new.log.level)
        if new.log.stats_interval_s != self.config.log.stats_interval_s:
            self._stats_task.cancel()
            self._stats_task = asyncio.get_running_loop().create_task(self._stats(new.log.stats_interval_s))
        self.batcher.knobs = knobs(new)
        self.writer.output = new.output
        # An image prepared meanwhile has the old or the new size: both fit the new slots.
        self.settings = prep_settings(new, self._task())
        self.config = new

    def _task(self) -> str:
        """The task of the model the workers serve (they all load the same weights)."""
        return str(self.workers[0].info.get("task", "detect")) if self.workers else "detect"

    async def run(self) -> int:
        """Serve until stopped (or, with --once, until incoming/ is drained). Returns the exit status."""
        try:
            return await self._run()
        finally:
            if self.cluster is not None:
                await self.cluster.close()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        started = time.monotonic()
        log.info("daemon_starting", version=__version__, config=str(self.config.source), pid=os.getpid())
        cfg = self.config
        cfg = checkpoint.resolve_config(cfg)  # imgsz "auto", refusals: before anything starts
        if cfg.output.database is not None:  # a missing driver stops the start (ConfigError: exit 78)
            self.database = open_database(cfg.output.database, fsync=cfg.output.fsync, on_state=self._sink_state)
        devices = await self._unless_stopped(self._resolve_devices(cfg))
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
            pids=[w.pid for w in self.workers],
            startup_s=round(time.monotonic() - started, 2),
        )
        size = cfg.pipeline.max_pending
        jobs: asyncio.Queue[Job] = asyncio.Queue(size)
        # Decoded images: only as many as the batcher has room for (Batcher.room); more wait undecoded.
        ready: asyncio.Queue[Prepared] = asyncio.Queue(cfg.pipeline.max_batch * (len(self.workers) + 1))
        outcomes: asyncio.Queue[Outcome] = asyncio.Queue(size)
        self.batcher = batching.Batcher(ready, self.workers, outcomes, knobs(cfg))
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
        pool = ThreadPoolExecutor(threads, "preprocess", initializer=name_os_thread, initargs=("preprocess",))
        self.settings = prep_settings(cfg, self._task())
        stages = [
            loop.create_task(preprocess.run(jobs, ready, outcomes, pool, lambda: self.settings, threads * 2)),
            loop.create_task(self.batcher.run()),
            loop.create_task(results.run(outcomes, self.writer, concurrency=16)),
            loop.create_task(self._supervision()),
            *([loop.create_task(self.database.run())] if self.database is not None else []),
            *([loop.create_task(self._grow_cluster())] if self.cluster is not None else []),
        ]
        feeders = [loop.create_task(self._feed())]
        self.queues: dict[str, asyncio.Queue[Any]] = {"jobs": jobs, "ready": ready, "outcomes": outcomes}
        self.metrics.on_scrape = self._sample
        self.metrics.healthy = True
        self.serving.set()
        self.notifier.ready()
        watchdog = loop.create_task(self._watchdog())
        self._stats_task = loop.create_task(self._stats(cfg.log.stats_interval_s))
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
            watchdog.cancel()
            self._stats_task.cancel()
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
        self.workers[:] = self._make_devices(cfg, devices)
        log.info("workers_starting", devices=devices, timeout_s=cfg.pipeline.worker_start_timeout_s)
        return await self._unless_stopped(start_all(self.workers, cfg.pipeline.worker_start_timeout_s))

    # --- The device backend: local processes, or actors on a Ray cluster ([cluster] backend). ---

    async def _resolve_devices(self, cfg: Config) -> list[str]:
        if cfg.cluster.backend is Backend.RAY:
            from daemon.cluster import Cluster

            if self.cluster is None:
                self.cluster = Cluster(cfg, on_state=self._cluster_state)
            names: list[str] = await self.cluster.resolve_devices()
            return names
        return await resolve_devices(cfg)

    def _make_devices(self, cfg: Config, devices: list[str], *, slot_imgsz: int = 0) -> list[Device]:
        if self.cluster is not None:
            made: list[Device] = self.cluster.devices(cfg, devices, slot_imgsz=slot_imgsz)
            return made
        return start_workers(cfg, devices, slot_imgsz=slot_imgsz)

    async def _grow_cluster(self) -> None:
        """A device for each GPU (or CPU node) the cluster gains, with the running config."""
        await self.cluster.grow(lambda: self.config, self._add_device)

    async def _add_device(self, device: Device) -> None:
        """A started device for a node the cluster gained: the batcher takes it, a supervisor keeps it."""
        self.workers.append(device)
        self._supervise_worker(device)
        self.batcher.wake.set()
        log.info("device_added", device=device.device, pid=device.pid, devices=len(self.workers))

    def _cluster_state(self, up: bool, error: str | None) -> None:
        """The Ray cluster was lost (intake pauses as the claimed inputs wait), or is back."""
        self.metrics.unavailable = None if up else f"Ray cluster lost, reconnecting: {error}"
        self.notifier.status("Ray cluster back" if up else f"Ray cluster lost, reconnecting; intake paused: {error}")

    # --- end of the device backend ---

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
        if self.reloading is not None and not self.reloading.done():
            self.reloading.cancel()  # a reload still starting its workers is dropped; a switch completes
            await asyncio.wait([self.reloading])
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
        await asyncio.gather(*(w.stop(0 if self.force.is_set() else 10) for w in self.workers))

    async def _supervision(self) -> None:
        """The supervisors of the current workers (a reload swaps them); one that fails is a bug."""
        async with self.supervisors:
            for worker in self.workers:
                self._supervise_worker(worker)
            await asyncio.Future()  # supervise until the drain cancels this stage

    def _supervise_worker(self, worker: Device) -> None:
        self.supervised[worker] = self.supervisors.create_task(self._supervise(worker))

    async def _supervise(self, worker: Device) -> None:
        """Restart a device process that died, with backoff; its batches were already re-queued.

        The backoff grows while the process keeps dying soon after a start (or fails to start),
        and falls back to its first step once a process has run for STABLE_S.
        """
        failures = 0
        up_since = time.monotonic()
        while True:
            await worker.wait_exit()
            await worker.stop(0)
            failures = failures + 1 if time.monotonic() - up_since < STABLE_S else 0
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.error("worker_exited", device=worker.device, restart_in_s=delay, restarts=worker.restarts)
            while True:
                await asyncio.sleep(delay)  # backoff: a crash loop must not spin
                try:
                    await worker.start(self.config.pipeline.worker_start_timeout_s)
                    break
                except (WorkerStartError, OSError) as exc:  # OSError: no pipe or process to be had now
                    failures += 1
                    delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
                    log.error("worker_restart_failed", device=worker.device, error=str(exc), retry_in_s=delay)
            up_since = time.monotonic()
            worker.restarts += 1
            self.metrics.worker_restarted(worker.device)
            log.info("worker_restarted", device=worker.device, pid=worker.pid, restarts=worker.restarts)
            self.batcher.wake.set()

    def _sample(self) -> None:
        """Refresh the gauges (called just before a metrics scrape)."""
        for name, q in self.queues.items():
            self.metrics.set_queue_depth(name, q.qsize())
        self.metrics.set_queue_depth("batching", self.batcher.waiting)
        self.metrics.set_in_flight(self.capacity.in_flight)
        for worker in self.workers:
            self.metrics.worker_up(worker.device, worker.up)

    def summary(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "failed": self.failed,
            "in_flight": self.capacity.in_flight,
            **{f"{name}_queue": q.qsize() for name, q in self.queues.items()},
            "batching": self.batcher.waiting,
            "batches": self.batcher.batches,
            "workers_up": sum(w.up for w in self.workers),
            "workers": len(self.workers),
            **({"database_up": self.sink_error is None} if self.database is not None else {}),
            **({"cluster": self.cluster.state.value} if self.cluster is not None else {}),
        }

    async def _stats(self, interval_s: float) -> None:
        """A `stats` log line and systemd STATUS every `interval_s` (0: never); a reload that
        changes log.stats_interval_s replaces this task."""
        last, last_t = self.done, time.monotonic()
        while interval_s > 0:
            await asyncio.sleep(interval_s)  # a period, not a wait for something
            now = time.monotonic()
            s = self.summary()
            rate = (s["done"] - last) / (now - last_t)
            last, last_t = s["done"], now
            log.info("stats", images_per_s=round(rate, 2), **s)
            self.notifier.status(
                f"{s['done']} done, {s['failed']} failed, {s['in_flight']} in flight, {rate:.1f} img/s, "
                f"{s['workers_up']}/{s['workers']} devices up"
                + ("" if self.sink_error is None else "; database unavailable, retrying")
                + ("" if self.cluster is None or self.cluster.problem is None else "; Ray cluster lost, reconnecting")
            )

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half the interval, only while the pipeline makes progress or is idle.

        A stuck device or stage therefore lets systemd's watchdog fire. A worker being restarted
        counts as alive: its supervisor is making progress of its own.
        """
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        last = -1
        while True:
            await asyncio.sleep(interval)  # a period, not a wait for something
            # Results retrying a write (disk full) are alive too: a restart would not help them.
            # So is a sink retrying a database that is down or locked.
            progress = self.done + self.failed + self.writer.write_errors + sum(s.failures for s in self.writer.sinks)
            if progress != last or self.capacity.in_flight == 0 or not all(w.up for w in self.workers):
                self.notifier.watchdog()
            else:
                log.warning("watchdog_withheld", in_flight=self.capacity.in_flight, done=self.done)
            last = progress
