"""The accuracy gate: a candidate's detections against the fp32 reference on real images.

A candidate passes when it finds at least `GATE` of the reference's detections: same class,
IoU >= `MATCH_IOU` (greedy by confidence). Oriented boxes are compared as their axis-aligned
extent; a classification as its top-1 class. Used by the measured choice for every candidate
and by INT8 on the calibration set's held-out images, where a failure stops the start.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from daemon.config import ConfigError, LogConfig, LogFormat
from daemon.runtimes.cache import images_in as images_in  # re-exported: the gate's images come from there

GATE = 0.95
MATCH_IOU = 0.5


class GateFailed(ConfigError):
    """INT8 does not match fp32 on the held-out images: never serve a worse model silently."""


@dataclass(frozen=True, slots=True)
class Score:
    matched: int
    reference: int  # the reference's detections

    @property
    def ratio(self) -> float:
        return self.matched / self.reference if self.reference else 1.0

    @property
    def passed(self) -> bool:
        return self.ratio >= GATE


def split(images: tuple[Path, ...]) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(calibrate, held out): every fourth image, by name, is held out for the gate."""
    held = images[3::4]
    return tuple(p for p in images if p not in held), held


def sample_photos() -> tuple[Path, ...]:
    """Real photos for candidates that need no calibration, when the user gave none (they ship
    with Ultralytics)."""
    from ultralytics.utils import ASSETS

    return (Path(ASSETS) / "bus.jpg", Path(ASSETS) / "zidane.jpg")


def runner(weights: str, runtime: str, precision: str, *, imgsz: int, max_batch: int, cache_dir: Path,
           threads: int, max_det: int = 300) -> Any:  # fmt: skip
    """The daemon's own Runner (a model.Runner) with one batch slot of its own."""
    from daemon.messages import DeviceSpec
    from daemon.model import Runner

    slot = max_batch * imgsz * imgsz * 3
    spec = DeviceSpec(
        device="cpu", weights=weights, imgsz=imgsz, precision=precision, max_det=max_det, torch_threads=threads,
        log=LogConfig("warning", LogFormat.JSON), runtime=runtime, cache_dir=str(cache_dir), max_batch=max_batch,
        slot_bytes=slot, slots=1,
    )  # fmt: skip
    return Runner(spec, mmap.mmap(-1, slot))


def prepare(images: tuple[Path, ...], imgsz: int, *, classify: bool) -> list[Any]:
    """The images letterboxed (or cropped) as the daemon's host path does."""
    from daemon import preprocess
    from daemon.jobs import Job

    settings = preprocess.PrepSettings(imgsz, True, 10**9, classify=classify)
    return [preprocess.prepare(Job(PurePosixPath(p.name), p), settings) for p in images]


def detections(r: Any, items: list[Any], conf: float = 0.25, iou: float = 0.7) -> list[np.ndarray]:
    """Per image, rows (x1, y1, x2, y2, conf, cls) of what `r` finds, image by image."""
    from daemon.messages import Batch

    out = []
    for p in items:
        h, w = p.shape
        view = np.frombuffer(r.buffer, dtype=np.uint8, count=h * w * 3)
        view[:] = p.image.reshape(-1)
        del view
        meta = (p.gain[0], p.gain[1], p.pad[0], p.pad[1], p.width, p.height)
        (payload,), _ms = r.run(Batch(0, 0, 1, h, w, [meta], conf, iou))
        out.append(rows(payload))
    return out


def rows(payload: Any) -> np.ndarray:
    if isinstance(payload, str):  # a decode error: nothing found
        return np.zeros((0, 6), np.float32)
    if hasattr(payload, "ids"):  # classify: the top-1 class over the whole image
        return np.array([[0, 0, 1, 1, payload.confs[0], payload.ids[0]]], np.float32)
    data = np.asarray(payload.data, np.float32)
    if data.shape[1] == 7:  # obb: cx, cy, w, h, angle, conf, cls -> its axis-aligned extent
        cx, cy, w, h, a = (data[:, i] for i in range(5))
        ew = np.abs(w * np.cos(a)) + np.abs(h * np.sin(a))
        eh = np.abs(w * np.sin(a)) + np.abs(h * np.cos(a))
        return np.stack([cx - ew / 2, cy - eh / 2, cx + ew / 2, cy + eh / 2, data[:, 5], data[:, 6]], axis=1)
    return data[:, :6]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def score(ours: list[np.ndarray], reference: list[np.ndarray]) -> Score:
    """How many of the reference's detections `ours` finds (same class, IoU >= MATCH_IOU)."""
    matched = total = 0
    for a, ref in zip(ours, reference, strict=True):
        total += len(ref)
        free = list(range(len(a)))
        for det in ref[np.argsort(-ref[:, 4])]:
            good = [j for j in free if a[j, 5] == det[5] and _iou(det, a[j]) >= MATCH_IOU]
            if good:
                free.remove(max(good, key=lambda j: _iou(det, a[j])))
                matched += 1
    return Score(matched, total)
