"""SIGHUP: re-read the config and apply all of it, or (it does not load, its model does not
start) nothing.

Thresholds, batching, output and the log level apply at once. A new model, input size, device
list or slot size (ROLL_KEYS) starts new devices beside the old ones, and the fleet switches
over once they are READY. Keys only a restart can change are kept at their running values,
with a warning that names them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from daemon import config, export
from daemon.config import Config, ConfigError
from daemon.devices import Device, WorkerStartError
from daemon.tasks import checkpoint
from daemon.workers import resolve_decode

if TYPE_CHECKING:
    from daemon.service import Service

log = structlog.get_logger("daemon.service")
# Keys whose change needs new device processes (a reload starts them beside the old ones).
ROLL_KEYS = frozenset(
    {
        "model.weights",
        "model.imgsz",
        "model.runtime",
        "model.precision",
        "model.calibration",
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


@dataclass(frozen=True, slots=True)
class Plan:
    new: Config  # what will run
    changed: list[str]  # the keys that change
    ignored: list[str]  # keys that changed in the file but need a restart
    roll: bool  # new devices are needed


def plan(running: Config, read: Config, devices: list[str]) -> Plan:
    """What applying `read` (the file as loaded) to `running` changes; `devices`: where it runs
    now, for `pipeline.decode = "auto"` as it was resolved at start."""
    read = resolve_decode(read, devices)
    ignored = sorted(key for key in config.differences(running, read) if needs_restart(key))
    new = reloadable(running, read)
    changed = sorted(config.differences(running, new))
    return Plan(new, changed, ignored, not ROLL_KEYS.isdisjoint(changed))


class Reloader:
    """Runs reloads for `service`, one at a time; a SIGHUP during one asks for one more pass."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def request(self) -> None:
        s = self.service
        if s.stop.is_set():
            log.warning("reload_refused", reason="stopping")
        elif self.task is not None and not self.task.done():
            self.again = True
            log.info("reload_queued", reason="a reload is in progress")
        else:
            self.task = asyncio.get_running_loop().create_task(self._run())
            self.task.add_done_callback(self._ended)

    async def cancel(self) -> None:
        """The drain: a reload still starting its devices is dropped; a switch completes."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait([self.task])

    async def _run(self) -> None:
        s = self.service
        await s.serving.wait()  # a SIGHUP during start-up is served once the pipeline runs
        self.again = True
        while self.again and not s.stop.is_set():
            self.again = False
            s.notifier.reloading()
            await self._once()
            s.notifier.ready()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("reload_crashed", exc_info=exc)  # a bug: stop rather than run half reloaded
            self.service.exit_status = 1
            self.service.stop.set()

    async def _once(self) -> None:
        s = self.service
        running = s.config
        try:
            read = config.load(running.source) if running.source else running
            read = checkpoint.resolve_config(read)  # imgsz "auto": the new checkpoint's
            read = await export.resolve(read, stop=s.stop, notifier=s.notifier)  # cached unless the model changed
        except export.ExportStopped:
            return
        except WorkerStartError as exc:
            log.error("reload_failed", error=str(exc))
            return
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        p = plan(running, read, [d.device for d in s.fleet.devices])
        if p.ignored:
            log.warning("reload_needs_restart", keys=p.ignored)
        log.info("reload_started", changed=p.changed, restart_workers=p.roll)
        fresh: list[Device] = []
        if p.roll:
            try:
                fresh = await self._start_fresh(p.new)
            except (WorkerStartError, OSError) as exc:
                log.error("reload_failed", error=str(exc), changed=p.changed)
                return
            try:
                await s.fleet.switch(fresh, p.new.pipeline.drain_timeout_s)
            finally:
                s.apply(p.new)
        else:
            s.apply(p.new)
        log.info("reload_done", applied=p.changed, workers_restarted=len(fresh), pids=s.fleet.pids)

    async def _start_fresh(self, new: Config) -> list[Device]:
        """Start the new config's devices one at a time, while the old ones serve.

        Their slots keep room for images letterboxed before the switch, at the old imgsz.
        """
        s = self.service
        room = max([new.model.imgsz, *(d.slot_imgsz for d in s.fleet.devices)])
        devices = await s.fleet.resolve(new)
        try:
            await export.prepare(new, devices, stop=s.stop, notifier=s.notifier)
        except export.ExportStopped:
            raise WorkerStartError("stopping during the model export", permanent=False) from None
        fresh = s.fleet.make(new, devices, slot_imgsz=room)
        try:
            for device in fresh:
                await device.start(new.pipeline.worker_start_timeout_s)
        except BaseException:  # a start failed, or the drain cancelled the reload: leave nothing running
            await asyncio.gather(*(d.stop(0) for d in fresh))
            raise
        return fresh
