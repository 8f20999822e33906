"""A whole `Service` in this process: a fake backend whose devices answer in-process (no model,
no subprocess) and a fake sink, both registered from this file only (no module of the daemon
names them). Real files, the real intake, preprocess, batcher, results and fleet: what runs is
the daemon's own lifecycle (start-up, serve, drain), its supervision and its reload, in
milliseconds. The end-to-end tests keep proving the process contract (signals, exit statuses).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import uvloop
from conftest import write_config
from PIL import Image

from daemon import backends, fleet, sinks
from daemon.checks import DatabaseUrl
from daemon.config import Config, load
from daemon.devices import Answers, Device, DeviceState
from daemon.export import Planned
from daemon.jobs import ModelInfo, Outcome, Prepared
from daemon.messages import DeviceInfo
from daemon.notify import Notifier
from daemon.service import Service
from daemon.sinks import OnState
from daemon.tasks.detect import Boxes

IMGSZ = 64
TIMEOUT_S = 10.0  # a wait that should take milliseconds; only a bug reaches it


class FakeDevice:
    """A Device in this process: answers each batch with one box per image. `gate`: while
    clear, a batch waits (work in flight); `die()` ends it as a crash would."""

    def __init__(self, name: str, config: Config, gate: asyncio.Event) -> None:
        self.device = name
        self.max_batch, self.slots, self.slot_imgsz = config.pipeline.max_batch, 2, config.model.imgsz
        self.slot_bytes = self.max_batch * self.slot_imgsz**2 * 3
        self.model = ModelInfo("fake.pt", {0: "thing"}, self.slot_imgsz, False)
        self.info: DeviceInfo | None = None
        self.restarts = 0
        self.starts = 0
        self.state = DeviceState.STOPPED
        self.max_det = config.model.max_det
        self.gate = gate
        self.asked = asyncio.Event()  # a batch was given to it
        self.started = asyncio.Event()  # (again)
        self._exited = asyncio.Event()
        self._in_flight = 0

    @property
    def up(self) -> bool:
        return self.state is DeviceState.UP

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def pid(self) -> int | None:
        return None

    async def start(self, timeout_s: float) -> DeviceInfo:
        self.starts += 1
        self._exited = asyncio.Event()
        self.state = DeviceState.UP
        self.started.set()
        self.info = DeviceInfo(
            device="cpu",
            weights="fake.pt",
            task="detect",
            names={0: "thing"},
            half=False,
            runtime="fake",
            precision="fp32",
            artefact="fake.pt",
            max_batch=4,
            fixed_shape=None,
            format="pt",
            pinned=False,
            pipelined=False,
        )
        return self.info

    async def infer(self, batch: list[Prepared], conf: float, iou: float) -> Answers:
        self._in_flight += 1
        self.asked.set()
        try:
            await self.gate.wait()
        finally:
            self._in_flight -= 1
        return [Boxes(np.array([[1, 2, 3, 4, 0.9, 0]], np.float32)) for _ in batch], 1.0

    def set_level(self, level: str) -> None:
        pass

    def die(self) -> None:
        self.state = DeviceState.EXITED
        self._exited.set()

    async def wait_exit(self) -> None:
        await self._exited.wait()

    async def stop(self, timeout_s: float) -> None:
        self.state = DeviceState.STOPPED
        self._exited.set()


class FakeBackend:
    """Devices named fake:0, fake:1, ... in this process; every device it made is kept in `made`."""

    made: ClassVar[list[FakeDevice]] = []
    gate = asyncio.Event()
    state = None
    problem = None

    def __init__(self, config: Config, on_state: Callable[[bool, str | None], None]) -> None:
        pass

    async def resolve(self, config: Config) -> list[str]:
        return ["fake:0"]

    async def prepare(
        self, config: Config, names: list[str], *, stop: asyncio.Event | None, notifier: Notifier | None
    ) -> list[Planned]:
        return []

    def make(self, config: Config, names: list[str], *, slot_imgsz: int = 0) -> list[Device]:
        devices = [FakeDevice(name, config, self.gate) for name in names]
        self.made.extend(devices)
        return list(devices)

    async def grow(self, running: Callable[[], Config], add: Callable[[Device], Awaitable[None]]) -> None:
        await asyncio.Future()

    async def close(self) -> None:
        pass


class FakeSink:
    """Holds every outcome it is given; `closed` once the service closed it."""

    name = "fake"
    kept: ClassVar[list[Outcome]] = []
    arrived = asyncio.Event()  # an outcome was put
    closed = False

    def __init__(self, url: DatabaseUrl, fsync: bool, on_state: OnState) -> None:
        self.failures = 0
        on_state(True, None)

    async def run(self) -> None:
        await asyncio.Future()

    async def put(self, outcome: Outcome) -> None:
        self.kept.append(outcome)
        self.arrived.set()

    async def check(self) -> None:
        pass

    async def close(self) -> None:
        FakeSink.closed = True


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The fakes, registered the way a new backend or sink would be (and undone after)."""
    monkeypatch.setitem(backends.BACKENDS, "local", FakeBackend)  # [cluster] backend = "local" runs the fake
    monkeypatch.setitem(sinks.SINKS, "fake", FakeSink)
    monkeypatch.setattr(fleet, "RESTART_BACKOFF_S", (0.0,))  # a dead device is restarted at once
    monkeypatch.setattr(FakeBackend, "made", [])
    monkeypatch.setattr(FakeSink, "kept", [])
    monkeypatch.setattr(FakeSink, "closed", False)
    yield


