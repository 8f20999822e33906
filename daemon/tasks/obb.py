"""Oriented boxes: rotated NMS (probabilistic IoU), boxes as centre, size and angle in source
pixels as `OBBPredictor` maps them; the four corners as `OBB.xyxyxyxy`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import ImageDraw

from daemon.config import MatchMetric, MergeRule, TilingConfig
from daemon.tasks import Head, Meta, Payload, Row, Task, detect, g, json_rows


@dataclass(frozen=True, slots=True)
class Rotated:
    task: ClassVar[Task] = Task.OBB
    data: np.ndarray  # (n, 7) float32: cx, cy, w, h, angle (radians), confidence, class; source pixels

    def __len__(self) -> int:
        return len(self.data)

    def corners(self) -> np.ndarray:
        """(n, 4, 2) float32 corner points, as `ops.xywhr2xyxyxyxy`."""
        x = self.data[:, :5]
        ctr = x[:, :2]
        w, h, angle = (x[:, i : i + 1] for i in range(2, 5))
        cos, sin = np.cos(angle), np.sin(angle)
        vec1 = np.concatenate([w / 2 * cos, w / 2 * sin], -1)
        vec2 = np.concatenate([-h / 2 * sin, h / 2 * cos], -1)
        return np.stack([ctr + vec1 + vec2, ctr + vec1 - vec2, ctr - vec1 - vec2, ctr - vec1 + vec2], -2)

    def txt(self, width: int, height: int, names: dict[int, str]) -> str:
        corners = self.corners()
        corners[..., 0] /= np.float32(width)
        corners[..., 1] /= np.float32(height)
        return "".join(
            g((int(row[6]), *points.reshape(-1).tolist(), float(row[5]))) + "\n"
            for row, points in zip(self.data.tolist(), corners, strict=True)
        )

    def json(self, names: dict[int, str]) -> dict[str, Any]:
        return {
            "detections": [
                {
                    "class_id": int(cls),
                    "class_name": names.get(int(cls), str(int(cls))),
                    "confidence": round(conf, 6),
                    "xywhr": [round(v, 2) for v in (x, y, w, h)] + [round(r, 6)],
                    "corners": np.round(points, 2).tolist(),
                }
                for (x, y, w, h, r, conf, cls), points in zip(self.data.tolist(), self.corners(), strict=True)
            ]
        }

    def draw(self, draw: ImageDraw.ImageDraw, names: dict[int, str], line: int) -> None:
        for row, points in zip(self.data.tolist(), self.corners().tolist(), strict=True):
            draw.polygon([tuple(p) for p in points], outline=detect.COLOR, width=line)
            x, y = min(points)
            draw.text((x + line, y + line), f"{names.get(int(row[6]), int(row[6]))} {row[5]:.2f}", fill=detect.COLOR)

    def counts(self, names: dict[int, str]) -> dict[str, Any]:
        return {"detections": len(self.data)}

    def rows(self, width: int, height: int, names: dict[int, str]) -> tuple[Row, ...]:
        """The box columns are the bounds of its (rounded) corners; xywhr and the corners in `payload`."""
        return json_rows(self.json(names)["detections"], _bounds)

    def shifted(self, dx: float, dy: float) -> Rotated:
        data = self.data.copy()
        data[:, 0] += np.float32(dx)
        data[:, 1] += np.float32(dy)
        return replace(self, data=data)


def _bounds(found: dict[str, Any]) -> list[float]:
    xs, ys = [p[0] for p in found["corners"]], [p[1] for p in found["corners"]]
    return [round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2)]


def overlap(corners: np.ndarray, others: np.ndarray, match: MatchMetric) -> np.ndarray:
    """Rotated IoU or IoS of one box's (4, 2) corners with each of `others` (n, 4, 2): the exact
    area of their convex intersection."""
    a = np.ascontiguousarray(corners, np.float32)
    area = abs(cv2.contourArea(a))
    out = np.zeros(len(others), np.float64)
    for i, b in enumerate(np.ascontiguousarray(others, np.float32)):
        inter, _ = cv2.intersectConvexConvex(a, b)
        other = abs(cv2.contourArea(b))
        base = min(area, other) if match is MatchMetric.IOS else area + other - inter
        out[i] = inter / base if base > 0 else 0.0
    return out


def enclosing(rows: np.ndarray) -> np.ndarray:
    """The least-area rotated box around `rows`' corners (GREEDYNMM's union, for oriented boxes),
    as cx cy w h angle with Ultralytics' convention (`regularize_rboxes`: angle in [0, pi/2))."""
    (cx, cy), (w, h), degrees = cv2.minAreaRect(Rotated(rows).corners().reshape(-1, 2))
    angle = np.deg2rad(degrees) % np.pi
    if angle >= np.pi / 2:
        w, h = h, w
    return np.array([cx, cy, w, h, angle % (np.pi / 2)], np.float32)


def merge(parts: list[Payload], rule: TilingConfig) -> Payload:
    """Oriented boxes grouped by rotated IoU/IoS, per class unless class-agnostic; GREEDYNMM
    replaces a group by the least-area rotated box around it, with the best score and its class."""
    data = np.concatenate([p.data for p in parts if isinstance(p, Rotated)] or [np.zeros((0, 7), np.float32)])
    corners = Rotated(data).corners()
    out: list[np.ndarray] = []
    for keep, matched in detect.groups(data, lambda i, js: overlap(corners[i], corners[js], rule.match), rule):
        row, held = data[keep].copy(), [keep]
        if rule.merge is MergeRule.GREEDY_NMM:
            for j in matched:
                mine = Rotated(row[None]).corners()[0]
                if overlap(mine, corners[j : j + 1], rule.match)[0] >= rule.match_threshold:
                    held.append(j)
                    row[:5] = enclosing(data[held])
                    row[6] = row[6] if row[5] > data[j, 5] else data[j, 6]
                    row[5] = max(row[5], data[j, 5])
        out.append(row)
    return Rotated(np.stack(out).astype(np.float32) if out else np.zeros((0, 7), np.float32))


def postprocess(
    head: Head, preds: Any, conf: float, iou: float, shape: tuple[int, int], metas: list[Meta]
) -> list[Payload]:
    out: list[Payload] = []
    for det, meta in zip(detect.nms(head, preds, conf, iou, rotated=True), metas, strict=True):
        gx, gy, px, py, _w, _h = meta
        rows = det.float().cpu().numpy()  # x y w h conf cls angle, model pixels
        data = np.concatenate([rows[:, :4], rows[:, 6:7], rows[:, 4:6]], 1).astype(np.float32)
        data[:, 0] -= px  # ops.scale_boxes(xywh=True): no clipping, a rotated box may cross the edge
        data[:, 1] -= py
        data[:, [0, 2]] /= gx
        data[:, [1, 3]] /= gy
        out.append(Rotated(data))
    return out
