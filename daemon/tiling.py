"""Sliced (tiled) inference: an image far larger than the model input is cut into tiles of the
model's size, each tile runs as an image of its own, and the image's result is their merge.

- Layout: `slices` is SAHI's `get_slice_bboxes` (stride = size - int(overlap * size); the last
  tile of a row or column shifted back inside, so every tile is full size; an image smaller than
  a tile is one tile). `wanted` says whether an image is tiled (`[tiling] mode`, `auto_above`).
- Preprocessing (`preprocess.prepare`) decodes the image at full resolution and hands on one
  `Prepared` per tile (a view of the decoded pixels, no copy) plus, with `full_image`, the whole
  image letterboxed. Tiles are images to the batcher: tiles of several images share batches, go
  to any device, and are retried, alone, like any image. Each carries its own `Job` (attempts
  are counted per tile) whose `tile` names its `Tiled` image.
- `Assembler` sits between the batcher and the results stage. An image's result leaves when
  its last tile is in: the tiles' payloads are moved to source pixels and merged by the task's
  rule (`daemon/tasks/<task>.merge`) in the thread pool, on the main process. One tile failing
  fails the image at once; its other tiles are dropped when they come back. See docs/tiling.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import structlog

from daemon import tasks
from daemon.config import TilingConfig, TilingMode
from daemon.jobs import Failure, Inferred, ItemError, Job, Outcome, Part, Prepared, Tiled
from daemon.tasks import Merge as Merge  # re-exported: its old home
from daemon.tasks import Payload, Task

log = structlog.get_logger("daemon.tiling")
Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in source pixels
DONE_WITH = np.empty((0, 0, 3), np.uint8)  # the pixels of a record that carries none
Letterbox = Callable[..., tuple[np.ndarray, tuple[float, float], tuple[int, int]]]  # preprocess.letterbox


def slices(width: int, height: int, size: int, overlap: float) -> list[Box]:
    """The tiles of a `width` x `height` image, row by row, exactly as SAHI's `get_slice_bboxes`
    with square slices of `size` and `overlap` as both ratios."""
    step_back = int(overlap * size)
    if size - step_back < 1:
        raise ValueError(f"overlap {overlap} leaves no stride for tiles of {size}")
    out: list[Box] = []
    y_min = y_max = 0
    while y_max < height:
        y_max = y_min + size
        if y_max > height:  # the last row, shifted back inside
            y_max, y_min = height, max(0, height - size)
        x_min = x_max = 0
        while x_max < width:
            x_max = x_min + size
            if x_max > width:
                x_max, x_min = width, max(0, width - size)
            out.append((x_min, y_min, x_max, y_max))
            x_min = x_max - step_back
        y_min = y_max - step_back
    return out


def wanted(size: tuple[int, int], imgsz: int, rule: TilingConfig) -> bool:
    """Whether an image of `size` (w, h) is tiled: always with mode on; with auto when
    letterboxing to `imgsz` would shrink it more than `auto_above` times."""
    if rule.mode is TilingMode.AUTO:
        return max(size) / imgsz > rule.auto_above
    return rule.mode is TilingMode.ON


def tile_size(rule: TilingConfig, imgsz: int) -> int:
    """The tile edge: `size`, or the model's imgsz for "auto"."""
    return rule.size or imgsz


def cut(
    job: Job, image: np.ndarray, orientation: int, imgsz: int, rule: TilingConfig, letterbox: Letterbox
) -> list[Prepared]:
    """One `Prepared` per tile of a decoded image (a view of its pixels when the tile is the model
    input's size, else letterboxed by `letterbox`), after, with `full_image`, the whole image
    letterboxed. Each has a `Job` of its own (attempts count per tile) whose `tile` names the image."""
    height, width = image.shape[:2]
    boxes = slices(width, height, tile_size(rule, imgsz), rule.overlap)
    whole = Prepared(job, DONE_WITH, width, height, orientation, (1.0, 1.0), (0, 0))
    tiled = Tiled(whole, boxes, len(boxes) + rule.full_image, rule)
    out: list[Prepared] = []
    if rule.full_image:
        boxed, gain, pad = letterbox(image, imgsz)
        out.append(Prepared(_part(job, Part(tiled, None)), boxed, width, height, 1, gain, pad))
    for x1, y1, x2, y2 in boxes:
        part = _part(job, Part(tiled, (x1, y1)))
        view = image[y1:y2, x1:x2]
        if view.shape[:2] == (imgsz, imgsz):
            out.append(Prepared(part, view, x2 - x1, y2 - y1, 1, (1.0, 1.0), (0, 0)))
        else:
            boxed, gain, pad = letterbox(view, imgsz)
            out.append(Prepared(part, boxed, x2 - x1, y2 - y1, 1, gain, pad))
    return out


