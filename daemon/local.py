"""The parent's side of the device processes: which to run, spawn, READY/ERROR handshake, batches.

Each device gets one spawned process (`model.serve`) and a memory-mapped buffer of `slots`
batch slots. Images are copied into a free slot and only a small message crosses the pipe; the
reply arrives through the event loop's reader on the pipe, so nothing polls. `slots` batches may
be in flight at once: while the device computes one, the next is already waiting in memory.
With `pipeline.decode = "device"` a slot holds whole JPEGs instead, up to JPEG_SLOT_BYTES.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import mmap
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

from daemon import model, runtimes
from daemon.config import Config, Decode, Runtime
from daemon.devices import JPEG_SLOT_BYTES as JPEG_SLOT_BYTES  # re-exported: its old home
from daemon.devices import (
    Answers,
    BatchFailed,
    Device,
    DeviceCrashed,
    DeviceKind,
    DeviceName,
    DeviceRetired,
    DeviceStartError,
    DeviceState,
    device_spec,
)
from daemon.devices import calibration_images as calibration_images  # re-exported: its old home
from daemon.jobs import ModelInfo, Prepared
from daemon.messages import (
    Batch,
    BatchDone,
    BatchRaised,
    DeviceInfo,
    DeviceSpec,
    LoadFailed,
    Ready,
    SetLevel,
    Stop,
    refuse,
)

log = structlog.get_logger("daemon.local")
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
# A batch of JPEGs for the device to decode fits in this; a larger JPEG is decoded on the host.
# Five 2048x12000 photos (~6 MB each); the pages are touched only as far as they are used.


__all__ = ["BatchFailed", "DeviceCrashed", "DeviceRetired", "DeviceStartError", "DeviceState", "LocalDevice"]


class LocalDevice:
    """A Device (daemon.devices): one spawned local process and its shared batch slots."""

    def __init__(self, spec: DeviceSpec, *, max_batch: int, slots: int = 2, slot_imgsz: int = 0) -> None:
        """`slot_imgsz`: the largest letterboxed side a slot must hold, if more than the model's
        imgsz (after a reload that shrank imgsz, images letterboxed for the old size still queue).
        The spec's `name` is how logs and metrics call it (cpu:1), if not its torch device."""
        self.device: str = spec.name or spec.device
        self.max_batch = max_batch  # a slot holds this many images; a new batcher knob cannot grow it
        self.slot_imgsz: int = max(slot_imgsz, spec.imgsz)
        self.slot_bytes = max_batch * self.slot_imgsz * self.slot_imgsz * 3
        if spec.decode_jpegs:
            self.slot_bytes = max(self.slot_bytes, JPEG_SLOT_BYTES)
        self.slots = slots
        self.spec = spec
        self.info: DeviceInfo | None = None  # the READY answer
        self.model = ModelInfo(spec.weights, {}, spec.imgsz, False)  # set from READY
        self.restarts = 0
        self._ids = itertools.count()
        self._pending: dict[int, tuple[asyncio.Future[Any], int]] = {}
        self._free: asyncio.Queue[int] = asyncio.Queue(maxsize=slots)
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._buffer: mmap.mmap | None = None
        self._ready: asyncio.Future[DeviceInfo] | None = None
        self._exited = asyncio.Event()
        self._reaped: asyncio.Future[None] | None = None
        self._fills: set[asyncio.Future[Any]] = set()  # slots being filled: sent before a stop's Stop()
        self.state = DeviceState.STOPPED

    @property
    def up(self) -> bool:
        return self.state is DeviceState.UP

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self, timeout_s: float) -> DeviceInfo:
        """Spawn the process and wait for READY; raise DeviceStartError on ERROR, exit or timeout."""
        loop = asyncio.get_running_loop()
        path = self._allocate_slots()  # on the loop: a thread's result would be lost to a cancel
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        spec = msgspec.structs.replace(self.spec, buffer_path=path, slot_bytes=self.slot_bytes, slots=self.slots)
        self._proc = ctx.Process(target=model.serve, args=(spec, child_conn), name=f"inferd-{self.device}")
        self._exited.clear()
        self._ready = loop.create_future()
        self.state = DeviceState.STARTING
        try:
            self._proc.start()
            child_conn.close()
            loop.add_reader(self._conn.fileno(), self._on_message)
            # uvloop's poll makes the fd non-blocking; a reply over 16 KiB is written in two parts
            # (header, then body), and a read between them must wait, not fail as if it had died.
            os.set_blocking(self._conn.fileno(), True)
            info = self.info = await asyncio.wait_for(self._ready, timeout_s)
            self.model = ModelInfo(info.weights, info.names, self.spec.imgsz, info.half, info.runtime, info.precision)
        except TimeoutError:
            await self.stop(0)
            raise DeviceStartError(f"{self.device}: model not ready after {timeout_s:.0f} s", permanent=False) from None
        except DeviceStartError:
            await self.stop(5)  # after ERROR it exits by itself
            raise
        except BaseException:  # cancelled (a stop request during start-up): leave no process behind
            await self.stop(0)
            raise
        finally:
            os.unlink(path)  # both sides have it mapped; a crash leaves nothing behind
        while not self._free.empty():
            self._free.get_nowait()
        for slot in range(self.slots):
            self._free.put_nowait(slot)
        self.state = DeviceState.UP
        return info

    def _allocate_slots(self) -> str:
        """Create and map the shared slots, every page allocated now: a /dev/shm too small
        (Docker's default is 64 MiB) fails here with a message, not later as a SIGBUS mid-copy."""
        size = self.slot_bytes * self.slots
        try:
            fd, path = tempfile.mkstemp(prefix=f"inferd-{os.getpid()}-", dir=SHM_DIR)
        except OSError as exc:
            message = f"{self.device}: cannot create batch slots in {SHM_DIR}: {exc}"
            raise DeviceStartError(message, permanent=True) from None
        try:
            os.posix_fallocate(fd, 0, size)
            self._buffer = mmap.mmap(fd, size)
        except OSError as exc:
            os.unlink(path)
            free = shutil.disk_usage(SHM_DIR).free
            raise DeviceStartError(
                f"{self.device}: {SHM_DIR} has no room for its batch slots ({exc.strerror}): each device process "
                f"needs {size / 2**20:.0f} MiB ({self.slots} slots of {self.max_batch} images), {free / 2**20:.0f} MiB "
                f"are free. Give it more (a container: docker run --shm-size=1g), or lower pipeline.max_batch",
                permanent=True,
            ) from None
        finally:
            os.close(fd)
        return path

    async def infer(self, batch: list[Prepared], conf: float, iou: float) -> Answers:
        """Run one batch (same letterboxed shape); returns per-image boxes and the model time in ms."""
        slot = await self._free.get()
        try:
            if self.state is DeviceState.STOPPING:
                raise DeviceRetired(self.device)
            if not self.up or self._buffer is None:
                raise DeviceCrashed(f"{self.device} is not running", started=False)
            h, w = batch[0].shape
            # 10-32 MB of copying: in a thread, so the event loop keeps serving meanwhile.
            fill = asyncio.ensure_future(asyncio.to_thread(_fill, self._buffer, slot * self.slot_bytes, batch))
            self._fills.add(fill)
            fill.add_done_callback(self._fills.discard)
            jpegs = await fill
            # A stop() that came meanwhile waited for this fill: the batch goes before its None.
            if self.state not in (DeviceState.UP, DeviceState.STOPPING) or self._conn is None:
                raise DeviceCrashed(f"{self.device} is not running", started=False)
            batch_id = next(self._ids)
            metas = [(p.gain[0], p.gain[1], p.pad[0], p.pad[1], p.width, p.height) for p in batch]
            try:
                self._conn.send(Batch(batch_id, slot, len(batch), h, w, metas, conf, iou, jpegs))
            except OSError:  # it died and the loop has not read its EOF yet
                raise DeviceCrashed(f"{self.device} is not running", started=False) from None
        except BaseException:
            self._free.put_nowait(slot)  # nothing was sent: the slot is free again
            raise
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[batch_id] = (future, slot)
        log.debug("batch_sent", device=self.device, batch_id=batch_id, images=len(batch), in_flight=len(self._pending))
        result: Answers = await future
        return result

    def set_level(self, level: str) -> None:
        """Apply a new log level in the device process (a config reload)."""
        if self.up and self._conn is not None:
            with contextlib.suppress(OSError):  # gone: its restart gets the new config
                self._conn.send(SetLevel(level))

    def _on_message(self) -> None:
        assert self._conn is not None
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._on_exit()
            return
        match message:
            case Ready(info):
                if self._ready is not None and not self._ready.done():  # else start() gave up on it
                    self._ready.set_result(info)
            case LoadFailed(why, permanent):
                if self._ready is not None and not self._ready.done():  # after ERROR it exits by itself
                    self._ready.set_exception(DeviceStartError(f"{self.device}: {why}", permanent=permanent))
            case BatchDone(batch_id, answers, model_ms):
                if (future := self._settle(batch_id)) is not None:
                    future.set_result((answers, model_ms))
            case BatchRaised(batch_id, kind, why):
                if (future := self._settle(batch_id)) is not None:
                    future.set_exception(BatchFailed(kind, why))
            case _:
                refuse(message, f"{self.device}'s parent")

    def _settle(self, batch_id: int) -> asyncio.Future[Any] | None:
        """An answered batch's slot is free again; its future, unless its caller was cancelled
        (a drain that timed out) and nobody waits for it."""
        future, slot = self._pending.pop(batch_id)
        self._free.put_nowait(slot)
        return None if future.done() else future

    def _on_exit(self) -> None:
        """The pipe closed: the process is gone. Reap it, then fail what was in flight so it can be re-queued."""
        assert self._conn is not None and self._proc is not None
        asyncio.get_running_loop().remove_reader(self._conn.fileno())
        self._exited.set()
        self.state = DeviceState.EXITED
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(DeviceStartError(f"{self.device}: process exited during start", permanent=False))
        pending, self._pending = self._pending, {}
        # The pipe closes just before the process is reaped: join it (off the loop) for its exit code.
        self._reaped = asyncio.ensure_future(asyncio.to_thread(self._proc.join))
        self._reaped.add_done_callback(functools.partial(self._fail_in_flight, pending, self._proc))
        # The slots of the lost batches are free: whoever waits for one sees the worker is down.
        for _future, slot in pending.values():
            self._free.put_nowait(slot)

    def _fail_in_flight(
        self, pending: dict[int, tuple[asyncio.Future[Any], int]], proc: BaseProcess, _reaped: object
    ) -> None:
        # The process runs batches in the order sent; on a GPU it has two under way at once.
        running = sorted(pending)[: 2 if self.info is not None and self.info.pipelined else 1]
        for batch_id, (future, _slot) in pending.items():
            if not future.done():
                message = f"{self.device} exited with code {proc.exitcode}"
                future.set_exception(DeviceCrashed(message, started=batch_id in running))

    async def wait_exit(self) -> None:
        await self._exited.wait()

    async def stop(self, timeout_s: float) -> None:
        """Ask the process to finish, then escalate to SIGKILL after `timeout_s`."""
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        if self.state is DeviceState.UP:
            self.state = DeviceState.STOPPING
            if self._fills:  # batches being copied into their slots were handed to it: send them first
                await asyncio.wait(list(self._fills))
        if not self._exited.is_set():
            with contextlib.suppress(OSError):  # already gone: the reader notices
                conn.send(Stop())
            try:
                await asyncio.wait_for(self._exited.wait(), timeout_s)
            except TimeoutError:
                log.warning("worker_kill", device=self.device, pid=proc.pid, after_s=timeout_s)
                os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
                await self._exited.wait()
        # One joiner: _on_exit started it. Shielded, so a cancelled stop() leaves it to the next.
        await asyncio.shield(self._reaped or asyncio.ensure_future(asyncio.to_thread(proc.join)))
        conn.close()
        if self._buffer is not None:
            with contextlib.suppress(BufferError):  # a slot fill still holds a view: it closes when that ends
                self._buffer.close()
        self._proc = self._conn = self._buffer = None
        self._reaped = None
        self.state = DeviceState.STOPPED


