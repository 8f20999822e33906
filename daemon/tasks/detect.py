"""Detection: NMS, boxes mapped to source pixels. Also the box helpers the other box tasks share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from PIL import ImageDraw

from daemon.config import MatchMetric, MergeRule, TilingConfig
from daemon.tasks import Head, Meta, Payload, Row, Task, json_rows

COLOR = (255, 56, 56)


@dataclass(frozen=True, slots=True)
class Boxes:
    """Rows of x1, y1, x2, y2, confidence, class in source pixels."""

    task: ClassVar[Task] = Task.DETECT
    data: np.ndarray  # (n, 6) float32

    def __len__(self) -> int:
        return len(self.data)

    def txt(self, width: int, height: int, names: dict[int, str]) -> str:
        rows = box_rows(self.data, width, height)
        return "".join(f"{int(c)} {x:g} {y:g} {w:g} {h:g} {conf:g}\n" for (x, y, w, h), conf, c in rows)

    def json(self, names: dict[int, str]) -> dict[str, Any]:
        return {"detections": detections(self.data, names)}

    def draw(self, draw: ImageDraw.ImageDraw, names: dict[int, str], line: int) -> None:
        draw_boxes(draw, self.data, names, line)

    def counts(self, names: dict[int, str]) -> dict[str, Any]:
        return {"detections": len(self.data)}

    def rows(self, width: int, height: int, names: dict[int, str]) -> tuple[Row, ...]:
        return json_rows(detections(self.data, names))

    def shifted(self, dx: float, dy: float) -> Boxes:
        """The same boxes, moved by (dx, dy): a tile's into its image's pixels."""
        return replace(self, data=shift_rows(self.data, dx, dy))


def shift_rows(data: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """x1 y1 x2 y2 ... rows moved by (dx, dy)."""
    out = data.copy()
    out[:, [0, 2]] += np.float32(dx)
    out[:, [1, 3]] += np.float32(dy)
    return out


def box_rows(data: np.ndarray, width: int, height: int) -> list[tuple[list[float], float, float]]:
    """(normalised cx cy w h, conf, class) per row, computed in float32 as `Boxes.xywhn` does."""
    if not len(data):
        return []
    xyxy = data[:, :4].astype(np.float32)
    xywh = np.concatenate(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), axis=1)
    xywh /= np.array([width, height, width, height], np.float32)
    return list(zip(xywh.tolist(), data[:, 4].tolist(), data[:, 5].tolist(), strict=True))


def detections(data: np.ndarray, names: dict[int, str]) -> list[dict[str, Any]]:
    """The .json detections: class, name, confidence, box in source pixels (unchanged since v1)."""
    return [
        {
            "class_id": int(cls),
            "class_name": names.get(int(cls), str(int(cls))),
            "confidence": round(conf, 6),
            "box_xyxy": [round(v, 2) for v in (x1, y1, x2, y2)],
        }
        for x1, y1, x2, y2, conf, cls in data[:, :6].tolist()
    ]


def draw_boxes(draw: ImageDraw.ImageDraw, data: np.ndarray, names: dict[int, str], line: int) -> None:
    for x1, y1, x2, y2, conf, cls in data[:, :6].tolist():
        draw.rectangle((x1, y1, x2, y2), outline=COLOR, width=line)
        draw.text((x1 + line, y1 + line), f"{names.get(int(cls), int(cls))} {conf:.2f}", fill=COLOR)


def nms(head: Head, preds: Any, conf: float, iou: float, *, rotated: bool = False) -> list[Any]:
    """Ultralytics' NMS as its predictors call it: the class count given for every task but
    detect, so that extra channels (mask coefficients, keypoints, angle) are not read as classes."""
    from ultralytics.utils import nms

    result: list[Any] = nms.non_max_suppression(
        preds,
        conf,
        iou,
        None,
        False,
        max_det=head.max_det,
        nc=0 if head.task is Task.DETECT else head.nc,
        end2end=head.end2end,
        rotated=rotated,
    )
    return result


def to_source(det: Any, meta: Meta) -> np.ndarray:
    """Rows x1 y1 x2 y2 conf cls (model pixels, on the device) -> float32 source pixels, clipped
    (`ops.scale_boxes` with this letterbox's gains and padding)."""
    gx, gy, px, py, w, h = meta
    boxes: np.ndarray = det[:, :6].float().cpu().numpy()
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - px) / gx).clip(0, w)
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - py) / gy).clip(0, h)
    return boxes


