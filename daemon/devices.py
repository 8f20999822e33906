"""The Device protocol: what the batcher and the service ask of a device, wherever it runs.

A device runs the model on batches of prepared images. Today each is a spawned local process
with shared-memory slots (`daemon.local.LocalDevice`); a Ray actor (`daemon.cluster`) is
another. The batcher sends a batch to a device that is `up` and has a free slot; the service
starts, supervises (`wait_exit`, then `start` again) and stops them. The exceptions below are
the protocol's vocabulary for what went wrong, and decide what the batcher does with a batch.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from daemon.config import Config, Decode
from daemon.errors import BatchFailed as BatchFailed  # re-exported: its old home
from daemon.errors import DeviceCrashed as DeviceCrashed
from daemon.errors import DeviceRetired as DeviceRetired
from daemon.errors import DeviceStartError as DeviceStartError
from daemon.jobs import ModelInfo, Prepared
from daemon.messages import DeviceInfo, DeviceSpec
from daemon.runtimes.cache import images_in
from daemon.tasks import Payload

JPEG_SLOT_BYTES = 32 << 20  # the most JPEG bytes one batch carries (pipeline.decode = "device"), any backend
Answers = tuple[list[Payload | str], float]  # per image a payload or why its JPEG did not decode; model ms


class DeviceState(enum.Enum):
    STOPPED = "stopped"  # not started, or stopped and reaped
    STARTING = "starting"  # loading its model (or answered ERROR and is exiting)
    UP = "up"  # answered READY: takes batches
    STOPPING = "stopping"  # asked to stop: answers the batches it holds, takes no new one
    EXITED = "exited"  # gone; stop() reaps it


class DeviceKind(enum.Enum):
    """What a device computes on."""

    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True, slots=True)
class DeviceName:
    """A device's name, parsed once: `cpu`, `cpu:0`, `cuda:1` (local processes), `ray:gpu:3`,
    `ray:cpu:0` (Ray actors); any other `backend:...` name is a CPU device of that backend."""

    text: str  # as written in logs and metrics
    backend: str  # "local", "ray", or another backend's name
    kind: DeviceKind
    index: int | None  # cpu:0 -> 0, cuda:1 -> 1; None for a bare "cpu"

    @classmethod
    def parse(cls, text: str) -> DeviceName:
        head, _, rest = text.partition(":")
        if head in ("cpu", "cuda"):
            return cls(text, "local", DeviceKind(head), int(rest) if rest.isdigit() else None)
        kind, _, index = rest.partition(":")
        gpu = kind in ("gpu", "cuda")
        return cls(text, head, DeviceKind.CUDA if gpu else DeviceKind.CPU, int(index) if index.isdigit() else None)

    @property
    def torch(self) -> str:
        """The torch device the process opens: "cpu" for every CPU device, else "cuda:N"."""
        if self.kind is DeviceKind.CPU:
            return "cpu"
        return "cuda:0" if self.remote else self.text  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gives

    @property
    def remote(self) -> bool:
        """On another backend than this machine's processes (a Ray actor): its own runtime."""
        return self.backend != "local"


class Device(Protocol):
    device: str  # its name in logs and metrics: cpu:0, cuda:1, ray:node-3/cuda:0
    max_batch: int  # the most images one batch may hold
    slots: int  # batches it may hold at once (one computing, the next waiting)
    slot_bytes: int  # the most bytes of images one batch may carry
    slot_imgsz: int  # the largest letterboxed side it takes
    model: ModelInfo  # the model it serves, from its READY answer
    info: DeviceInfo | None  # the READY answer: weights, names, task, runtime, precision, ...; None before
    restarts: int  # counted by the supervisor
    state: DeviceState

    @property
    def up(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def pid(self) -> int | None: ...

    async def start(self, timeout_s: float) -> DeviceInfo:
        """Load the model and return the READY answer; DeviceStartError if it cannot."""
        ...

    async def infer(self, batch: list[Prepared], conf: float, iou: float) -> Answers:
        """Run one batch of one letterboxed shape. Raises DeviceCrashed, DeviceRetired or BatchFailed."""
        ...

    def set_level(self, level: str) -> None:
        """Apply a new log level (a config reload)."""
        ...

    async def wait_exit(self) -> None:
        """Return once the device is gone (it crashed, or was stopped)."""
        ...

    async def stop(self, timeout_s: float) -> None:
        """Answer the batches held, then stop; kill after `timeout_s`."""
        ...


async def start_all(devices: Sequence[Device], timeout_s: float) -> list[DeviceInfo]:
    """Start the devices at once and return their READY answers. If one fails, or this is
    cancelled (a stop request during start-up), all are stopped before it raises."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(w.start(timeout_s)) for w in devices]
    except BaseException as exc:
        await asyncio.gather(*(w.stop(0) for w in devices))
        if isinstance(exc, BaseExceptionGroup) and (failed := exc.subgroup(DeviceStartError)) is not None:
            raise failed.exceptions[0] from None
        raise
    return [t.result() for t in tasks]


def device_spec(config: Config, name: str, *, torch_threads: int) -> DeviceSpec:
    """What device `name` loads, from `config`: one spec for every backend (a backend may replace
    what differs on its machines: daemon.cluster sends the weights' bytes and runs "auto" as torch)."""
    m, p = config.model, config.pipeline
    return DeviceSpec(
        device=DeviceName.parse(name).torch,
        weights=m.weights,
        imgsz=m.imgsz,
        precision=m.precision.value,
        max_det=m.max_det,
        torch_threads=torch_threads,
        log=config.log,
        name=name,
        decode_jpegs=p.decode is Decode.DEVICE,
        runtime=m.runtime.value,
        cache_dir=str(config.paths.work / "models"),  # export.prepare filled it
        max_batch=p.max_batch,
        calibration=calibration_images(config),
    )


def calibration_images(config: Config) -> tuple[str, ...]:
    """model.calibration's images, when INT8 runs (they are part of its cache key)."""
    folder = config.model.calibration
    return tuple(str(p) for p in images_in(folder)) if folder is not None else ()
