"""Stage 3: dynamic batching across the devices.

Prepared images are grouped by letterboxed shape (a batch must be one tensor). A group is sent
to the least busy device that can take one:
- at once if that device is idle (an idle daemon adds no batching delay);
- when the group is full (`max_batch`), or its oldest image has waited `max_wait_ms`, if the
  device is busy: the device then never waits, and batches fill under load.
A batch that fails is retried image by image, so one bad image (or an out-of-memory on a big
batch) fails only itself. Images in the batch a device died on are retried alone; an image
that has taken down `max_attempts` devices is failed as poison. A batch that was still queued
on the dying device is put back as it was, without counting an attempt. A suspect (an image
retried after a failure) runs alone on its device, so the next failure is its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

from daemon.devices import BatchFailed, Device, DeviceCrashed, DeviceRetired
from daemon.jobs import FailReason, Failure, Inferred, ItemError, Outcome, Prepared
from daemon.tasks import Payload

log = structlog.get_logger("daemon.batching")
DONE_WITH = np.empty((0, 0, 3), np.uint8)


class Outbox(Protocol):
    """Where a batch's outcomes go: the results stage's queue, or `tiling.Assembler` before it."""

    async def put(self, item: list[Outcome]) -> None: ...


@dataclass(slots=True)
class Knobs:
    """Live-tunable batching and threshold settings (a config reload replaces them)."""

    max_batch: int
    max_wait_ms: int
    conf: float
    iou: float
    max_attempts: int


class Batcher:
    def __init__(
        self,
        ready: asyncio.Queue[Prepared],
        devices: list[Device],
        inferred: Outbox,
        knobs: Knobs,
    ) -> None:
        self.ready = ready
        self.devices = devices
        self.out = inferred
        self.knobs = knobs
        self.groups: dict[tuple[int, int, bool], collections.deque[Prepared]] = {}
        self.solo: collections.deque[Prepared] = collections.deque()  # retried alone, first
        self.wake = asyncio.Event()
        self.taken = asyncio.Event()  # a batch left the groups: there may be room to collect
        self.batches = 0
        # Batches given to each device and not yet answered; counted from dispatch, as the
        # device's own count starts only when the task runs.
        self.busy: collections.Counter[Device] = collections.Counter()
        self.alone: set[Device] = set()  # running a suspect: nothing else goes there

    @property
    def waiting(self) -> int:
        return len(self.solo) + sum(len(g) for g in self.groups.values())

    @property
    def room(self) -> int:
        """How many decoded images may wait here: enough for a full batch per device and one more.
        More would only hold pixels in memory (a backlog waits in incoming/, not here)."""
        return self.knobs.max_batch * (len(self.devices) + 1)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._collect())
            while True:
                device = self._pick_device()
                batch = self._take_batch(device) if device else None
                if device and batch:
                    self.busy[device] += 1
                    self.taken.set()
                    group.create_task(self._infer(device, batch))
                    continue
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self._next_deadline(device))

    async def _collect(self) -> None:
        while True:
            while self.waiting >= self.room:
                self.taken.clear()
                await self.taken.wait()
            item = await self.ready.get()
            self.groups.setdefault(item.key, collections.deque()).append(item)
            self.wake.set()

    def _pick_device(self) -> Device | None:
        candidates = [w for w in self.devices if w.up and self.busy[w] < w.slots and w not in self.alone]
        return min(candidates, key=lambda w: self.busy[w], default=None)

    def _take_batch(self, device: Device) -> list[Prepared] | None:
        if self.solo:
            if self.busy[device]:
                return None  # a suspect waits for an idle device
            self.alone.add(device)
            return [self.solo.popleft()]
        if not self.groups:
            return None
        size = min(self.knobs.max_batch, device.max_batch)
        group = min(self.groups.values(), key=lambda g: g[0].ready_at)
        full = max(self.groups.values(), key=len)
        if len(full) >= size:
            group = full
        elif self.busy[device] and (time.monotonic() - group[0].ready_at) * 1000 < self.knobs.max_wait_ms:
            return None  # the device is busy: let the batch fill until it is full or due
        batch = [group.popleft()]
        used = batch[0].image.nbytes
        while group and len(batch) < size and used + group[0].image.nbytes <= device.slot_bytes:
            used += group[0].image.nbytes  # JPEG bytes vary; decoded pixels always fit
            batch.append(group.popleft())
        for key in [k for k, v in self.groups.items() if not v]:
            del self.groups[key]
        return batch

    def _next_deadline(self, device: Device | None) -> float | None:
        """Seconds until the oldest group is due, if a device could take it; else wait for a wake."""
        if device is None or not self.groups or self.solo:  # a waiting suspect goes first, on a wake
            return None
        oldest = min(g[0].ready_at for g in self.groups.values())
        return max(0.0, oldest + self.knobs.max_wait_ms / 1000 - time.monotonic())

    async def _infer(self, device: Device, batch: list[Prepared]) -> None:
        sent = time.monotonic()
        for p in batch:
            p.job.timings_ms["batch_wait"] = (sent - p.ready_at) * 1000
        try:
            boxes, infer_ms = await self._call(device, batch)
        except DeviceRetired:  # a reload retires it: the new devices take the batch
            self._requeue(batch)
        except DeviceCrashed as exc:
            log.error("worker_crashed", device=device.device, in_flight=len(batch), started=exc.started, error=str(exc))
            if exc.started:
                await self._retry(batch, crashed=True, why=str(exc))
            else:
                self._requeue(batch)
        except BatchFailed as exc:
            log.warning("batch_failed", device=device.device, size=len(batch), kind=exc.kind, error=str(exc))
            await self._retry(batch, crashed=False, why=str(exc))
        except Exception as exc:
            log.error("internal_error", stage="batching", device=device.device, size=len(batch), exc_info=exc)
            await self.out.put([Failure(p.job, ItemError.internal(exc)) for p in batch])
        else:
            self.batches += 1
            outcomes: list[Outcome] = []
            for p, b in zip(batch, boxes, strict=True):  # the device answers one entry per image
                p.job.timings_ms["infer"] = infer_ms
                p.image = DONE_WITH  # the pixels are not needed any more: free them before the write
                if isinstance(b, str):  # its JPEG failed on the device's decoder
                    outcomes.append(Failure(p.job, ItemError(FailReason.NOT_IMAGE, b)))
                else:
                    outcomes.append(Inferred(p, b, device.device, len(batch), device.model))
            await self.out.put(outcomes)  # the results stage writes a batch at once
        finally:
            self.wake.set()

    async def _call(self, device: Device, batch: list[Prepared]) -> tuple[list[Payload | str], float]:
        try:
            return await device.infer(batch, self.knobs.conf, self.knobs.iou)
        finally:
            self.busy[device] -= 1
            if not self.busy[device]:
                del self.busy[device]  # a device retired by a reload leaves no entry behind
                self.alone.discard(device)
            self.wake.set()

    def _requeue(self, batch: list[Prepared]) -> None:
        """A batch that never reached the model goes back, first in line, as it was."""
        for p in reversed(batch):
            if p.job.attempts:  # a suspect from an earlier failure is still only tried alone
                self.solo.appendleft(p)
            else:
                self.groups.setdefault(p.key, collections.deque()).appendleft(p)

    async def _retry(self, batch: list[Prepared], *, crashed: bool, why: str) -> None:
        for p in batch:
            p.job.attempts += 1
            if crashed and p.job.attempts >= self.knobs.max_attempts:
                reason = FailReason.POISON
            elif not crashed and len(batch) == 1:
                reason = FailReason.INFERENCE
            else:
                self.solo.append(p)
                continue
            await self.out.put([Failure(p.job, ItemError(reason, f"{why} (attempt {p.job.attempts})"))])
