"""The Service owns the lifecycle: workers READY, stages running, then an ordered drain.

    incoming/ --intake--> jobs --preprocess (threads)--> ready --batching--> device processes
                                                                              |
    output/, done/, failed/ <--results (aiofiles)-- outcomes <----------------+

Every queue is bounded, and `Capacity` bounds the number of claimed, unfinished inputs.
SIGTERM or SIGINT: intake stops, in-flight work drains within `drain_timeout_s`, workers stop,
exit 0. A second signal skips the drain; claimed files stay in processing/ for the next start.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from daemon import __version__, batching, config, intake, logs, metrics, preprocess, results
from daemon.config import Config, ConfigError
from daemon.jobs import Capacity, FailReason, Failure, Inferred, Job, Outcome, Prepared
from daemon.notify import Notifier
from daemon.workers import DeviceWorker, WorkerStartError

log = structlog.get_logger("daemon.service")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
QUEUES = ("jobs", "ready", "outcomes", "batching")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def resolve_devices(devices: tuple[str, ...]) -> list[str]:
    """'auto' is every CUDA device, or the CPU when there is none."""
    if devices != ("auto",):
        return list(devices)
    import torch  # only here: the main process needs no torch otherwise

    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def torch_threads(config: Config, devices: list[str]) -> int:
    """Intra-op threads per device process: a CUDA worker needs few; CPU workers share the cores."""
    if config.pipeline.torch_threads:
        return config.pipeline.torch_threads
    cpu_workers = sum(d == "cpu" for d in devices)
    return max(1, cores() // cpu_workers) if cpu_workers and devices == ["cpu"] * cpu_workers else 2


def start_workers(config: Config, devices: list[str]) -> list[DeviceWorker]:
    threads = torch_threads(config, devices)
    m = config.model
    return [
        DeviceWorker(
            dict(
                device=d,
                weights=m.weights,
                imgsz=m.imgsz,
                half=m.half,
                max_det=m.max_det,
                torch_threads=threads,
                log=config.log,
            ),
            max_batch=config.pipeline.max_batch,
        )
        for d in devices
    ]


class Service:
    def __init__(self, config: Config, *, once: bool = False, notifier: Notifier | None = None) -> None:
        self.config = config
        self.once = once
        self.notifier = notifier or Notifier(None, None)
        self.metrics = metrics.Metrics(devices=(), failure_reasons=[r.value for r in FailReason], queues=QUEUES)
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.intake_stop = asyncio.Event()
        self.done = 0
        self.failed = 0
        self.capacity = Capacity(config.pipeline.max_pending)
        self.workers: list[DeviceWorker] = []

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
            self.done += 1
        else:
            reason = outcome.error.reason.value if isinstance(outcome, Failure) and written else "write_error"
            self.metrics.image_failed(reason)
            self.failed += 1
        self.capacity.release()

    def _on_reload(self) -> None:
        """SIGHUP: apply what is safe live (thresholds, batching, log level); keep the old config on error."""
        self.notifier.reloading()
        try:
            new = config.load(self.config.source) if self.config.source else self.config
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
        else:
            logs.set_level(new.log.level)
            self.batcher.knobs = batching.Knobs(
                new.pipeline.max_batch,
                new.pipeline.max_wait_ms,
                new.model.conf,
                new.model.iou,
                new.pipeline.max_attempts,
            )
            live = {
                "model.conf",
                "model.iou",
                "pipeline.max_batch",
                "pipeline.max_wait_ms",
                "pipeline.max_attempts",
                "log.level",
                "log.stats_interval_s",
            }
            changed = sorted(config.differences(self.config, new))
            restart = [key for key in changed if key not in live]
            log.info("reload_done", applied=[k for k in changed if k in live], needs_restart=restart)
            self.config = new
        self.notifier.ready()

    async def run(self) -> int:
        """Serve until stopped (or, with --once, until incoming/ is drained). Returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        started = time.monotonic()
        cfg = self.config
        devices = resolve_devices(cfg.model.devices)
        server = await metrics.serve(self.metrics, *cfg.metrics.listen) if cfg.metrics.listen else None
        self.notifier.status("loading the model on " + ", ".join(devices))
        self.workers = start_workers(cfg, devices)
        try:
            infos = await asyncio.gather(*(w.start(cfg.pipeline.worker_start_timeout_s) for w in self.workers))
        except WorkerStartError:
            await asyncio.gather(*(w.stop(5) for w in self.workers))
            raise
        threads = cfg.pipeline.preprocess_threads or cores()
        log.info(
            "daemon_started",
            version=__version__,
            devices=devices,
            model=infos[0]["weights"],
            half=infos[0]["half"],
            config=str(cfg.source),
            incoming=str(cfg.paths.incoming),
            preprocess_threads=threads,
            torch_threads=torch_threads(cfg, devices),
            once=self.once,
            startup_s=round(time.monotonic() - started, 2),
        )
        info = results.ModelInfo(infos[0]["weights"], infos[0]["names"], cfg.model.imgsz, infos[0]["half"])
        size = cfg.pipeline.max_pending
        jobs: asyncio.Queue[Job] = asyncio.Queue(size)
        ready: asyncio.Queue[Prepared] = asyncio.Queue(size)
        outcomes: asyncio.Queue[Outcome] = asyncio.Queue(size)
        knobs = batching.Knobs(
            cfg.pipeline.max_batch, cfg.pipeline.max_wait_ms, cfg.model.conf, cfg.model.iou, cfg.pipeline.max_attempts
        )
        self.batcher = batching.Batcher(ready, self.workers, outcomes, knobs)
        writer = results.Writer(cfg.paths, cfg.output, info, self._finished)
        intake_settings = intake.Settings(
            cfg.paths.incoming,
            cfg.paths.work / "processing",
            cfg.intake.settle_ms / 1000,
            cfg.intake.ignore_suffixes,
            cfg.intake.reconcile_interval_s,
            cfg.intake.debounce_ms,
            cfg.intake.force_polling,
        )
        self.intake = intake.Intake(intake_settings, self.capacity, jobs, outcomes)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess")
        settings = preprocess.Settings(cfg.model.imgsz, cfg.pipeline.reduced_decode, cfg.pipeline.max_pixels)
        stages = [
            loop.create_task(preprocess.run(jobs, ready, outcomes, pool, settings, threads * 2)),
            loop.create_task(self.batcher.run()),
            loop.create_task(results.run(outcomes, writer, concurrency=16)),
            *(loop.create_task(self._supervise(w)) for w in self.workers),
        ]
        feeders = [loop.create_task(self._feed())]
        self.queues: dict[str, asyncio.Queue[Any]] = {"jobs": jobs, "ready": ready, "outcomes": outcomes}
        self.metrics.on_scrape = self._sample
        self.metrics.healthy = True
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        self.notifier.ready()
        reporters = [loop.create_task(self._watchdog()), loop.create_task(self._stats())]
        try:
            await self._until_stopped(stages + feeders)
        finally:
            self.metrics.healthy = False
            self.notifier.stopping()
            await self._drain(stages, feeders)
            pool.shutdown(wait=False, cancel_futures=True)
            for task in reporters:
                task.cancel()
            if server is not None:
                server.close()
                await server.wait_closed()
        log.info(
            "daemon_stopped",
            done=self.done,
            failed=self.failed,
            claimed=self.intake.claimed,
            left_in_processing=self.capacity.in_flight,
            uptime_s=round(time.monotonic() - started, 2),
        )
        return 0

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
            await asyncio.sleep(0)  # let the watcher start before the scan, so nothing falls between
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

    async def _supervise(self, worker: DeviceWorker) -> None:
        """Restart a device process that died, with backoff; its batches were already re-queued."""
        attempt = 0
        while True:
            await worker.wait_exit()
            await worker.stop(0)
            delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
            log.error("worker_exited", device=worker.device, restart_in_s=delay, restarts=worker.restarts)
            await asyncio.sleep(delay)  # backoff: a crash loop must not spin
            try:
                await worker.start(self.config.pipeline.worker_start_timeout_s)
            except WorkerStartError as exc:
                attempt += 1
                log.error("worker_restart_failed", device=worker.device, error=str(exc))
                continue
            attempt = 0
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
        }

    async def _stats(self) -> None:
        """A `stats` log line and systemd STATUS every log.stats_interval_s."""
        last, last_t = 0, time.monotonic()
        while self.config.log.stats_interval_s > 0:
            await asyncio.sleep(self.config.log.stats_interval_s)  # a period, not a wait for something
            now = time.monotonic()
            s = self.summary()
            rate = (s["done"] - last) / (now - last_t)
            last, last_t = s["done"], now
            log.info("stats", images_per_s=round(rate, 2), **s)
            self.notifier.status(
                f"{s['done']} done, {s['failed']} failed, {s['in_flight']} in flight, {rate:.1f} img/s, "
                f"{s['workers_up']}/{s['workers']} devices up"
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
            finished = self.done + self.failed
            if finished != last or self.capacity.in_flight == 0 or not all(w.up for w in self.workers):
                self.notifier.watchdog()
            else:
                log.warning("watchdog_withheld", in_flight=self.capacity.in_flight, done=self.done)
            last = finished
