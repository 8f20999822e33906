"""Outcomes as database rows: one `images` row per source, one `detections` row per detection.

The only place that knows how an `Inferred` looks to the database: every task's rows come from
the document its JSON result is made of, its extra geometry (polygon, keypoints, rotated box,
rank) in `payload`, the box columns its axis-aligned box in source pixels.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

from daemon.jobs import Failure, Inferred, Job, Outcome

TIMINGS = ("queue", "decode", "batch_wait", "infer", "write")


@dataclass(frozen=True, slots=True)
class Detection:
    class_id: int
    class_name: str
    confidence: float
    x1: float  # source pixels, as the user sees the image (EXIF orientation applied)
    y1: float
    x2: float
    y2: float
    payload: Any = None  # the task's extra geometry as JSON-able data; None for detection


@dataclass(frozen=True, slots=True)
class ImageRow:
    source: str  # path below incoming/
    status: str  # "done" or "failed"
    reason: str | None
    message: str | None
    width: int | None
    height: int | None
    model: str | None
    task: str | None
    device: str | None
    batch_size: int | None
    processed_at: datetime.datetime  # UTC
    timings_ms: tuple[float | None, ...]  # TIMINGS, then total
    detections: tuple[Detection, ...]


def detections(result: Inferred) -> tuple[Detection, ...]:
    """Detection rows of one result, from the same document as its JSON (so rounded alike:
    confidence 1e-6, boxes 0.01 px). The box columns are the axis-aligned box in source pixels
    (an oriented box's bounds; for classify the whole image, one row per top-5 class); the
    task's extra geometry (polygon, keypoints, xywhr and corners, rank) goes into `payload`."""
    document = result.payload.json(result.model.names)
    width, height = result.prepared.width, result.prepared.height
    rows = []
    for found in document.get("detections", []):
        extra = {k: v for k, v in found.items() if k not in ("class_id", "class_name", "confidence", "box_xyxy")}
        if "box_xyxy" in found:
            box = found["box_xyxy"]
        else:  # an oriented box: its corners' bounds
            xs, ys = [p[0] for p in found["corners"]], [p[1] for p in found["corners"]]
            box = [round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2)]
        x1, y1, x2, y2 = box
        cls, name, conf = found["class_id"], found["class_name"], found["confidence"]
        rows.append(Detection(cls, name, conf, x1, y1, x2, y2, extra or None))
    for rank, top in enumerate(document.get("top5", []), 1):
        whole = (0.0, 0.0, float(width), float(height))
        rows.append(Detection(top["class_id"], top["class_name"], top["confidence"], *whole, {"rank": rank}))
    return tuple(rows)


def image_row(outcome: Outcome) -> ImageRow:
    """The row that records `outcome`: done with its detections, or failed with its reason."""
    now = datetime.datetime.now(datetime.UTC)
    if isinstance(outcome, Failure):
        job = outcome.job
        return ImageRow(
            text(str(job.rel)), "failed", outcome.error.reason.value, text(str(outcome.error)),
            None, None, None, None, None, None, now, _timings(job), (),
        )  # fmt: skip
    p, job = outcome.prepared, outcome.prepared.job
    return ImageRow(
        text(str(job.rel)), "done", None, None, p.width, p.height, text(outcome.model.weights),
        outcome.payload.task.value,
        outcome.device, outcome.batch_size, now, _timings(job), detections(outcome),
    )  # fmt: skip


def text(value: str) -> str:
    """`value` as valid UTF-8: the bytes of a name that is not UTF-8 (surrogate-escaped by
    Python) become `\\xff` escapes, as a database cannot store lone surrogates."""
    try:
        return os.fsencode(value).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produced
        return value.encode("utf-8", "backslashreplace").decode()


def _timings(job: Job) -> tuple[float | None, ...]:
    ms = job.timings_ms
    total = (time.monotonic() - job.claimed_at) * 1000
    return (*(round(ms[k], 3) if k in ms else None for k in TIMINGS), round(total, 3))
