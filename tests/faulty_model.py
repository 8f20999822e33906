"""A real YOLO detector that misbehaves on purpose, saved as an ordinary Ultralytics checkpoint.

The device process loads it like any `.pt` (AutoBackend unpickles the class by its module name,
so this module must be importable there: PYTHONPATH=tests). Its forward pass is the real one,
except where `fault` says otherwise:

- "segfault": an image that is mostly pure red (the *marker*) makes the process touch address 0;
- "raise": a marker image raises RuntimeError (a model error, the process survives);
- "oom": any batch of more than one image raises torch.OutOfMemoryError;
- "hang_load": loading never ends (the Conv+BN fusion at load blocks for good);
- "die_load": the process is SIGKILLed while it loads (as the kernel's OOM killer would).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from ultralytics.nn.tasks import DetectionModel

FAULTS = ("segfault", "raise", "oom", "hang_load", "die_load")
MARKER_RGB = (255, 0, 0)


class FaultyDetectionModel(DetectionModel):
    fault: str = ""

    def fuse(self, *args: Any, **kwargs: Any) -> Any:
        if self.fault == "hang_load":
            threading.Event().wait()
        if self.fault == "die_load":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().fuse(*args, **kwargs)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            if self.fault == "oom" and x.shape[0] > 1:
                raise torch.OutOfMemoryError(f"faulty_model: no memory for a batch of {x.shape[0]}")
            if self.fault in ("segfault", "raise") and is_marker(x).any():
                if self.fault == "segfault":
                    ctypes.string_at(0)  # reads address 0: SIGSEGV, as a crashing native kernel would
                raise RuntimeError("faulty_model: marker image")
        return super().forward(x, *args, **kwargs)


def is_marker(x: torch.Tensor) -> torch.Tensor:
    """Per image of a (n, 3, h, w) batch in 0..1: is most of it pure red? (Letterbox padding is grey.)"""
    red = (x[:, 0] > 0.8) & (x[:, 1] < 0.2) & (x[:, 2] < 0.2)
    return red.float().mean(dim=(1, 2)) > 0.5


def marker_image(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), MARKER_RGB)


def save(path: Path, fault: str) -> Path:
    """A random-init yolo11n with `fault`, written the way `YOLO.save` writes a checkpoint."""
    from bench.fake_model import write_checkpoint  # here: the device process has no bench/ on its path

    assert fault in FAULTS, fault
    model = FaultyDetectionModel("yolo11n.yaml", verbose=False)
    model.fault = fault
    return write_checkpoint(model, path)
