"""The baselines: seed 002's loop (Ultralytics `predict` per image, each .txt written inline or
by a writer thread) and seed 000's (each batch decoded in a thread pool, then one batched
`predict`), on the same images and model as inferd."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

from bench import BenchError, rate
from daemon import progress
from daemon.config import Config

SEED_QUEUE_SIZE = 200  # seed 002's write queue


def label_lines(result: Any) -> list[str]:
    """YOLO label lines (class cx cy w h conf, normalised) of one Ultralytics result."""
    boxes = result.boxes
    rows = zip(boxes.cls.tolist(), boxes.xywhn.tolist(), boxes.conf.tolist(), strict=True)
    return [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f} {p:.6f}\n" for c, (x, y, w, h), p in rows]


def predict_loop(
    images: list[Path], out: Path, config: Config, device: str, *, queued: bool, weights: str | None = None
) -> dict[str, Any]:
    """Seed 002: Ultralytics predict per image, the .txt written inline or by a writer thread;
    `weights`: an exported artefact instead of the config's .pt."""
    import numpy as np
    import torch
    from ultralytics.models import YOLO

    from daemon.model import resolve_weights

    out.mkdir(parents=True, exist_ok=True)
    m = config.model
    model = YOLO(weights or resolve_weights(m.weights), task="detect")
    kwargs: dict[str, Any] = dict(imgsz=m.imgsz, conf=m.conf, iou=m.iou, device=device, verbose=False)
    model.predict(np.zeros((m.imgsz, m.imgsz, 3), np.uint8), **kwargs)  # load + warm-up, as the daemon's worker
    writes: queue.Queue[tuple[Path, list[str]] | None] = queue.Queue(maxsize=SEED_QUEUE_SIZE)

    def write(path: Path, lines: list[str]) -> None:
        with open(path, "w") as f:
            f.writelines(lines)

    def writer() -> None:
        while (item := writes.get()) is not None:
            write(*item)

    thread = threading.Thread(target=writer, name="seed002-writer")
    started = time.perf_counter()
    if queued:
        thread.start()
    for path in progress.track(images, "seed002" if queued else "naive", len(images)):
        (result,) = model.predict(str(path), **kwargs)
        if queued:
            writes.put((out / f"{path.stem}.txt", label_lines(result)))
        else:
            write(out / f"{path.stem}.txt", label_lines(result))
    if queued:
        writes.put(None)
        thread.join()
    seconds = time.perf_counter() - started
    missing = [p.name for p in images if not (out / f"{p.stem}.txt").is_file()]
    if missing:
        raise BenchError(f"{out.name}: no result file for {missing[:5]}")
    return rate(len(images), seconds, threads=str(torch.get_num_threads()))  # Ultralytics sets it on CPU


def predict_batches(images: list[Path], out: Path, config: Config, device: str) -> dict[str, Any]:
    """Seed 000: decode each batch in a thread pool (cv2 releases the GIL), then one batched predict."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np
    import torch
    from ultralytics.models import YOLO

    from daemon.model import resolve_weights

    out.mkdir(parents=True, exist_ok=True)
    m, size = config.model, config.pipeline.max_batch
    model = YOLO(resolve_weights(m.weights))
    kwargs: dict[str, Any] = dict(imgsz=m.imgsz, conf=m.conf, iou=m.iou, device=device, verbose=False)
    model.predict([np.zeros((m.imgsz, m.imgsz, 3), np.uint8)] * size, **kwargs)  # load + warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor() as executor:  # the seed's default pool size
        for i in progress.track(range(0, len(images), size), "seed000", -(-len(images) // size), "batch"):
            batch = images[i : i + size]
            decoded = list(executor.map(lambda p: cv2.imread(str(p)), batch))
            for path, result in zip(batch, model.predict(decoded, **kwargs), strict=True):
                with open(out / f"{path.stem}.txt", "w") as f:
                    f.writelines(label_lines(result))
    seconds = time.perf_counter() - started
    missing = [p.name for p in images if not (out / f"{p.stem}.txt").is_file()]
    if missing:
        raise BenchError(f"{out.name}: no result file for {missing[:5]}")
    return rate(len(images), seconds, threads=str(torch.get_num_threads()))