def _fill(buffer: mmap.mmap, offset: int, batch: list[Prepared]) -> list[tuple[int, int]] | None:
    """Copy a batch into its slot at `offset` (in a thread); the JPEGs' (bytes, orientation), if
    the slot holds JPEGs rather than pixels."""
    size = sum(p.image.nbytes for p in batch)
    view = np.frombuffer(buffer, dtype=np.uint8, count=size, offset=offset)
    try:
        if batch[0].encoded_shape is None:
            h, w = batch[0].shape
            np.stack([p.image for p in batch], out=view.reshape(len(batch), h, w, 3))
            return None
        np.concatenate([p.image for p in batch], out=view)
        return [(p.image.nbytes, p.orientation) for p in batch]
    finally:
        del view  # a live view of the mmap would keep it from closing at stop()


def cores() -> int:
    return len(os.sched_getaffinity(0))


def cpu_runtime(config: Config) -> Runtime:
    """The runtime of the CPU processes: the configured one, else the table's unmeasured rule
    (the measured choice has already made "auto" concrete: export.resolve)."""
    runtime = config.model.runtime
    if runtime is Runtime.AUTO:
        exported = runtimes.exported_as(config.model.weights)
        return exported or next(r for r in runtimes.specs.AUTO_ORDER["cpu"] if runtimes.SPECS[r].installed())
    return runtime