def _part(job: Job, part: Part) -> Job:
    return Job(job.rel, job.path, job.claimed_at, recovered=job.recovered, tile=part)


def merger(task: Task) -> Merge:
    """The task's merge rule (daemon/tasks/<task>.merge)."""
    return tasks.module(task).merge


def assemble(tiled: Tiled) -> Payload:
    """The image's payload: its parts merged by their task's rule (in a pool thread)."""
    return merger(tiled.payloads[0].task)(tiled.payloads, tiled.rule)


class Assembler:
    """Between the batcher and the results stage: whole images pass straight on; a tiled image's
    parts are gathered and its merged result passed on when the last one is in."""

    def __init__(self, out: asyncio.Queue[list[Outcome]], pool: Executor) -> None:
        self.out = out
        self.pool = pool

    async def put(self, outcomes: list[Outcome]) -> None:
        passed: list[Outcome] = []
        done: list[Tiled] = []
        for outcome in outcomes:
            job = outcome.job if isinstance(outcome, Failure) else outcome.prepared.job
            part = job.tile
            if part is None:
                passed.append(outcome)
                continue
            tiled = part.of
            if tiled.finished:
                continue  # its image has already failed
            if isinstance(outcome, Failure):
                tiled.finished = True
                passed.append(Failure(tiled.image.job, outcome.error))
                continue
            self._add(tiled, part, outcome)
            if len(tiled.payloads) == tiled.parts:
                tiled.finished = True
                done.append(tiled)
        if passed:
            await self.out.put(passed)
        if done:
            loop = asyncio.get_running_loop()
            jobs = [loop.run_in_executor(self.pool, self._finish, t) for t in done]
            merged = await asyncio.gather(*jobs, return_exceptions=True)
            await self.out.put([self._or_failure(t, m) for t, m in zip(done, merged, strict=True)])

    @staticmethod
    def _or_failure(tiled: Tiled, merged: Outcome | BaseException) -> Outcome:
        """The merged result, or the image's last-resort failure if merging it met a bug."""
        if isinstance(merged, Exception):
            log.error("internal_error", stage="tiling", path=str(tiled.image.job.rel), exc_info=merged)
            return Failure(tiled.image.job, ItemError.internal(merged))
        if isinstance(merged, BaseException):
            raise merged  # a cancellation is not the image's
        return merged

    @staticmethod
    def _add(tiled: Tiled, part: Part, result: Inferred) -> None:
        payload = result.payload
        if part.origin is not None:
            payload = payload.shifted(*part.origin)
        tiled.payloads.append(payload)
        tiled.devices.add(result.device)
        timings = result.prepared.job.timings_ms
        tiled.infer_ms += timings.get("infer", 0.0) / result.batch_size
        tiled.batch_wait_ms = max(tiled.batch_wait_ms, timings.get("batch_wait", 0.0))
        tiled.batch_size = max(tiled.batch_size, result.batch_size)
        tiled.model = result.model

    @staticmethod
    def _finish(tiled: Tiled) -> Outcome:
        started = time.monotonic()
        payload = assemble(tiled)
        timings = tiled.image.job.timings_ms
        timings["batch_wait"] = tiled.batch_wait_ms
        timings["infer"] = tiled.infer_ms
        timings["merge"] = (time.monotonic() - started) * 1000
        assert tiled.model is not None
        device = ",".join(sorted(tiled.devices))
        return Inferred(tiled.image, payload, device, tiled.batch_size, tiled.model, tiles=len(tiled.boxes))
