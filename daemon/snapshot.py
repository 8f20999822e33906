"""What the running service looks like at one instant: the one thing the modules that report on
it (`daemon.health`, `daemon.state`, `daemon.progress`) are given, instead of the service.

The service builds a `Snapshot` on demand (`Service.snapshot`); building one is cheap (counters,
queue sizes, a copy of the device list) and safe from another thread (the progress display's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from daemon.devices import DeviceState


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    device: str  # cpu:0, cuda:1, ray:gpu:3
    state: DeviceState
    up: bool
    pid: int | None
    restarts: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    done: int  # inputs finished (results durable)
    failed: int  # inputs moved to failed/ (or left in processing/ after a write error)
    in_flight: int  # claimed, unfinished inputs
    found: int  # inputs the start-up scan found (the backlog of --once)
    queues: dict[str, int]  # depth of each queue between stages, by name (jobs, ready, outcomes)
    batching: int  # images waiting in the batcher
    batches: int  # batches sent to devices
    devices: tuple[DeviceStatus, ...]
    progress: int  # done + failed + retried writes and sink attempts: grows while work moves
    sinks: tuple[str, ...]  # the names of the configured sinks
    cluster: str | None  # the Ray cluster's state; None with local devices
    cluster_problem: bool = False  # the Ray cluster is lost (reconnecting)

    @property
    def devices_up(self) -> int:
        return sum(d.up for d in self.devices)

    @property
    def all_up(self) -> bool:
        return all(d.up for d in self.devices)


Snapshotter = Callable[[], Snapshot]
