"""Preprocessing on real images: Ultralytics' letterbox, EXIF orientation, reduced decode, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assets, photo_like
from PIL import Image

from daemon import preprocess
from daemon.jobs import FailReason, ItemError, Job

SETTINGS = preprocess.PrepSettings(imgsz=640, reduced_decode=False, max_pixels=100_000_000)


def job_for(path: Path) -> Job:
    from pathlib import PurePosixPath

    return Job(PurePosixPath(path.name), path)


@pytest.mark.parametrize("name", ["bus.jpg", "zidane.jpg"])
def test_letterbox_equals_ultralytics(name: str) -> None:
    import cv2
    from ultralytics.data.augment import LetterBox

    bgr = cv2.imread(str(assets() / name))
    expected = LetterBox((640, 640), auto=True, stride=32)(image=bgr)[..., ::-1]  # to RGB
    prepared = preprocess.prepare(job_for(assets() / name), SETTINGS)
    assert prepared.image.shape == expected.shape
    # Same arithmetic and resize; PIL's and OpenCV's JPEG decoders may differ by a rounding step.
    assert np.abs(prepared.image.astype(int) - expected.astype(int)).mean() < 1.0
    h, w = bgr.shape[:2]
    assert (prepared.width, prepared.height) == (w, h)


@pytest.mark.parametrize(("size", "shape"), [((1920, 1080), (384, 640)), ((2048, 12000), (640, 128))])
def test_shapes_are_minimal_stride_rectangles(tmp_path: Path, size: tuple[int, int], shape: tuple[int, int]) -> None:
    path = tmp_path / "x.jpg"
    Image.new("RGB", size, (90, 120, 150)).save(path, quality=90)
    prepared = preprocess.prepare(job_for(path), SETTINGS)
    assert prepared.shape == shape


def test_reduced_decode_matches_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "tall.jpg"
    photo_like(2048, 12000, seed=3).save(path, quality=90)
    full = preprocess.prepare(job_for(path), SETTINGS)
    fast = preprocess.prepare(job_for(path), preprocess.PrepSettings(640, True, 100_000_000))
    assert fast.shape == full.shape == (640, 128)
    assert (fast.width, fast.height, fast.gain, fast.pad) == (full.width, full.height, full.gain, full.pad)
    # DCT scaling averages where a linear resize samples: close, not identical.
    assert np.abs(fast.image.astype(int) - full.image.astype(int)).mean() < 8


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = photo_like(400, 200, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    prepared = preprocess.prepare(job_for(path), SETTINGS)
    assert (prepared.width, prepared.height, prepared.orientation) == (200, 400, 6)
    assert prepared.shape == (640, 320)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    base = photo_like(64, 48, seed=2)
    image = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
    path = tmp_path / ("x.png" if mode in ("RGBA", "P", "I;16") else "x.tiff" if mode == "CMYK" else "x.jpg")
    image.save(path)
    prepared = preprocess.prepare(job_for(path), SETTINGS)
    assert prepared.image.dtype == np.uint8 and prepared.image.shape[2] == 3


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", FailReason.NOT_IMAGE), (b"hello, I am text", FailReason.NOT_IMAGE)],
)
def test_not_images_fail_with_reason(tmp_path: Path, content: bytes, reason: FailReason) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(ItemError) as err:
        preprocess.prepare(job_for(path), SETTINGS)
    assert err.value.reason is reason


def test_truncated_jpeg_fails(tmp_path: Path) -> None:
    data = (assets() / "bus.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ItemError) as err:
        preprocess.prepare(job_for(path), SETTINGS)
    assert err.value.reason is FailReason.NOT_IMAGE


def test_pixel_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 3000)).save(path)
    with pytest.raises(ItemError) as err:
        preprocess.prepare(job_for(path), preprocess.PrepSettings(640, True, max_pixels=1_000_000))
    assert err.value.reason is FailReason.TOO_LARGE
    assert "pipeline.max_pixels" in str(err.value)


@pytest.mark.parametrize(("size", "orientation"), [((810, 1080), 6), ((1920, 1080), 1), ((4000, 3000), 3)])
def test_opencv_jpeg_decode_gives_pils_pixels(tmp_path: Path, size: tuple[int, int], orientation: int) -> None:
    """JPEGs decode through OpenCV (no GIL); at every DCT scale and orientation the pixels are
    those PIL's draft decode and `exif_transpose` give."""
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo_like(*size, seed=5).save(path, quality=90, exif=exif)
    settings = preprocess.PrepSettings(imgsz=640, reduced_decode=True, max_pixels=100_000_000)
    ours, _seen, applied = preprocess.decode(str(path), settings)
    with Image.open(path) as im:
        theirs = preprocess._decode(im, settings)  # the PIL path other formats take
    assert applied == orientation and isinstance(ours, np.ndarray)
    np.testing.assert_array_equal(ours, theirs)