def cpu_workers(config: Config) -> int:
    """Device processes for the CPU: as configured or measured (tuning.tune), else the
    runtime's own default from the table (PyTorch: one single-threaded process per core, up to
    4; OpenVINO: one process with every core's threads)."""
    if config.pipeline.cpu_workers:
        return config.pipeline.cpu_workers
    return runtimes.SPECS[cpu_runtime(config)].cpu_processes(cores())


async def resolve_devices(config: Config) -> list[str]:
    """Worker names: 'auto' is every CUDA device, or the CPU when there is none; the CPU gets
    `cpu_workers` processes, named cpu:0, cpu:1, ..."""
    names = await _devices(config.model.devices)
    count = cpu_workers(config)
    return [n for d in names for n in ([f"cpu:{i}" for i in range(count)] if d == "cpu" else [d])]


async def _devices(devices: tuple[str, ...]) -> list[str]:
    """torch is asked in a short-lived process: imported here, it would keep some 500 MiB resident
    in the main process, which otherwise never needs it."""
    if devices != ("auto",):
        return list(devices)
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import torch; print(torch.cuda.device_count())",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await probe.communicate()
    except BaseException:  # a stop request during start-up: the probe must not outlive us
        with contextlib.suppress(ProcessLookupError):
            probe.kill()
        await probe.wait()
        raise
    if probe.returncode != 0:
        message = f"cannot count CUDA devices: {err.decode(errors='replace').strip()[-500:]}"
        raise DeviceStartError(message, permanent=False)
    count = int(out.split()[-1])
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def resolve_decode(config: Config, devices: list[str]) -> Config:
    """`config` with `pipeline.decode = "auto"` made concrete for `devices`: on the device when
    every one is a GPU (on an H100, +18 % img/s at 1080p over 16 host threads), else on the host.
    Ray actors (ray:...) decode too: JPEG bytes cross the network, not ~10x as many pixels."""
    if config.pipeline.decode is not Decode.AUTO:
        return config
    names = [DeviceName.parse(d) for d in devices]
    decode = Decode.DEVICE if all(n.kind is DeviceKind.CUDA or n.remote for n in names) else Decode.HOST
    return dataclasses.replace(config, pipeline=dataclasses.replace(config.pipeline, decode=decode))


def torch_threads(config: Config, devices: list[str]) -> int:
    """Intra-op threads per device process: a CUDA worker needs few; CPU workers share the cores."""
    if config.pipeline.torch_threads:
        return config.pipeline.torch_threads
    cpu = sum(n.kind is DeviceKind.CPU and not n.remote for n in map(DeviceName.parse, devices))
    return max(1, cores() // cpu) if cpu == len(devices) else 2


def local_devices(config: Config, names: list[str], *, slot_imgsz: int = 0) -> list[Device]:
    """One (not yet started) device process per name; `slot_imgsz` as in LocalDevice."""
    threads = torch_threads(config, names)
    return [
        LocalDevice(
            device_spec(config, name, torch_threads=threads),
            max_batch=config.pipeline.device_batch,
            slot_imgsz=slot_imgsz,
        )
        for name in names
    ]
