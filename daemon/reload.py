"""SIGHUP: re-read the config and apply all of it, or (it does not load, its model does not
start) nothing.

Each key's declaration (config.KEYS) says what a reload does with it: LIVE keys (thresholds,
batching, output, the log level) apply at once; ROLL keys (a new model, input size, device list
or slot size) start new devices beside the old ones, and the fleet switches over once they are
READY; RESTART keys are kept at their running values, with a warning that names them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon import config, export
from daemon.config import Config, Reload
from daemon.devices import Device
from daemon.errors import EXIT_RUNTIME, ConfigError, DeviceStartError, ExportStopped
from daemon.fleet import Fleet
from daemon.local import resolve_decode
from daemon.notify import Notifier
from daemon.tasks import checkpoint

log = structlog.get_logger("daemon.service")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    new: Config  # what will run
    changed: list[str]  # the keys that change
    ignored: list[str]  # keys that changed in the file but need a restart
    roll: bool  # new devices are needed


def plan(running: Config, read: Config, devices: list[str]) -> ReloadPlan:
    """What applying `read` (the file as loaded) to `running` changes; `devices`: where it runs
    now, for `pipeline.decode = "auto"` as it was resolved at start."""
    read = resolve_decode(read, devices)
    ignored = sorted(key for key in config.differences(running, read) if config.reload_class(key) is Reload.RESTART)
    new = config.reloadable(running, read)
    changed = sorted(config.differences(running, new))
    return ReloadPlan(new, changed, ignored, any(config.reload_class(key) is Reload.ROLL for key in changed))


class Reloader:
    """Runs reloads, one at a time; a SIGHUP during one asks for one more pass.

    It is given what a reload needs, never the service: the `fleet` (whose devices it rolls),
    the `notifier`, the `running()` config, `apply(new)` to make a config the running one, the
    `stop` event (set: the daemon stops, no reload starts), the `serving` event (a SIGHUP during
    start-up waits for it) and `fail(exit_status)` to stop the daemon should a reload crash.
    """

    def __init__(
        self,
        fleet: Fleet,
        notifier: Notifier,
        *,
        running: Callable[[], Config],
        apply: Callable[[Config], None],
        stop: asyncio.Event,
        serving: asyncio.Event,
        fail: Callable[[int], None],
    ) -> None:
        self.fleet = fleet
        self.notifier = notifier
        self.running = running
        self.apply = apply
        self.stop = stop
        self.serving = serving
        self.fail = fail
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def request(self) -> None:
        if self.stop.is_set():
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
        await self.serving.wait()  # a SIGHUP during start-up is served once the pipeline runs
        self.again = True
        while self.again and not self.stop.is_set():
            self.again = False
            self.notifier.reloading()
            await self._once()
            self.notifier.ready()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("reload_crashed", exc_info=exc)  # a bug: stop rather than run half reloaded
            self.fail(EXIT_RUNTIME)

    async def _once(self) -> None:
        running = self.running()
        try:
            read = config.load(running.source) if running.source else running
            read = checkpoint.resolve_config(read)  # imgsz "auto": the new checkpoint's
            read = await export.resolve(read, stop=self.stop, notifier=self.notifier)  # cached unless the model changed
        except ExportStopped:
            return
        except DeviceStartError as exc:
            log.error("reload_failed", error=str(exc))
            return
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        p = plan(running, read, [d.device for d in self.fleet.devices])
        if p.ignored:
            log.warning("reload_needs_restart", keys=p.ignored)
        log.info("reload_started", changed=p.changed, restart_workers=p.roll)
        fresh: list[Device] = []
        if p.roll:
            try:
                fresh = await self._start_fresh(p.new)
            except (DeviceStartError, OSError) as exc:
                log.error("reload_failed", error=str(exc), changed=p.changed)
                return
            try:
                await self.fleet.switch(fresh, p.new.pipeline.drain_timeout_s)
            finally:
                self.apply(p.new)
        else:
            self.apply(p.new)
        log.info("reload_done", applied=p.changed, workers_restarted=len(fresh), pids=self.fleet.pids)

    async def _start_fresh(self, new: Config) -> list[Device]:
        """Start the new config's devices one at a time, while the old ones serve.

        Their slots keep room for images letterboxed before the switch, at the old imgsz.
        """
        room = max([new.model.imgsz, *(d.slot_imgsz for d in self.fleet.devices)])
        devices = await self.fleet.resolve(new)
        try:
            await self.fleet.prepare(new, devices, stop=self.stop, notifier=self.notifier)
        except ExportStopped:
            raise DeviceStartError("stopping during the model export", permanent=False) from None
        fresh = self.fleet.make(new, devices, slot_imgsz=room)
        try:
            for device in fresh:
                await device.start(new.pipeline.worker_start_timeout_s)
        except BaseException:  # a start failed, or the drain cancelled the reload: leave nothing running
            await asyncio.gather(*(d.stop(0) for d in fresh))
            raise
        return fresh
