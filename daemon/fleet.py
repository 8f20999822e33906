"""The fleet: the devices that serve the model, their supervision, and a reload's switch.

Which devices: the backend's (`daemon.backends`, by `[cluster] backend`): spawned local
processes (`daemon.local`), or actors on a Ray cluster (`daemon.cluster`, imported only
then), which also adds a device for each node the cluster gains. `devices` is the list the
batcher picks from; only the fleet changes it. Each device has a supervisor: when the device
dies (its batches were already handed back to the batcher), it is started again with backoff.
A reload starts new devices beside the old ones (`daemon.reload`), then `switch` retires the
old ones and hands the batcher the new ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from daemon import backends
from daemon.backends import Backend
from daemon.config import Config
from daemon.devices import Device, DeviceStartError, start_all
from daemon.export import Planned
from daemon.messages import DeviceInfo
from daemon.metrics import Metrics
from daemon.notify import Notifier

log = structlog.get_logger("daemon.fleet")
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_S = 60.0  # a device process that ran this long before dying restarts at the first backoff step


class Fleet:
    def __init__(
        self,
        metrics: Metrics,
        running: Callable[[], Config],
        on_change: Callable[[], None],
        on_cluster: Callable[[bool, str | None], None],
    ) -> None:
        """`running`: the running config; `on_change`: a device came back or was added, or the
        devices were switched (the batcher may have work for them); `on_cluster`: the Ray
        cluster was lost (False, why) or is back (True)."""
        self.metrics = metrics
        self.running = running
        self.on_change = on_change
        self.on_cluster = on_cluster
        self.backend: Backend | None = None  # made by the first `resolve`, from its config
        self.devices: list[Device] = []  # the batcher's list: a switch swaps its contents
        self._supervisors = asyncio.TaskGroup()
        self._supervised: dict[Device, asyncio.Task[None]] = {}

    @property
    def up(self) -> int:
        return sum(d.up for d in self.devices)

    @property
    def all_up(self) -> bool:
        return all(d.up for d in self.devices)

    @property
    def pids(self) -> list[int | None]:
        return [d.pid for d in self.devices]

    @property
    def task(self) -> str:
        """The task of the model the devices serve (they all load the same weights)."""
        info = self.devices[0].info if self.devices else None
        return info.task if info is not None else "detect"

    async def resolve(self, cfg: Config) -> list[str]:
        """The names of the devices `cfg` runs on: this machine's, or the Ray cluster's."""
        if self.backend is None:
            self.backend = backends.make(cfg, self.on_cluster)
        return await self.backend.resolve(cfg)

    async def prepare(
        self, cfg: Config, names: list[str], *, stop: asyncio.Event | None = None, notifier: Notifier | None = None
    ) -> list[Planned]:
        """Make what the devices `names` load ready (the export cache); ExportStopped on `stop`."""
        return await self._backend.prepare(cfg, names, stop=stop, notifier=notifier)

    def make(self, cfg: Config, names: list[str], *, slot_imgsz: int = 0) -> list[Device]:
        """Devices (not started) for `names`; `slot_imgsz` as in local.LocalDevice."""
        return self._backend.make(cfg, names, slot_imgsz=slot_imgsz)

    async def grow(self) -> None:
        """A stage: a device for each one the backend gains (a Ray cluster's new GPU or CPU
        node), made with the running config, taken by the batcher, kept by a supervisor."""
        await self._backend.grow(self.running, self._add)

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()

    @property
    def _backend(self) -> Backend:
        assert self.backend is not None, "resolve() makes the backend"
        return self.backend

    async def _add(self, device: Device) -> None:
        self.devices.append(device)
        self._watch(device)
        self.on_change()
        log.info("device_added", device=device.device, pid=device.pid, devices=len(self.devices))

    async def start(self, devices: list[Device], timeout_s: float) -> list[DeviceInfo]:
        """Start `devices` at once and make them the fleet; their READY answers. If one fails,
        or this is cancelled (a stop request), all are stopped before it raises."""
        self.devices[:] = devices
        return await start_all(self.devices, timeout_s)

    async def supervise(self) -> None:
        """A stage: the supervisors of the current devices (a switch replaces them), until the
        drain cancels it. A supervisor that fails is a bug, and ends the stage."""
        async with self._supervisors:
            for device in self.devices:
                self._watch(device)
            await asyncio.Future()

    async def switch(self, fresh: list[Device], timeout_s: float) -> None:
        """Retire the current devices, then hand the batcher `fresh` (already started).

        Retiring: no new batch goes to them, they answer the batches they hold (stop() queues
        its None behind those), and exit; their supervisors are cancelled first, so this is
        neither a crash nor a retry. Until then (a batch time) no batch is sent at all, so the
        results of the old model are in before the writer names the new one.
        """
        old = self.devices[:]
        self.devices.clear()
        for device in old:
            self._supervised.pop(device).cancel()
        log.info("reload_switching", retiring=[d.pid for d in old], batches_in_flight=sum(d.in_flight for d in old))
        # stop() first sends the batches being copied into their slots; a batch handed over that
        # had not reached its slot yet comes back to the batcher (DeviceRetired) for the new ones.
        retiring = asyncio.ensure_future(asyncio.gather(*(d.stop(timeout_s) for d in old)))
        try:
            await asyncio.shield(retiring)
        except asyncio.CancelledError:  # a stop request: the switch is short, finish it first
            await retiring
            raise
        finally:
            self.devices.extend(fresh)
            for device in fresh:
                self._watch(device)
            for name in {d.device for d in old} - {d.device for d in fresh}:
                self.metrics.device_up(name, False)
            self.on_change()

    def set_level(self, level: str) -> None:
        for device in self.devices:
            device.set_level(level)

    async def stop(self, timeout_s: float) -> None:
        await asyncio.gather(*(d.stop(timeout_s) for d in self.devices))

    def _watch(self, device: Device) -> None:
        self._supervised[device] = self._supervisors.create_task(self._supervise(device))

    async def _supervise(self, device: Device) -> None:
        """Restart a device that died, with backoff; its batches were already re-queued.

        The backoff grows while the device keeps dying soon after a start (or fails to start),
        and falls back to its first step once it has run for STABLE_S.
        """
        failures = 0
        up_since = time.monotonic()
        while True:
            await device.wait_exit()
            await device.stop(0)
            failures = failures + 1 if time.monotonic() - up_since < STABLE_S else 0
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.error("worker_exited", device=device.device, restart_in_s=delay, restarts=device.restarts)
            while True:
                await asyncio.sleep(delay)  # backoff: a crash loop must not spin
                try:
                    await device.start(self.running().pipeline.worker_start_timeout_s)
                    break
                except (DeviceStartError, OSError) as exc:  # OSError: no pipe or process to be had now
                    failures += 1
                    delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
                    log.error("worker_restart_failed", device=device.device, error=str(exc), retry_in_s=delay)
            up_since = time.monotonic()
            device.restarts += 1
            self.metrics.device_restarted(device.device)
            log.info("worker_restarted", device=device.device, pid=device.pid, restarts=device.restarts)
            self.on_change()
