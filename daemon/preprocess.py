"""Stage 2: decode, orient and letterbox images in a bounded thread pool.

PIL's decoder and OpenCV's resize release the GIL, so threads scale across cores. JPEGs much
larger than the model input are decoded at reduced size through libjpeg's DCT scaling
(`Image.draft`): a 2048x12000 photo letterboxed to 640 never needs its 24 M pixels.
The letterbox arithmetic is Ultralytics' own (`LetterBox(auto=True, center=True)`), so the
tensors equal what `model.predict` feeds the network.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import stat
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.jobs import FailReason, Failure, ItemError, Job, Outcome, Prepared

STRIDE = 32
PAD_VALUE = 114
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class Settings:
    imgsz: int
    reduced_decode: bool
    max_pixels: int


def letterbox(
    image: np.ndarray, imgsz: int, *, source_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping aspect ratio and pad to the minimal stride-multiple rectangle.

    `source_size` (w, h) is the original size when `image` was decoded at reduced scale.
    Returns (letterboxed image, gain (x, y) from original to model pixels, pad (left, top)).
    """
    h, w = image.shape[:2]
    ow, oh = source_size or (w, h)
    r = min(imgsz / oh, imgsz / ow)
    new_w, new_h = max(round(ow * r), 1), max(round(oh * r), 1)
    dw, dh = (imgsz - new_w) % STRIDE / 2, (imgsz - new_h) % STRIDE / 2
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return image, (new_w / ow, new_h / oh), (left, top)


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


def decode(path: str, settings: Settings) -> tuple[np.ndarray, tuple[int, int], int]:
    """Decode to RGB uint8 with EXIF orientation applied: (array, (width, height) as seen, orientation).

    Raises ItemError for anything that is not a decodable image within the pixel limit.
    """
    try:
        with _regular_file(path) as f, _open(f) as im:
            w, h = im.size
            if w * h > settings.max_pixels:
                raise ItemError(
                    FailReason.TOO_LARGE, f"{w}x{h} = {w * h} pixels exceeds pipeline.max_pixels={settings.max_pixels}"
                )
            orientation = _orientation(im)
            seen = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            if settings.reduced_decode and im.format == "JPEG":
                r = settings.imgsz / max(w, h)
                if r < 0.5:  # libjpeg scales by 1/2, 1/4 or 1/8; never below the letterbox size
                    im.draft("RGB", (math.ceil(w * r), math.ceil(h * r)))
            oriented = ImageOps.exif_transpose(im)
            return _to_rgb(oriented), seen, orientation
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


def prepare(job: Job, settings: Settings) -> Prepared:
    """Decode and letterbox one claimed file (runs in a pool thread)."""
    image, seen, orientation = decode(str(job.path), settings)
    boxed, gain, pad = letterbox(image, settings.imgsz, source_size=seen)
    return Prepared(job, boxed, seen[0], seen[1], orientation, gain, pad)


async def run(
    jobs: asyncio.Queue[Job],
    ready: asyncio.Queue[Prepared],
    failed: asyncio.Queue[Outcome],
    pool: ThreadPoolExecutor,
    settings: Callable[[], Settings],
    concurrency: int,
) -> None:
    """Take claimed jobs, preprocess up to `concurrency` at once in `pool`, pass them on.

    `settings` is asked once per image: a config reload may change them.
    """
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)

    async def one(job: Job) -> None:
        try:
            started = time.monotonic()
            job.timings_ms["queue"] = (started - job.claimed_at) * 1000
            try:
                prepared = await loop.run_in_executor(pool, prepare, job, settings())
            except ItemError as exc:
                await failed.put(Failure(job, exc))
                return
            prepared.ready_at = time.monotonic()
            job.timings_ms["decode"] = (prepared.ready_at - started) * 1000
            await ready.put(prepared)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as group:
        while True:
            job = await jobs.get()
            await slots.acquire()
            group.create_task(one(job))
