"""RayDevice: the Device protocol (daemon.devices) served by an actor on a Ray cluster.

The batcher and the service use it as they use a local device process. A batch travels as one
array: JPEG bytes back to back where the actor decodes them (`pipeline.decode = "device"`, the
Ray backend's "auto"), else letterboxed pixels; answers are the same small payloads. The actor's
death fails the batch it was computing with DeviceCrashed(started=True), so the batcher's poison
rule applies across actors, and the batches queued behind it with started=False. The driver's
loss (the cluster gone) fails every batch with started=False: no image is blamed for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from typing import Any

import msgspec
import numpy as np
import structlog

from daemon.cluster.bridge import Bridge, ClusterLost
from daemon.devices import Answers, BatchFailed, DeviceCrashed, DeviceRetired, DeviceStartError, DeviceState
from daemon.jobs import ModelInfo, Prepared
from daemon.messages import (
    ActorLost,
    Batch,
    BatchDone,
    BatchRaised,
    DeviceInfo,
    DeviceSpec,
    Infer,
    LoadFailed,
    Ready,
    SetLevel,
    StartActor,
    StopActor,
    refuse,
)

log = structlog.get_logger("daemon.cluster")
_keys = itertools.count()  # every actor started gets a key of its own (a reload runs two of one name)
STOP_ANSWER_S = 5.0  # how long a stop waits for the driver to confirm the actor is killed


class RayDevice:
    """A Device: one Ray actor, restarted as a new actor by the service's supervisor."""

    def __init__(
        self,
        bridge: Bridge,
        name: str,
        spec: DeviceSpec,
        options: dict[str, Any],
        *,
        weights_path: str,
        max_batch: int,
        slot_bytes: int,
        slot_imgsz: int,
        slots: int = 2,
        start_grace_s: float = 0.0,
    ) -> None:
        self.device = name
        self.start_grace_s = start_grace_s  # on top of the start timeout: the node may measure first
        self.max_batch = max_batch
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.slot_imgsz = slot_imgsz
        self.spec = spec
        self.options = options
        self.weights_path = weights_path
        self.model = ModelInfo(weights_path, {}, spec.imgsz, False)
        self.info: DeviceInfo | None = None
        self.restarts = 0
        self.state = DeviceState.STOPPED
        self.bridge = bridge
        self.key = ""  # the current actor's key at the driver
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Answers]] = {}
        self._exited = asyncio.Event()
        bridge.on_lost.append(self._on_lost)

    @property
    def up(self) -> bool:
        return self.state is DeviceState.UP

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def pid(self) -> int | None:
        pid = self.info.pid if self.info is not None else None
        return pid if self.state is not DeviceState.STOPPED else None

    async def start(self, timeout_s: float) -> DeviceInfo:
        """Create the actor and wait until its model is loaded; DeviceStartError if it cannot."""
        self.key = f"{self.device}#{next(_keys)}"
        self._exited.clear()
        self.state = DeviceState.STARTING
        try:
            answer = await asyncio.wait_for(self._start(), timeout_s + self.start_grace_s)
        except TimeoutError:
            await self._kill()
            raise DeviceStartError(
                f"{self.device}: no actor ready after {timeout_s + self.start_grace_s:.0f} s (does the cluster "
                f"have the resources it asks for: {self.options}?)",
                permanent=False,
            ) from None
        except ClusterLost as exc:
            self.state = DeviceState.EXITED
            raise DeviceStartError(f"{self.device}: {exc}", permanent=False) from None
        except BaseException:  # DeviceStartError from connect, or cancelled: leave no actor behind
            await self._kill()
            raise
        if isinstance(answer, LoadFailed):
            await self._kill()
            raise DeviceStartError(f"{self.device}: {answer.message}", permanent=answer.permanent)
        # The weights as a local device names them: results are the same.
        info = self.info = msgspec.structs.replace(answer.info, weights=self.weights_path)
        self.model = ModelInfo(self.weights_path, info.names, self.spec.imgsz, info.half, info.runtime, info.precision)
        self.state = DeviceState.UP
        log.info("actor_started", device=self.device, node=info.node, pid=info.pid)
        if tuned := info.tuned:  # the node's measured choice (daemon.tuning.node)
            self.max_batch = min(self.max_batch, int(tuned["batch"]) or self.max_batch)
            log.info("runtime_tuned", device=self.device, node=info.node, **tuned)
        return info

    async def _start(self) -> Ready | LoadFailed:
        await self.bridge.connect()
        answer = await self.bridge.request(StartActor(self.key, self.spec, self.weights_path, self.options))
        if not isinstance(answer, Ready | LoadFailed):
            refuse(answer, self.device)
        return answer

    async def infer(self, batch: list[Prepared], conf: float, iou: float) -> Answers:
        """Send one batch to the actor; per image its payload (or why its JPEG failed), and the model ms."""
        if self.state is DeviceState.STOPPING:
            raise DeviceRetired(self.device)
        if not self.up:
            raise DeviceCrashed(f"{self.device} is not running", started=False)
        data, jpegs = await asyncio.to_thread(pack, batch)
        if not self.up:  # lost while packing
            raise DeviceCrashed(f"{self.device} is not running", started=False)
        h, w = batch[0].shape
        batch_id = next(self._ids)
        metas = [(p.gain[0], p.gain[1], p.pad[0], p.pad[1], p.width, p.height) for p in batch]
        message = Batch(batch_id, 0, len(batch), h, w, metas, conf, iou, jpegs)
        future: asyncio.Future[Answers] = asyncio.get_running_loop().create_future()
        self._pending[batch_id] = future
        request = asyncio.ensure_future(self.bridge.request(Infer(self.key, message, data)))
        request.add_done_callback(functools.partial(self._on_answer, batch_id))
        log.debug("batch_sent", device=self.device, batch_id=batch_id, images=len(batch), in_flight=len(self._pending))
        return await future

    def _on_answer(self, batch_id: int, request: asyncio.Future[Any]) -> None:
        future = self._pending.get(batch_id)
        if future is None:  # already failed: the actor or the cluster was lost
            return
        exc = request.exception() if not request.cancelled() else ClusterLost("cancelled")
        answer = request.result() if exc is None else None
        match answer:
            case BatchDone(_, answers, model_ms):
                del self._pending[batch_id]
                if not future.done():
                    future.set_result((answers, model_ms))
            case BatchRaised(_, kind, why):
                del self._pending[batch_id]
                if not future.done():
                    future.set_exception(BatchFailed(kind, why))
            case ActorLost(_, why):
                self._lost(f"{self.device}: actor lost: {why}", actor_died=True)
            case None:
                self._lost(f"{self.device}: {exc}", actor_died=False)
            case _:
                refuse(answer, self.device)

    def _on_lost(self, key: str | None) -> None:
        """The bridge says: the driver is gone (None), or an idle actor died (its key)."""
        if key is None:
            self._lost(f"{self.device}: {self.bridge.error}", actor_died=False)
        elif key == self.key:
            self._lost(f"{self.device}: actor lost", actor_died=True)

    def _lost(self, why: str, *, actor_died: bool) -> None:
        """Fail what is in flight: the batch the actor was computing (the first sent: an actor
        runs its calls in order) counts as an attempt if the actor died; the rest go back."""
        if self.state in (DeviceState.UP, DeviceState.STOPPING, DeviceState.STARTING):
            log.error("actor_lost", device=self.device, error=why, in_flight=len(self._pending))
            self.state = DeviceState.EXITED
        self._exited.set()
        pending, self._pending = self._pending, {}
        for i, batch_id in enumerate(sorted(pending)):
            if not pending[batch_id].done():
                pending[batch_id].set_exception(DeviceCrashed(why, started=actor_died and i == 0))

    def set_level(self, level: str) -> None:
        self.bridge.tell(SetLevel(level))

    async def wait_exit(self) -> None:
        await self._exited.wait()

    async def stop(self, timeout_s: float) -> None:
        """Let the actor answer what it holds (within `timeout_s`), then kill it."""
        if self.state is DeviceState.UP:
            self.state = DeviceState.STOPPING
            if self._pending and timeout_s > 0:
                await asyncio.wait(list(self._pending.values()), timeout=timeout_s)
        await self._kill()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DeviceCrashed(f"{self.device} was stopped", started=False))
        self.state = DeviceState.STOPPED
        self._exited.set()

    async def _kill(self) -> None:
        if self.key:
            # The driver gone (its actors with it), or it finds the actor dead: either way it is gone.
            with contextlib.suppress(ClusterLost, TimeoutError):
                await asyncio.wait_for(self.bridge.request(StopActor(self.key)), STOP_ANSWER_S)
        self.state = DeviceState.STOPPED


def pack(batch: list[Prepared]) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
    """A batch as one array (in a thread): pixels stacked (n, h, w, 3), or JPEGs back to back with
    their (bytes, EXIF orientation)."""
    if batch[0].encoded_shape is None:
        return np.stack([p.image for p in batch]), None
    return np.concatenate([p.image for p in batch]), [(p.image.nbytes, p.orientation) for p in batch]
