"""The unit of work that travels through the pipeline, and the ways it can fail."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar

import numpy as np

from daemon.config import TilingConfig
from daemon.errors import FailReason as FailReason  # re-exported: its old home
from daemon.errors import ItemError as ItemError
from daemon.tasks import Payload

Image = TypeVar("Image")


@dataclass(slots=True)
class Job:
    """One claimed input: `rel` is its path below incoming/, `path` where it lives now."""

    rel: PurePosixPath
    path: Path
    claimed_at: float = field(default_factory=time.monotonic)
    attempts: int = 0
    recovered: bool = False  # found in processing/ at start: an earlier run may have left temp files
    timings_ms: dict[str, float] = field(default_factory=dict)
    tile: Part | None = None  # a tile of a tiled image (daemon.tiling): its own attempts, its image's file


@dataclass(slots=True)
class Prepared:
    """A decoded, letterboxed image ready for a device, with what is needed to map boxes back."""

    job: Job
    image: np.ndarray  # (h, w, 3) uint8 RGB, letterboxed, h and w multiples of the stride; or JPEG bytes
    width: int  # original size, as the user sees it (EXIF orientation applied)
    height: int
    orientation: int  # EXIF orientation tag that was applied (1 = none)
    gain: tuple[float, float]  # letterbox scale (x, y) from original pixels to model pixels
    pad: tuple[int, int]  # letterbox padding (left, top) in model pixels
    ready_at: float = 0.0
    encoded_shape: tuple[int, int] | None = None  # `image` is a JPEG the device letterboxes to this (h, w)

    @property
    def shape(self) -> tuple[int, int]:
        """The letterboxed (h, w)."""
        return self.encoded_shape or (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def key(self) -> tuple[int, int, bool]:
        """What a batch must share: one shape, and pixels or JPEG bytes, not both."""
        return *self.shape, self.encoded_shape is not None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model a device process serves, as its results name it."""

    weights: str
    names: dict[int, str]
    imgsz: int
    half: bool
    runtime: str = "torch"
    precision: str = "fp32"


@dataclass(slots=True)
class Inferred:
    """One image's result: the task's payload (boxes, masks, keypoints, oriented boxes or the
    top 5 classes) in original pixels; `daemon.tasks` writes it."""

    prepared: Prepared
    payload: Payload
    device: str
    batch_size: int
    model: ModelInfo  # the one that produced them (a reload may have switched since)
    tiles: int = 0  # the tiles its payload was merged from (daemon.tiling); 0 = the image was not tiled


@dataclass(slots=True)
class Failure:
    """An input that will not get detections; the results stage files it in failed/."""

    job: Job
    error: ItemError


Outcome = Inferred | Failure  # what the results stage receives


@dataclass(slots=True)
class Tiled:
    """One tiled image on its way: where its tiles are and what came back of them."""

    image: Prepared  # the whole image's record (job, size as seen, orientation); no pixels
    boxes: list[tuple[int, int, int, int]]  # the tiles' places (x1 y1 x2 y2); the full image pass is not one
    parts: int  # results expected: tiles, plus one for the full image pass
    rule: TilingConfig  # the merge settings when it was cut (a reload applies to the next image)
    payloads: list[Payload] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)
    infer_ms: float = 0.0  # the model time of its batches, each shared among the batch's images
    batch_size: int = 0  # the largest batch any of its parts ran in
    batch_wait_ms: float = 0.0  # the longest any of its parts waited for a batch
    model: ModelInfo | None = None
    finished: bool = False  # its result (or failure) has left


@dataclass(frozen=True, slots=True)
class Part:
    """What a tile's `Job.tile` says: which image, and where the tile sits in it (None for the
    full-image pass, already in source pixels)."""

    of: Tiled
    origin: tuple[int, int] | None


class Capacity:
    """At most `limit` inputs claimed and not yet finished: the daemon's one backpressure bound.

    Intake acquires before it claims a file; the results stage releases when the file is done or
    failed. Memory therefore stays flat however large the backlog in incoming/ grows.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._slots = asyncio.Semaphore(limit)
        self._idle = asyncio.Event()
        self._idle.set()

    async def acquire(self) -> None:
        await self.acquire_up_to(1)

    async def acquire_up_to(self, n: int) -> int:
        """Wait for one slot, then take up to `n` in all, as many as are free now; how many."""
        await self._slots.acquire()
        taken = 1
        while taken < n and not self._slots.locked():
            await self._slots.acquire()  # a slot is free: this does not wait
            taken += 1
        self.in_flight += taken
        self._idle.clear()
        return taken

    def release(self, n: int = 1) -> None:
        self.in_flight -= n
        for _ in range(n):
            self._slots.release()
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Turns(Protocol[Image]):
    """The three image operations an EXIF orientation needs, of one array library."""

    def transpose(self, image: Image, /) -> Image: ...

    def flip(self, image: Image, /, *, rows: bool, cols: bool) -> Image: ...

    def rot90(self, image: Image, /, *, clockwise: bool) -> Image: ...


def orient(image: Image, orientation: int, turns: Turns[Image]) -> Image:
    """Apply an EXIF orientation as PIL's `ImageOps.exif_transpose` does: on the host (OpenCV,
    daemon.preprocess) and on the device (torch, daemon.model) alike."""
    if orientation in (5, 7):  # transpose; transverse is a transpose turned half round
        image = turns.transpose(image)
    if orientation in (3, 7):
        return turns.flip(image, rows=True, cols=True)
    if orientation in (2, 4):  # mirror, left-right or top-bottom
        return turns.flip(image, rows=orientation == 4, cols=orientation == 2)
    if orientation in (6, 8):  # a quarter turn, clockwise or counter-clockwise
        return turns.rot90(image, clockwise=orientation == 6)
    return image