def postprocess(
    head: Head, preds: Any, conf: float, iou: float, shape: tuple[int, int], metas: list[Meta]
) -> list[Payload]:
    return [Boxes(to_source(det, meta)) for det, meta in zip(nms(head, preds, conf, iou), metas, strict=True)]


Metric = Callable[[int, np.ndarray], np.ndarray]  # (kept index, other indices) -> their match values


def overlap(box: np.ndarray, boxes: np.ndarray, match: MatchMetric) -> np.ndarray:
    """IoU or IoS (intersection over the smaller area) of one x1 y1 x2 y2 box with each of `boxes`."""
    wh = (np.minimum(box[2:4], boxes[:, 2:4]) - np.maximum(box[:2], boxes[:, :2])).clip(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    base = np.minimum(areas, area) if match is MatchMetric.IOS else areas + area - inter
    out: np.ndarray = inter / np.maximum(base, 1e-9)
    return out


def groups(data: np.ndarray, metric: Metric, rule: TilingConfig) -> list[tuple[int, list[int]]]:
    """SAHI's greedy grouping (`greedy_nmm`, `nms`): the most confident result left is kept and
    takes every other left whose match value with it is at least the threshold, most confident
    first; per class unless `rule.class_agnostic`. Rows: x1 y1 x2 y2 (or any geometry), conf, cls
    in columns [-2] and [-1]."""
    out: list[tuple[int, list[int]]] = []
    if rule.class_agnostic:
        subsets = [np.arange(len(data))]
    else:
        subsets = [np.flatnonzero(data[:, -1] == c) for c in np.unique(data[:, -1])]
    for subset in subsets:
        order = subset[np.argsort(data[subset, -2], kind="stable")]
        while len(order):
            keep, order = int(order[-1]), order[:-1]
            values = metric(keep, order) if len(order) else np.zeros(0)
            matched = values >= rule.match_threshold
            out.append((keep, [int(i) for i in order[matched][::-1]]))
            order = order[~matched]
    return out


def merged_row(kept: np.ndarray, other: np.ndarray) -> np.ndarray:
    """SAHI's `merge_object_prediction_pair` for boxes: their union, the higher score, the class
    of the higher score (the other's on a tie, as SAHI)."""
    row = kept.copy()
    row[:2] = np.minimum(kept[:2], other[:2])
    row[2:4] = np.maximum(kept[2:4], other[2:4])
    row[4] = max(kept[4], other[4])
    row[5] = kept[5] if kept[4] > other[4] else other[5]
    return row


def merge_boxes(data: np.ndarray, rule: TilingConfig) -> tuple[np.ndarray, list[list[int]]]:
    """Merged rows, and per row the indices of `data` it holds (the kept one first)."""
    rows: list[np.ndarray] = []
    members: list[list[int]] = []
    threshold = rule.match_threshold
    for keep, matched in groups(data, lambda i, js: overlap(data[i], data[js], rule.match), rule):
        row, held = data[keep].copy(), [keep]
        if rule.merge is MergeRule.GREEDY_NMM:
            for j in matched:  # SAHI checks each against the box grown so far
                if overlap(row, data[j : j + 1], rule.match)[0] >= threshold:
                    row, held = merged_row(row, data[j]), [*held, j]
        rows.append(row)
        members.append(held)
    return (np.stack(rows) if rows else np.zeros((0, 6), np.float32)).astype(np.float32), members


def merge(parts: list[Payload], rule: TilingConfig) -> Payload:
    """One image's boxes from its tiles' (and the full image's), in source pixels."""
    data = np.concatenate([p.data for p in parts if isinstance(p, Boxes)] or [np.zeros((0, 6), np.float32)])
    return Boxes(merge_boxes(data, rule)[0])
