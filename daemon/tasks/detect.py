"""Detection: NMS, boxes mapped to source pixels. Also the box helpers the other box tasks share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import ImageDraw

from daemon.tasks import Head, Meta, Payload, Task

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
