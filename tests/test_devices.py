"""The batcher against the Device protocol alone: in-process devices that answer, crash or
retire on cue, no processes. What a device raises decides what happens to a batch's images."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import uvloop

from daemon.batching import Batcher, Knobs
from daemon.devices import Answers, Device, DeviceCrashed, DeviceKind, DeviceName, DeviceRetired, DeviceState
from daemon.jobs import FailReason, Failure, Inferred, Job, ModelInfo, Outcome, Prepared
from daemon.messages import DeviceInfo
from daemon.tasks.detect import Boxes

POISON = "poison.jpg"
FAKE_INFO = DeviceInfo(
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


class FakeDevice:
    """A Device in this process. `crash`: a batch holding the poison image crashes it (started);
    `retire`: every batch is refused as by a device being retired."""

    def __init__(self, name: str, *, crash: bool = False, retire: bool = False) -> None:
        self.device = name
        self.max_batch, self.slots, self.slot_imgsz = 4, 2, 64
        self.slot_bytes = self.max_batch * 64 * 64 * 3
        self.model = ModelInfo("fake.pt", {0: "thing"}, 64, False)
        self.info: DeviceInfo | None = FAKE_INFO
        self.restarts = 0
        self.state = DeviceState.UP
        self.crash, self.retire = crash, retire
        self.batches: list[list[str]] = []
        self.asked = asyncio.Event()  # a batch was given to it

    @property
    def up(self) -> bool:
        return self.state is DeviceState.UP

    @property
    def in_flight(self) -> int:
        return 0

    @property
    def pid(self) -> int | None:
        return None

    async def start(self, timeout_s: float) -> DeviceInfo:
        self.state = DeviceState.UP
        return FAKE_INFO

    async def infer(self, batch: list[Prepared], conf: float, iou: float) -> Answers:
        names = [p.job.rel.name for p in batch]
        self.batches.append(names)
        self.asked.set()
        await asyncio.sleep(0)  # answered on a later turn of the loop, as a real device's reply
        if self.retire:
            raise DeviceRetired(self.device)
        if self.crash and POISON in names:
            raise DeviceCrashed(f"{self.device} died", started=True)
        return [Boxes(np.array([[1, 2, 3, 4, 0.9, 0]], np.float32)) for _ in batch], 1.0

    def set_level(self, level: str) -> None:
        pass

    async def wait_exit(self) -> None:
        await asyncio.Future()

    async def stop(self, timeout_s: float) -> None:
        self.state = DeviceState.STOPPED


def prepared(name: str) -> Prepared:
    job = Job(PurePosixPath(name), Path(name))
    return Prepared(job, np.zeros((64, 64, 3), np.uint8), 64, 64, 1, (1.0, 1.0), (0, 0), time.monotonic())


def serve(
    devices: list[Device],
    names: list[str],
    max_attempts: int = 3,
    meanwhile: Callable[[Batcher], Awaitable[None]] | None = None,
) -> list[list[Outcome]]:
    """Run a batcher over `devices` (and `meanwhile` beside it) until every image has an
    outcome; the outcomes per batch."""

    async def main() -> list[list[Outcome]]:
        ready: asyncio.Queue[Prepared] = asyncio.Queue()
        for name in names:
            ready.put_nowait(prepared(name))
        out: asyncio.Queue[list[Outcome]] = asyncio.Queue()
        batcher = Batcher(ready, devices, out, Knobs(4, 5, 0.25, 0.7, max_attempts))
        task = asyncio.create_task(batcher.run())
        batches: list[list[Outcome]] = []
        try:
            if meanwhile is not None:
                await asyncio.wait_for(meanwhile(batcher), 10)
            while sum(map(len, batches)) < len(names):
                batches.append(await asyncio.wait_for(out.get(), 10))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return batches

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def outcome_of(batches: list[list[Outcome]]) -> dict[str, Outcome]:
    found: dict[str, Outcome] = {}
    for batch in batches:
        for o in batch:
            job = o.job if isinstance(o, Failure) else o.prepared.job
            assert job.rel.name not in found, f"{job.rel} has two outcomes"
            found[job.rel.name] = o
    return found


def test_a_batch_comes_back_as_one_list_for_the_results_stage() -> None:
    device = FakeDevice("fake:0")
    batches = serve([device], [f"{i}.jpg" for i in range(4)])
    assert [len(b) for b in batches] == [len(b) for b in device.batches]
    assert all(isinstance(o, Inferred) and o.device == "fake:0" for b in batches for o in b)
    assert sorted(outcome_of(batches)) == [f"{i}.jpg" for i in range(4)]


@pytest.mark.parametrize("max_attempts", [2, 3])
def test_an_image_that_takes_down_max_attempts_devices_is_poison_and_the_rest_are_done(max_attempts: int) -> None:
    devices: list[Device] = [FakeDevice("fake:0", crash=True), FakeDevice("fake:1", crash=True)]
    names = ["a.jpg", POISON, "b.jpg", "c.jpg", "d.jpg"]
    found = outcome_of(serve(devices, names, max_attempts))
    poison = found.pop(POISON)
    assert isinstance(poison, Failure) and poison.error.reason is FailReason.POISON
    assert poison.job.attempts == max_attempts
    assert all(isinstance(o, Inferred) for o in found.values()) and sorted(found) == sorted(set(names) - {POISON})
    # The innocent images of the batch it crashed were retried alone: one crash each, never poison.
    assert all(o.prepared.job.attempts <= 1 for o in found.values() if isinstance(o, Inferred))


def test_a_retiring_device_hands_its_batch_back_without_an_attempt() -> None:
    retiring, serving = FakeDevice("old", retire=True), FakeDevice("new")
    devices: list[Device] = [retiring]

    async def switch(batcher: Batcher) -> None:  # the reload's switch: the new device takes over
        await retiring.asked.wait()
        devices[:] = [serving]
        batcher.wake.set()

    names = [f"{i}.jpg" for i in range(3)]
    found = outcome_of(serve(devices, names, meanwhile=switch))
    assert all(isinstance(o, Inferred) and o.device == "new" and o.prepared.job.attempts == 0 for o in found.values())
    assert sorted(found) == names and retiring.batches


@pytest.mark.parametrize(
    ("text", "backend", "kind", "torch"),
    [
        ("cpu", "local", DeviceKind.CPU, "cpu"),
        ("cpu:1", "local", DeviceKind.CPU, "cpu"),
        ("cuda:1", "local", DeviceKind.CUDA, "cuda:1"),
        ("ray:gpu:3", "ray", DeviceKind.CUDA, "cuda:0"),  # Ray gives the actor its GPU as cuda:0
        ("ray:cpu:0", "ray", DeviceKind.CPU, "cpu"),
    ],
)
def test_a_device_name_is_parsed_once(text: str, backend: str, kind: DeviceKind, torch: str) -> None:
    name = DeviceName.parse(text)
    assert (name.text, name.backend, name.kind, name.torch) == (text, backend, kind, torch)
    assert name.remote is (backend != "local")
