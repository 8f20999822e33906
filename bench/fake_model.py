"""A detector that costs nothing: the pipeline mode's model, saved as an ordinary checkpoint.

Its forward pass answers at once with the same raw prediction for every image: the head's output
shape for the input (4 box + 80 class channels, one column per anchor), zero everywhere but
`BOXES`, five confident boxes of four classes spread over the letterboxed input. So the device
process still runs its real post-processing (NMS, scaling back to source pixels) and the main
process writes realistic .txt and .json files, while the model itself takes no time. The device
process unpickles the class by its module name: `bench` must be importable there (the bench puts
the checkout on the daemon's PYTHONPATH).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
from ultralytics.nn.tasks import DetectionModel

# (centre x, centre y, width, height) as fractions of the input, class, confidence
BOXES = (
    (0.20, 0.25, 0.20, 0.30, 0, 0.90),
    (0.50, 0.50, 0.25, 0.20, 2, 0.80),
    (0.80, 0.25, 0.15, 0.25, 5, 0.70),
    (0.30, 0.75, 0.20, 0.25, 0, 0.60),
    (0.75, 0.75, 0.30, 0.30, 16, 0.50),
)


class InstantDetectionModel(DetectionModel):
    """yolo11n's layers (so its stride, names and checkpoint are a detector's), another forward."""

    instant: bool = False  # off while the layers are built: their strides come from a real forward

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.instant and isinstance(x, torch.Tensor) and x.ndim == 4:
            return prediction(x.shape[0], x.shape[2], x.shape[3], len(self.names), self.stride, x)
        return super().forward(x, *args, **kwargs)  # type: ignore[no-untyped-call]


def prediction(n: int, h: int, w: int, nc: int, strides: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Detect's inference output for a batch of `n` inputs of h x w: (n, 4 + nc, anchors), boxes
    as centre and size in input pixels, class scores after the sigmoid."""
    anchors = sum((h // int(s)) * (w // int(s)) for s in strides.tolist())
    out = torch.zeros((n, 4 + nc, max(anchors, len(BOXES))), dtype=like.dtype, device=like.device)
    for i, (cx, cy, bw, bh, cls, conf) in enumerate(BOXES):
        out[:, :4, i] = torch.tensor((cx * w, cy * h, bw * w, bh * h), dtype=like.dtype)
        out[:, 4 + cls, i] = conf
    return out


def save(path: Path) -> Path:
    """The checkpoint: random-init yolo11n weights, the instant forward."""
    model = InstantDetectionModel("yolo11n.yaml", verbose=False)  # type: ignore[no-untyped-call]
    model.instant = True
    return write_checkpoint(model, path)


def write_checkpoint(model: DetectionModel, path: Path) -> Path:
    """`model` written the way `YOLO.save` writes a checkpoint (tests/faulty_model.py's too)."""
    import ultralytics

    ckpt: dict[str, Any] = {
        "model": model.half(),
        "ema": None,
        "date": datetime.datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        "train_args": {},
    }
    torch.save(ckpt, path)
    return path
