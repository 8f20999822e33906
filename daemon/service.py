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

from daemon import __version__, batching, intake, preprocess, results
from daemon.config import Config
from daemon.jobs import Capacity, Job, Outcome, Prepared
from daemon.workers import DeviceWorker, WorkerStartError

log = structlog.get_logger("daemon.service")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


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
    def __init__(self, config: Config, *, once: bool = False) -> None:
        self.config = config
        self.once = once
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

    def _finished(self, job: Job, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.capacity.release()

    async def run(self) -> int:
        """Serve until stopped (or, with --once, until incoming/ is drained). Returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        started = time.monotonic()
        cfg = self.config
        devices = resolve_devices(cfg.model.devices)
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
        try:
            await self._until_stopped(stages + feeders)
        finally:
            await self._drain(stages, feeders)
            pool.shutdown(wait=False, cancel_futures=True)
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
            log.info("worker_restarted", device=worker.device, pid=worker.pid, restarts=worker.restarts)
            self.batcher.wake.set()
