"""Stage 2: decode, orient and letterbox images in a bounded thread pool.

JPEGs are decoded by OpenCV, which holds the GIL for none of it, so threads scale across cores;
other formats by PIL. JPEGs much larger than the model input are decoded at reduced size through
libjpeg's DCT scaling: a 2048x12000 photo letterboxed to 640 never needs its 24 M pixels.
The letterbox arithmetic is Ultralytics' own (`LetterBox(auto=True, center=True)`), so the
tensors equal what `model.predict` feeds the network.

With `pipeline.decode = "device"`, a baseline JPEG is only read and its header parsed here: its
bytes travel to the device process, which decodes (nvJPEG on a GPU), orients and letterboxes it
to the geometry computed here (`model.decode_batch`). Anything else is decoded here as usual.
"""

from __future__ import annotations

import asyncio
import errno
import io
import math
import os
import stat
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import BinaryIO

import cv2
import numpy as np
import structlog
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon import tiling
from daemon.config import TilingConfig, TilingMode
from daemon.jobs import FailReason, Failure, ItemError, Job, Outcome, Prepared, orient

log = structlog.get_logger("daemon.preprocess")
STRIDE = 32
PAD_VALUE = 114
EXIF_ORIENTATION = 0x0112


GROUP = 4  # most jobs one thread job preprocesses
JPEG_END = b"\xff\xd9"
READ_WHOLE_BYTES = 64 << 20  # files up to this size are read into memory at once; larger ones stream
REDUCED_COLOR = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


@dataclass(frozen=True, slots=True)
class PrepSettings:
    imgsz: int
    reduced_decode: bool
    max_pixels: int
    device_max_bytes: int = 0  # JPEGs up to this size are decoded by the device process; 0 = none
    classify: bool = False  # a classification model: resize the short side and crop (no letterbox)
    tiling: TilingConfig = field(default_factory=TilingConfig)  # mode off for classification (a ConfigError refuses it)

    def tiled(self, seen: tuple[int, int]) -> bool:
        """Whether an image of `seen` (w, h) is cut into tiles: then it is decoded at full size here."""
        return tiling.wanted(seen, self.imgsz, self.tiling)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where an image of `source` size (w, h) lands in its letterboxed model input."""

    size: tuple[int, int]  # resized (w, h)
    pad: tuple[int, int, int, int]  # left, top, right, bottom

    @property
    def shape(self) -> tuple[int, int]:
        """The letterboxed (h, w): multiples of the stride."""
        left, top, right, bottom = self.pad
        return self.size[1] + top + bottom, self.size[0] + left + right


def geometry(source: tuple[int, int], imgsz: int) -> Geometry:
    ow, oh = source
    r = min(imgsz / oh, imgsz / ow)
    new_w, new_h = max(round(ow * r), 1), max(round(oh * r), 1)
    dw, dh = (imgsz - new_w) % STRIDE / 2, (imgsz - new_h) % STRIDE / 2
    return Geometry((new_w, new_h), (round(dw - 0.1), round(dh - 0.1), round(dw + 0.1), round(dh + 0.1)))


def letterbox(
    image: np.ndarray, imgsz: int, *, source_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping aspect ratio and pad to the minimal stride-multiple rectangle.

    `source_size` (w, h) is the original size when `image` was decoded at reduced scale.
    Returns (letterboxed image, gain (x, y) from original to model pixels, pad (left, top)).
    """
    h, w = image.shape[:2]
    ow, oh = source_size or (w, h)
    g = geometry((ow, oh), imgsz)
    if (w, h) != g.size:
        image = cv2.resize(image, g.size, interpolation=cv2.INTER_LINEAR)
    left, top, right, bottom = g.pad
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return image, (g.size[0] / ow, g.size[1] / oh), (left, top)


