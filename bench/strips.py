"""Strips far larger than the model input with real photos of people pasted at known places:
the inputs of `inferd bench --tiling` and of the tiling tests.

The photos are Ultralytics' bus.jpg and zidane.jpg and scikit-image's astronaut, resized so that
their long side is 420-640 px (photo size), pasted on a photo-like background without touching
each other. The reference a run is scored against is the model's confident detections on each
pasted photo alone, moved to where it was pasted.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.images import photo_like

CONFIDENT = 0.5  # a reference detection: the model is at least this sure on the photo alone
MATCH_IOU = 0.5


@dataclass(frozen=True, slots=True)
class Pasted:
    name: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in the strip
    photo: Image.Image  # as pasted (resized)


def photos() -> list[tuple[str, Image.Image]]:
    """The photos of people: Ultralytics' two and scikit-image's astronaut."""
    spec = importlib.util.find_spec("ultralytics")
    assert spec is not None and spec.origin is not None
    assets = Path(spec.origin).parent / "assets"
    from skimage import data

    out = [(name, Image.open(assets / name).convert("RGB")) for name in ("bus.jpg", "zidane.jpg")]
    return [*out, ("astronaut", Image.fromarray(data.astronaut()))]  # type: ignore[no-untyped-call]


def strip(width: int, height: int, seed: int, count: int) -> tuple[Image.Image, list[Pasted]]:
    """A `width` x `height` background with `count` photos pasted down its length, one per band
    of height / count, each at a random place inside its band."""
    rng = np.random.default_rng(seed)
    image = photo_like(width, height, seed=seed)
    pasted: list[Pasted] = []
    band = height // count
    sources = photos()
    for i in range(count):
        name, photo = sources[i % len(sources)]
        photo = photo.copy()
        long_side = int(rng.integers(420, 641))
        photo.thumbnail((min(long_side, width), min(long_side, band)), Image.Resampling.LANCZOS)
        x = int(rng.integers(0, width - photo.width + 1))
        y = i * band + int(rng.integers(0, band - photo.height + 1))
        image.paste(photo, (x, y))
        pasted.append(Pasted(name, (x, y, x + photo.width, y + photo.height), photo))
    return image, pasted


def reference(weights: str, pasted: list[Pasted]) -> np.ndarray:
    """The model's confident detections on each photo alone, in strip pixels: rows x1 y1 x2 y2 conf cls."""
    from ultralytics.models import YOLO

    model = YOLO(weights, task="detect")
    rows = []
    for p in pasted:
        (result,) = model.predict(np.asarray(p.photo)[:, :, ::-1], conf=CONFIDENT, verbose=False)
        found: np.ndarray = np.array(result.boxes.data.tolist(), np.float32).reshape(-1, 6)  # type: ignore[union-attr]
        found[:, [0, 2]] += p.box[0]
        found[:, [1, 3]] += p.box[1]
        rows.append(found)
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 6), np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of x1 y1 x2 y2 rows: (len(a), len(b))."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = (rb - lt).clip(min=0).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    out: np.ndarray = inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)
    return out


def score(found: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
    """(reference detections matched by a found box with IoU >= 0.5, duplicates). A duplicate is
    a found box beyond the first on one reference detection, or a fragment: a box that matches
    none but lies at least half inside one (a person cut at a tile border, found twice)."""
    if not len(ref) or not len(found):
        return 0, 0
    overlaps = iou(ref, found)
    matched = int((overlaps.max(1) >= MATCH_IOU).sum())
    extra = int(np.maximum((overlaps >= MATCH_IOU).sum(1) - 1, 0).sum())
    lt = np.maximum(ref[:, None, :2], found[None, :, :2])
    rb = np.minimum(ref[:, None, 2:4], found[None, :, 2:4])
    areas = (found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1])
    inside = (rb - lt).clip(min=0).prod(-1) / np.maximum(areas, 1e-9)
    fragments = int(((overlaps.max(0) < MATCH_IOU) & (inside.max(0) >= 0.5)).sum())
    return matched, extra + fragments
