"""Classification: the top 5 of the model's probabilities.

Its input is not letterboxed: `preprocess.centre_crop` resizes the short side to imgsz and
crops the centre, as Ultralytics' `classify_transforms` (whose normalisation is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import ImageDraw

from daemon.config import TilingConfig
from daemon.tasks import Head, Meta, Payload, Row, Task, Unsupported

TOP = 5


@dataclass(frozen=True, slots=True)
class Probs:
    task: ClassVar[Task] = Task.CLASSIFY
    ids: np.ndarray  # (k,) int64 class ids, most probable first; k = min(5, classes)
    confs: np.ndarray  # (k,) float32 their probabilities

    def __len__(self) -> int:
        return len(self.ids)

    def txt(self, width: int, height: int, names: dict[int, str]) -> str:
        rows = zip(self.ids.tolist(), self.confs.tolist(), strict=True)
        return "".join(f"{p:.2f} {names.get(i, str(i))}\n" for i, p in rows)

    def json(self, names: dict[int, str]) -> dict[str, Any]:
        top = [
            {"class_id": i, "class_name": names.get(i, str(i)), "confidence": round(p, 6)}
            for i, p in zip(self.ids.tolist(), self.confs.tolist(), strict=True)
        ]
        return {"top5": top}

    def draw(self, draw: ImageDraw.ImageDraw, names: dict[int, str], line: int) -> None:
        for row, (i, p) in enumerate(zip(self.ids.tolist(), self.confs.tolist(), strict=True)):
            draw.text((4 * line, 4 * line + row * 12 * line), f"{names.get(i, i)} {p:.2f}", fill=(255, 56, 56))

    def shifted(self, dx: float, dy: float) -> Probs:
        return self  # never tiled (a ConfigError refuses it): there is no geometry to move

    def counts(self, names: dict[int, str]) -> dict[str, Any]:
        if not len(self.ids):
            return {"top1": None}
        top1 = int(self.ids[0])
        return {"top1": names.get(top1, str(top1)), "top1_id": top1, "top1_conf": round(float(self.confs[0]), 4)}

    def rows(self, width: int, height: int, names: dict[int, str]) -> tuple[Row, ...]:
        """One row per class of the top 5, over the whole image, its rank in `payload`."""
        whole = (0.0, 0.0, float(width), float(height))
        top5 = enumerate(self.json(names)["top5"], 1)
        return tuple(Row(t["class_id"], t["class_name"], t["confidence"], *whole, {"rank": r}) for r, t in top5)


def merge(parts: list[Payload], rule: TilingConfig) -> Payload:
    """Never called: a classification model is never tiled (a ConfigError refuses it)."""
    raise Unsupported("a classification model gives one label per image: its tiles cannot be merged")


def postprocess(
    head: Head, preds: Any, conf: float, iou: float, shape: tuple[int, int], metas: list[Meta]
) -> list[Payload]:
    probs = (preds[0] if isinstance(preds, (list, tuple)) else preds).float()
    k = min(TOP, probs.shape[1])
    # Probs.top5 is (-p).argsort()[:5]: a stable order, as a sort here (topk may order ties otherwise).
    order = (-probs).argsort(dim=1, stable=True)[:, :k]
    confs = probs.gather(1, order)
    return [Probs(i, c) for i, c in zip(order.cpu().numpy(), confs.cpu().numpy(), strict=True)]
