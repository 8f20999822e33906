"""Pose: NMS with the class count (the keypoints follow the class scores), keypoints mapped to
source pixels as `PosePredictor` does (`ops.scale_coords`, clipped to the image)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from PIL import ImageDraw

from daemon.config import TilingConfig
from daemon.tasks import Head, Meta, Payload, Row, Task, detect, g, json_rows

VISIBLE = 0.5  # a keypoint is drawn, and counted, from this confidence (as Ultralytics' plotter)


@dataclass(frozen=True, slots=True)
class Keypoints:
    task: ClassVar[Task] = Task.POSE
    data: np.ndarray  # (n, 6) float32 boxes, as detect
    keypoints: np.ndarray  # (n, k, 2 or 3) float32: x, y in source pixels[, confidence]

    def __len__(self) -> int:
        return len(self.data)

    def txt(self, width: int, height: int, names: dict[int, str]) -> str:
        xyn = self.keypoints.copy()
        xyn[..., 0] /= np.float32(width)
        xyn[..., 1] /= np.float32(height)
        rows = detect.box_rows(self.data, width, height)
        return "".join(
            g((int(c), *xywh, *points.reshape(-1).tolist(), float(conf))) + "\n"
            for (xywh, conf, c), points in zip(rows, xyn, strict=True)
        )

    def json(self, names: dict[int, str]) -> dict[str, Any]:
        found = detect.detections(self.data, names)
        for d, points in zip(found, self.keypoints.tolist(), strict=True):
            d["keypoints"] = [[round(p[0], 2), round(p[1], 2), *(round(v, 4) for v in p[2:])] for p in points]
        return {"detections": found}

    def draw(self, draw: ImageDraw.ImageDraw, names: dict[int, str], line: int) -> None:
        detect.draw_boxes(draw, self.data, names, line)
        r = line + 1
        for points in self.keypoints.tolist():
            for p in points:
                if len(p) < 3 or p[2] >= VISIBLE:
                    draw.ellipse((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=(56, 255, 56))

    def counts(self, names: dict[int, str]) -> dict[str, Any]:
        k = self.keypoints
        visible = int((k[..., 2] >= VISIBLE).sum()) if k.shape[-1] == 3 else k.shape[0] * k.shape[1]
        return {"detections": len(self.data), "keypoints": visible}

    def rows(self, width: int, height: int, names: dict[int, str]) -> tuple[Row, ...]:
        return json_rows(self.json(names)["detections"])  # the keypoints in `payload`

    def shifted(self, dx: float, dy: float) -> Keypoints:
        points = self.keypoints.copy()
        points[..., 0] += np.float32(dx)
        points[..., 1] += np.float32(dy)
        return replace(self, data=detect.shift_rows(self.data, dx, dy), keypoints=points)


def merge(parts: list[Payload], rule: TilingConfig) -> Payload:
    """Boxes merged as detect's; each merged box keeps the keypoints of its most confident member
    (they follow their box: a union of skeletons is not a skeleton)."""
    kept = [p for p in parts if isinstance(p, Keypoints)]
    data = np.concatenate([p.data for p in kept])
    points = np.concatenate([p.keypoints for p in kept])
    rows, members = detect.merge_boxes(data, rule)
    return Keypoints(rows, points[[m[0] for m in members]].reshape(len(rows), *points.shape[1:]))


def postprocess(
    head: Head, preds: Any, conf: float, iou: float, shape: tuple[int, int], metas: list[Meta]
) -> list[Payload]:
    from ultralytics.utils import ops

    assert head.kpt_shape is not None
    out: list[Payload] = []
    for det, meta in zip(detect.nms(head, preds, conf, iou), metas, strict=True):
        gx, gy, px, py, w, h = meta
        kpts = det[:, 6:].view(det.shape[0], *head.kpt_shape).float()
        kpts = ops.scale_coords(shape, kpts, (h, w), ratio_pad=((gy, gx), (px, py)))
        out.append(Keypoints(detect.to_source(det, meta), kpts.cpu().numpy()))
    return out