def _regular_file(path: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file; never through a symlink, never blocking.

    Intake routes special files to failed/ by their mode, but a FIFO swapped in under the same
    name would block a pool thread for good if opened blindly.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ItemError(FailReason.SYMLINK, "symbolic links are not followed") from None
        raise
    f = os.fdopen(fd, "rb")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ItemError(FailReason.NOT_REGULAR, "not a regular file (FIFO, socket or device)")
        os.set_blocking(fd, True)
    except BaseException:
        f.close()
        raise
    return f


def _open(f: BinaryIO) -> Image.Image:
    """PIL's own `Image.open`. Importing Ultralytics replaces it with a wrapper that tries to
    pip-install a HEIF plugin whenever a file is not an image; the bench and tests import both."""
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", Image.open)
    image: Image.Image = opener(f)
    return image


def decode(path: str, settings: PrepSettings) -> tuple[np.ndarray | bytes, tuple[int, int], int]:
    """Decode to RGB uint8 with EXIF orientation applied: (array, (width, height) as seen, orientation).

    A JPEG the device process will decode (`PrepSettings.device_max_bytes`) is returned as its bytes.
    Raises ItemError for anything that is not a decodable image within the pixel limit.
    """
    try:
        with _regular_file(path) as raw:
            f: BinaryIO = raw
            data = b""
            if os.fstat(raw.fileno()).st_size <= READ_WHOLE_BYTES:
                data = raw.read()  # one read; the header is parsed from memory
                f = io.BytesIO(data)
            with _open(f) as im:
                w, h = im.size
                if w * h > settings.max_pixels:
                    raise ItemError(
                        FailReason.TOO_LARGE,
                        f"{w}x{h} = {w * h} pixels exceeds pipeline.max_pixels={settings.max_pixels}",
                    )
                orientation = _orientation(im)
                seen = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
                if settings.tiled(seen):  # every pixel is needed, and the tiles are cut here
                    settings = replace(settings, reduced_decode=False, device_max_bytes=0)
                if not _plain_jpeg(im, data):
                    return _decode(im, settings), seen, orientation
                if len(data) <= settings.device_max_bytes and not im.info.get("progressive"):
                    return data, seen, orientation
        return _decode_jpeg(data, (w, h), orientation, settings), seen, orientation
    except ItemError:
        raise
    except Image.DecompressionBombError as exc:
        raise ItemError(FailReason.TOO_LARGE, str(exc)) from None
    except UnidentifiedImageError:
        raise ItemError(FailReason.NOT_IMAGE, "not an image format that can be decoded") from None
    except OSError as exc:
        if exc.errno is not None:  # the system could not give us the bytes; PIL's own errors carry no errno
            raise ItemError(FailReason.UNREADABLE, f"cannot read: {exc.strerror}") from None
        raise ItemError(FailReason.NOT_IMAGE, f"cannot decode: {exc}") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ItemError(FailReason.NOT_IMAGE, f"cannot decode: {exc}") from None


def _plain_jpeg(im: Image.Image, data: bytes) -> bool:
    """A whole JPEG in memory, in a colour space every decoder handles. Anything less common
    (CMYK, a missing end marker) goes through PIL, which reports errors precisely."""
    return im.format == "JPEG" and im.mode in ("RGB", "L") and data.endswith(JPEG_END)


def _draft_size(size: tuple[int, int], settings: PrepSettings) -> tuple[int, int] | None:
    """The least (w, h) a reduced-size JPEG decode must keep (the letterboxed size), or None when
    libjpeg's 1/2, 1/4 or 1/8 scaling cannot help."""
    w, h = size
    r = settings.imgsz / (min(w, h) if settings.classify else max(w, h))  # the side resized to imgsz
    if not settings.reduced_decode or r >= 0.5:
        return None
    return math.ceil(w * r), math.ceil(h * r)


def _reduction(size: tuple[int, int], settings: PrepSettings) -> int:
    """The DCT scale-down (1, 2, 4 or 8) for OpenCV: PIL's `draft` rule for `_draft_size`, so
    both decoders give the same pixels."""
    least = _draft_size(size, settings)
    if least is None:
        return 1
    most = min(size[0] // least[0], size[1] // least[1])
    return max(s for s in (1, 2, 4, 8) if s <= most)


def _decode_jpeg(data: bytes, size: tuple[int, int], orientation: int, settings: PrepSettings) -> np.ndarray:
    """OpenCV's decoder: unlike PIL's, nothing of it holds the GIL (PIL copies an image three
    times under it on the way to an array), so decode threads scale with the cores."""
    flags = REDUCED_COLOR[_reduction(size, settings)] | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise ItemError(FailReason.NOT_IMAGE, "cannot decode: corrupt JPEG data")
    cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    return orient(image, orientation, _ArrayTurns)


class _ArrayTurns:
    """`jobs.orient`'s operations on an (h, w, 3) array, by OpenCV."""

    @staticmethod
    def transpose(image: np.ndarray, /) -> np.ndarray:
        return cv2.transpose(image)

    @staticmethod
    def flip(image: np.ndarray, /, *, rows: bool, cols: bool) -> np.ndarray:
        if rows and cols:
            return cv2.rotate(image, cv2.ROTATE_180)
        return cv2.flip(image, 1 if cols else 0)

    @staticmethod
    def rot90(image: np.ndarray, /, *, clockwise: bool) -> np.ndarray:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE if clockwise else cv2.ROTATE_90_COUNTERCLOCKWISE)


def _decode(im: Image.Image, settings: PrepSettings) -> np.ndarray:
    least = _draft_size(im.size, settings) if im.format == "JPEG" else None
    if least is not None:
        im.draft("RGB", least)
    return _to_rgb(ImageOps.exif_transpose(im))


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag if it is one of 1..8, else 1.

    A malformed tag (text, 0, 9) is metadata noise, not a reason to fail a good image, and
    `ImageOps.exif_transpose` leaves such an image as it is, so it is reported as unrotated.
    """
    value = im.getexif().get(EXIF_ORIENTATION, 1)
    try:
        orientation = int(value)
    except (TypeError, ValueError):
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the high byte, as OpenCV does
        grey = np.asarray(im).astype(np.uint32)
        shift = 8 if im.mode.startswith("I;16") or grey.max(initial=0) < 65536 else 24
        return np.repeat((grey >> shift).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        grey = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # straight to RGB, PIL warns about palette transparency given as bytes
    return np.asarray(im.convert("RGB"))


def centre_crop(image: np.ndarray, imgsz: int, *, source_size: tuple[int, int] | None = None) -> np.ndarray:
    """Classification's input, as Ultralytics' `classify_transforms`: the short side resized to
    `imgsz` (PIL's antialiased bilinear, torchvision's `Resize` sizes), then the centre `imgsz`
    square (`CenterCrop`). `source_size` (w, h): the original size when `image` was decoded at
    reduced scale, so that the sizes are those of a full decode."""
    w, h = source_size or (image.shape[1], image.shape[0])
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(imgsz * long / short)
    new_w, new_h = (imgsz, new_long) if w <= h else (new_long, imgsz)
    resized = Image.fromarray(image)
    if resized.size != (new_w, new_h):
        resized = resized.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = round((new_h - imgsz) / 2.0), round((new_w - imgsz) / 2.0)
    return np.ascontiguousarray(np.asarray(resized)[top : top + imgsz, left : left + imgsz])


def prepare_any(job: Job, settings: PrepSettings) -> Prepared | list[Prepared]:
    """`prepare`, or for an image to be tiled (`PrepSettings.tiled`) its tiles (`cut`)."""
    image, seen, orientation = decode(str(job.path), settings)
    if not isinstance(image, bytes) and settings.tiled(seen):
        return tiling.cut(job, image, orientation, settings.imgsz, settings.tiling, letterbox)
    return _prepared(job, image, seen, orientation, settings)


def prepare(job: Job, settings: PrepSettings) -> Prepared:
    """Decode and letterbox (or, for classification, crop) one claimed file (runs in a pool thread)."""
    image, seen, orientation = decode(str(job.path), settings)
    return _prepared(job, image, seen, orientation, settings)


def _prepared(
    job: Job, image: np.ndarray | bytes, seen: tuple[int, int], orientation: int, settings: PrepSettings
) -> Prepared:
    if settings.classify and not isinstance(image, bytes):
        crop = centre_crop(image, settings.imgsz, source_size=seen)
        return Prepared(job, crop, seen[0], seen[1], orientation, (1.0, 1.0), (0, 0))
    if isinstance(image, bytes):
        g = geometry(seen, settings.imgsz)
        gain = (g.size[0] / seen[0], g.size[1] / seen[1])
        encoded = np.frombuffer(image, np.uint8)
        return Prepared(job, encoded, seen[0], seen[1], orientation, gain, g.pad[:2], encoded_shape=g.shape)
    boxed, gain, pad = letterbox(image, settings.imgsz, source_size=seen)
    return Prepared(job, boxed, seen[0], seen[1], orientation, gain, pad)


async def run(
    jobs: asyncio.Queue[Job],
    ready: asyncio.Queue[Prepared],
    failed: asyncio.Queue[list[Outcome]],
    pool: ThreadPoolExecutor,
    settings: Callable[[], PrepSettings],
    concurrency: int,
) -> None:
    """Take claimed jobs, preprocess up to `concurrency` groups at once in `pool`, pass them on.

    A group is the next job and, under a backlog, up to GROUP - 1 more already waiting: one
    thread job for them all, so the event loop pays one hand-off per group, not per image.
    `settings` is asked once per group: a config reload may change them.
    """
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)

    async def some(group: list[Job]) -> None:
        try:
            done = await loop.run_in_executor(pool, prepare_all, group, settings())
            now = time.monotonic()
            for job, (outcome, ms) in zip(group, done, strict=True):
                job.timings_ms["decode"] = ms
                if isinstance(outcome, Prepared):
                    outcome.ready_at = now
                    await ready.put(outcome)
                    continue
                if isinstance(outcome, list):  # a tiled image: its tiles wait here until the batcher has room
                    for tile in outcome:
                        tile.ready_at = time.monotonic()
                        await ready.put(tile)
                    continue
                if not isinstance(outcome, ItemError):
                    log.error("internal_error", stage="preprocess", path=str(job.rel), exc_info=outcome)
                    outcome = ItemError.internal(outcome)
                await failed.put([Failure(job, outcome)])
        finally:
            slots.release()

    async with asyncio.TaskGroup() as tasks:
        while True:
            group = [await jobs.get()]
            await slots.acquire()
            size = min(GROUP, 1 + jobs.qsize() // concurrency)  # a short queue keeps every thread busy
            if settings().tiling.mode is not TilingMode.OFF:
                size = 1  # a strip's decoded pixels wait for the batcher: one per thread job, not four
            while len(group) < size and not jobs.empty():
                group.append(jobs.get_nowait())
            now = time.monotonic()
            for job in group:
                job.timings_ms["queue"] = (now - job.claimed_at) * 1000
            tasks.create_task(some(group))


Result = Prepared | list[Prepared] | Exception


def prepare_all(jobs: list[Job], settings: PrepSettings) -> list[tuple[Result, float]]:
    """`prepare` each job (in a pool thread): per job its result or error, and the ms it took."""
    out: list[tuple[Result, float]] = []
    for job in jobs:
        started = time.monotonic()
        try:
            result: Result = prepare_any(job, settings)
        except Exception as exc:  # noqa: BLE001 - each job's own outcome: ItemError, or a bug
            result = exc
        out.append((result, (time.monotonic() - started) * 1000))
    return out