def config(tmp: Path, **model: Any) -> Config:
    path = write_config(
        tmp,
        paths={name: str(tmp / name) for name in ("incoming", "output", "done", "failed", "work")},
        model={"weights": "fake", "imgsz": IMGSZ, **model},
        intake={"settle_ms": 0},
        pipeline={"preprocess_threads": 1, "decode": "host"},
    )
    cfg = load(path)
    for name in ("incoming", "output", "done", "failed", "work"):
        getattr(cfg.paths, name).mkdir(parents=True, exist_ok=True)
    # The fake sink by its URL's scheme (the config file only parses database URLs).
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, database=DatabaseUrl("fake", None, "")))


def drop(cfg: Config, name: str) -> None:
    """A real JPEG into incoming/, complete when it appears (written beside it, then renamed)."""
    tmp = cfg.paths.incoming.parent / f".{name}"
    Image.new("RGB", (80, 60), (120, 30, 200)).save(tmp, "JPEG")
    tmp.rename(cfg.paths.incoming / name)


def run(main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        FakeBackend.gate = asyncio.Event()
        FakeBackend.gate.set()
        FakeSink.arrived = asyncio.Event()
        runner.run(asyncio.wait_for(main(), TIMEOUT_S))


async def serving(cfg: Config, **options: Any) -> tuple[Service, asyncio.Task[int]]:
    service = Service(cfg, **options)
    task = asyncio.create_task(service.run())
    waiter = asyncio.create_task(service.serving.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        raise AssertionError(f"the service ended before serving: {task.result()}")
    return service, task


async def stored(n: int) -> None:
    """Until the fake sink holds `n` outcomes."""
    while len(FakeSink.kept) < n:
        FakeSink.arrived.clear()
        await FakeSink.arrived.wait()


def test_once_serves_through_the_fakes(tmp_path: Path, registered: None) -> None:
    """--once: every image reaches the fake sink and done/; the sink is closed at the end."""
    cfg = config(tmp_path)
    for i in range(5):
        drop(cfg, f"{i}.jpg")

    async def main() -> None:
        service = Service(cfg, once=True)
        assert await service.run() == 0
        assert (service.done, service.failed) == (5, 0)
        assert service.health.summary()["fake_up"] is True

    run(main)
    assert sorted(o.prepared.job.rel.name for o in FakeSink.kept) == [f"{i}.jpg" for i in range(5)]
    assert FakeSink.closed
    assert sorted(p.name for p in cfg.paths.done.iterdir()) == [f"{i}.jpg" for i in range(5)]
    assert [d.device for d in FakeBackend.made] == ["fake:0"]


def test_a_device_that_dies_is_restarted(tmp_path: Path, registered: None) -> None:
    cfg = config(tmp_path)

    async def main() -> None:
        service, task = await serving(cfg)
        (device,) = FakeBackend.made
        device.started.clear()
        device.die()
        await device.started.wait()  # the supervisor started it again
        assert device.starts == 2 and device.restarts == 1 and device.up
        drop(cfg, "after.jpg")  # the restarted device serves
        await stored(1)
        service.stop.set()
        assert await task == 0
        assert service.done == 1

    run(main)
    assert [p.name for p in cfg.paths.done.iterdir()] == ["after.jpg"]


def test_a_reload_rolls_the_devices(tmp_path: Path, registered: None) -> None:
    """SIGHUP's path: a key that needs new devices (model.max_det) starts them beside the old
    ones, then switches; the old device is stopped, the new config runs."""
    cfg = config(tmp_path)

    async def main() -> None:
        service, task = await serving(cfg)
        assert cfg.source is not None
        cfg.source.write_text(cfg.source.read_text().replace("[model]", "[model]\nmax_det = 7"))
        service.reloader.request()  # what SIGHUP calls
        assert service.reloader.task is not None
        await service.reloader.task
        old, new = FakeBackend.made
        assert old.state is DeviceState.STOPPED and new.up and new.max_det == 7
        assert service.fleet.devices == [new] and service.config.model.max_det == 7
        drop(cfg, "new.jpg")
        await stored(1)
        assert FakeSink.kept[0].device == "fake:0" and new.asked.is_set() and not old.asked.is_set()  # type: ignore[union-attr]
        service.stop.set()
        assert await task == 0

    run(main)


def test_the_drain_finishes_work_in_flight(tmp_path: Path, registered: None) -> None:
    """A stop request while a batch is on the device: intake closes, the batch is answered and
    written within drain_timeout_s, then the service exits 0 with nothing left in processing/."""
    cfg = config(tmp_path)

    async def main() -> None:
        service, task = await serving(cfg)
        FakeBackend.gate.clear()  # the device holds what it is given
        drop(cfg, "held.jpg")
        (device,) = FakeBackend.made
        await device.asked.wait()
        service.stop.set()
        await service.intake_stop.wait()  # the drain has begun
        assert service.capacity.in_flight == 1
        FakeBackend.gate.set()
        assert await task == 0
        assert (service.done, service.capacity.in_flight) == (1, 0)

    run(main)
    assert [p.name for p in cfg.paths.done.iterdir()] == ["held.jpg"]
    assert not any((cfg.paths.work / "processing").iterdir())
