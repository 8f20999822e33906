"""Instance segmentation: NMS, masks from the prototypes on the device, their polygons.

As `SegmentationPredictor` (retina_masks off): each mask is the prototypes weighted by the
detection's coefficients, upsampled to the model input, cropped to its box and thresholded;
a detection whose mask is empty is dropped. The polygon is `ops.masks2segments` of the mask
(every outer contour, joined), mapped to source pixels as `Masks.xy`. Only the polygons leave
the device process, never the masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import ImageDraw

from daemon.config import TilingConfig
from daemon.tasks import Head, Meta, Payload, Row, Task, detect, g, json_rows


@dataclass(frozen=True, slots=True)
class Masks:
    task: ClassVar[Task] = Task.SEGMENT
    data: np.ndarray  # (n, 6) float32 boxes, as detect
    polygons: list[np.ndarray]  # per detection (k, 2) float32 x, y in source pixels

    def __len__(self) -> int:
        return len(self.data)

    def txt(self, width: int, height: int, names: dict[int, str]) -> str:
        lines = []
        scale = np.array([width, height], np.float32)
        for (_x1, _y1, _x2, _y2, conf, cls), polygon in zip(self.data.tolist(), self.polygons, strict=True):
            if len(polygon) < 3:  # save_txt writes no row for what is not a polygon
                continue
            lines.append(g((int(cls), *(polygon / scale).reshape(-1).tolist(), float(conf))) + "\n")
        return "".join(lines)

    def json(self, names: dict[int, str]) -> dict[str, Any]:
        found = detect.detections(self.data, names)
        for d, polygon in zip(found, self.polygons, strict=True):
            d["polygon"] = np.round(polygon, 1).tolist()
        return {"detections": found}

    def draw(self, draw: ImageDraw.ImageDraw, names: dict[int, str], line: int) -> None:
        detect.draw_boxes(draw, self.data, names, line)
        for polygon in self.polygons:
            if len(polygon) >= 3:
                draw.polygon([tuple(p) for p in polygon.tolist()], outline=(56, 56, 255), width=line)

    def counts(self, names: dict[int, str]) -> dict[str, Any]:
        return {"detections": len(self.data), "masks": sum(len(p) >= 3 for p in self.polygons)}

    def rows(self, width: int, height: int, names: dict[int, str]) -> tuple[Row, ...]:
        return json_rows(self.json(names)["detections"])  # the polygon in `payload`

    def shifted(self, dx: float, dy: float) -> Masks:
        move = np.array([dx, dy], np.float32)
        return replace(self, data=detect.shift_rows(self.data, dx, dy), polygons=[p + move for p in self.polygons])


def join(polygons: list[np.ndarray], box: np.ndarray) -> np.ndarray:
    """The outline of the union of `polygons` (source pixels), drawn in a mask the size of their
    merged `box` only (never the whole frame: 24 MB per detection at 2048x12000); its largest
    outer contour, as one polygon. A single polygon is returned as it is."""
    shapes = [p for p in polygons if len(p) >= 3]
    if len(shapes) <= 1:
        return shapes[0] if shapes else (polygons[0] if polygons else np.zeros((0, 2), np.float32))
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    w, h = math.ceil(box[2]) - x0 + 1, math.ceil(box[3]) - y0 + 1
    mask = np.zeros((h, w), np.uint8)
    origin = np.array([x0, y0], np.float32)
    cv2.fillPoly(mask, [np.round(p - origin).astype(np.int32) for p in shapes], 1)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    largest = max(contours, key=cv2.contourArea)
    out: np.ndarray = largest.reshape(-1, 2).astype(np.float32) + origin
    return out


def merge(parts: list[Payload], rule: TilingConfig) -> Payload:
    """Boxes merged as detect's; each merged detection's polygon is the union of its members'
    (each already cut to its box by its tile's mask)."""
    kept = [p for p in parts if isinstance(p, Masks)]
    data = np.concatenate([p.data for p in kept] or [np.zeros((0, 6), np.float32)])
    polygons = [polygon for p in kept for polygon in p.polygons]
    rows, members = detect.merge_boxes(data, rule)
    return Masks(rows, [join([polygons[i] for i in held], row) for row, held in zip(rows, members, strict=True)])


def postprocess(
    head: Head, preds: Any, conf: float, iou: float, shape: tuple[int, int], metas: list[Meta]
) -> list[Payload]:
    from ultralytics.utils import ops

    protos = preds[0][1] if isinstance(preds[0], tuple) else preds[1]  # as SegmentationPredictor
    out: list[Payload] = []
    for det, proto, meta in zip(detect.nms(head, preds[0], conf, iou), protos, metas, strict=True):
        if not len(det):
            out.append(Masks(np.zeros((0, 6), np.float32), []))
            continue
        det = det.float()  # fp16 on a GPU: the coefficients meet the float prototypes
        masks = ops.process_mask(proto, det[:, 6:], det[:, :4], shape, upsample=True)
        keep = masks.amax((-2, -1)) > 0
        if not keep.all():
            det, masks = det[keep], masks[keep]
        gx, gy, px, py, w, h = meta
        polygons = [
            ops.scale_coords(shape, segment, (h, w), ratio_pad=((gy, gx), (px, py)))
            for segment in ops.masks2segments(masks)
        ]
        out.append(Masks(detect.to_source(det, meta), polygons))
    return out
