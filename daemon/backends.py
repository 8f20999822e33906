"""Device backends: where the devices run. One class per backend, chosen by name from `BACKENDS`
(`[cluster] backend` in the config), as gunicorn picks its worker class.

A backend resolves the device names a config runs on, prepares what they load (the export
cache), makes the devices (not started; the fleet starts and supervises them), may grow the
fleet while it serves, and releases what it holds at the end. A new backend is one class with
these methods and one entry in `BACKENDS` (or `register` from elsewhere); its devices follow
`daemon.devices.Device`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from daemon import export
from daemon.config import Config
from daemon.devices import Device
from daemon.local import local_devices, resolve_devices
from daemon.notify import Notifier

if TYPE_CHECKING:
    from daemon.cluster import Cluster

OnState = Callable[[bool, str | None], None]  # (up, why not): the backend's connection was lost, or is back


class Backend(Protocol):
    """What the fleet asks of a backend. Constructed as `Backend(config, on_state)`."""

    @property
    def state(self) -> str | None:
        """Its connection's state for health and the stats line (the Ray cluster's); None if it has none."""
        ...

    @property
    def problem(self) -> str | None:
        """Why its devices cannot be reached now; None while they can."""
        ...

    async def resolve(self, config: Config) -> list[str]:
        """The names of the devices `config` runs on (see `daemon.devices.DeviceName`)."""
        ...

    async def prepare(
        self, config: Config, names: list[str], *, stop: asyncio.Event | None, notifier: Notifier | None
    ) -> list[export.Planned]:
        """Make what `names` load ready (the export cache); ExportStopped if `stop` is set meanwhile."""
        ...

    def make(self, config: Config, names: list[str], *, slot_imgsz: int = 0) -> list[Device]:
        """Devices (not started) for `names`; `slot_imgsz`: the largest letterboxed side they must take."""
        ...

    async def grow(self, running: Callable[[], Config], add: Callable[[Device], Awaitable[None]]) -> None:
        """A stage: start a device for each one the backend gains, and `add` it; runs until cancelled."""
        ...

    async def close(self) -> None:
        """Release what the backend holds (a driver process, a connection)."""
        ...


class LocalBackend:
    """Spawned device processes on this machine (`daemon.local`)."""

    def __init__(self, config: Config, on_state: OnState) -> None:
        pass

    state = None
    problem = None

    async def resolve(self, config: Config) -> list[str]:
        return await resolve_devices(config)

    async def prepare(
        self, config: Config, names: list[str], *, stop: asyncio.Event | None, notifier: Notifier | None
    ) -> list[export.Planned]:
        return await export.prepare(config, names, stop=stop, notifier=notifier)

    def make(self, config: Config, names: list[str], *, slot_imgsz: int = 0) -> list[Device]:
        return local_devices(config, names, slot_imgsz=slot_imgsz)

    async def grow(self, running: Callable[[], Config], add: Callable[[Device], Awaitable[None]]) -> None:
        await asyncio.Future()  # this machine's devices are fixed: nothing to add until the drain cancels it

    async def close(self) -> None:
        pass


class RayBackend:
    """Actors on a Ray cluster (`daemon.cluster`, imported only for this backend)."""

    def __init__(self, config: Config, on_state: OnState) -> None:
        from daemon.cluster import Cluster

        self.cluster: Cluster = Cluster(config, on_state=on_state)  # ConfigError if ray is not installed

    @property
    def state(self) -> str | None:
        return self.cluster.state.value

    @property
    def problem(self) -> str | None:
        return self.cluster.problem

    async def resolve(self, config: Config) -> list[str]:
        return await self.cluster.resolve_devices()

    async def prepare(
        self, config: Config, names: list[str], *, stop: asyncio.Event | None, notifier: Notifier | None
    ) -> list[export.Planned]:
        return []  # the actors run the PyTorch weights they are sent: nothing to export here

    def make(self, config: Config, names: list[str], *, slot_imgsz: int = 0) -> list[Device]:
        return self.cluster.devices(config, names, slot_imgsz=slot_imgsz)

    async def grow(self, running: Callable[[], Config], add: Callable[[Device], Awaitable[None]]) -> None:
        await self.cluster.grow(running, add)

    async def close(self) -> None:
        await self.cluster.close()


BackendClass = Callable[[Config, OnState], Backend]
BACKENDS: dict[str, BackendClass] = {"local": LocalBackend, "ray": RayBackend}


def register(name: str, backend: BackendClass) -> None:
    """Make `[cluster] backend = name` run its devices with `backend`."""
    BACKENDS[name] = backend


def make(config: Config, on_state: OnState) -> Backend:
    """The backend `config` names (`cluster.backend`)."""
    return BACKENDS[config.cluster.backend.value](config, on_state)
