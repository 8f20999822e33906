"""Device workers with real spawned processes and real forward passes.

- results equal Ultralytics' own `model.predict` (the real pretrained default model, real photos);
- a batch gives the same detections as its images one at a time;
- a worker that is killed fails its batch with DeviceCrashed, and a new one can be started.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import uvloop
from conftest import assets
from PIL import Image, ImageEnhance, ImageOps

from daemon import preprocess
from daemon.config import LogConfig, LogFormat
from daemon.jobs import Job, Prepared
from daemon.local import DeviceCrashed, DeviceStartError, LocalDevice
from daemon.messages import DeviceSpec
from daemon.model import resolve_weights
from daemon.tasks.detect import Boxes

CONF, IOU = 0.25, 0.7


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        yield r


def make_worker(
    weights: str, max_batch: int = 4, *, device: str = "cpu", decode_jpegs: bool = False, pipelined: bool | None = None
) -> LocalDevice:
    spec = DeviceSpec(
        device=device,
        weights=weights,
        imgsz=640,
        precision="auto",
        max_det=300,
        torch_threads=2,
        log=LogConfig("warning", LogFormat.JSON),
        decode_jpegs=decode_jpegs,
        pipelined=pipelined,
    )
    return LocalDevice(spec, max_batch=max_batch)


@pytest.fixture(scope="module")
def default_worker(runner: asyncio.Runner) -> Iterator[LocalDevice]:
    worker = make_worker("default")
    runner.run(worker.start(120))
    yield worker
    runner.run(worker.stop(10))


def prepare(path: Path, reduced: bool = True) -> Prepared:
    return preprocess.prepare(Job(PurePosixPath(path.name), path), preprocess.PrepSettings(640, reduced, 10**9))


def match(ours: np.ndarray | Boxes, theirs: np.ndarray | Boxes, *, px: float, conf: float) -> None:
    """Same detections: each of ours pairs with one of theirs of the same class, boxes within px."""
    ours, theirs = (x.data if isinstance(x, Boxes) else x for x in (ours, theirs))
    assert len(ours) == len(theirs), (ours, theirs)
    ours = ours[np.argsort(-ours[:, 4])]
    theirs = theirs[np.argsort(-theirs[:, 4])]
    np.testing.assert_allclose(ours[:, :4], theirs[:, :4], atol=px)
    np.testing.assert_allclose(ours[:, 4], theirs[:, 4], atol=conf)
    np.testing.assert_array_equal(ours[:, 5], theirs[:, 5])


def predict(path: Path) -> np.ndarray:
    from ultralytics import YOLO

    result = YOLO(resolve_weights("default")).predict(str(path), imgsz=640, conf=CONF, iou=IOU, verbose=False)[0]
    return result.boxes.data.cpu().numpy()


@pytest.mark.parametrize("name", ["bus.jpg", "zidane.jpg"])
def test_matches_ultralytics_predict(runner: asyncio.Runner, default_worker: LocalDevice, name: str) -> None:
    boxes, _ms = runner.run(default_worker.infer([prepare(assets() / name)], CONF, IOU))
    expected = predict(assets() / name)
    assert len(expected) >= 2  # the real model finds the people in these photos
    match(boxes[0], expected, px=1.0, conf=0.01)
    assert default_worker.info.names == {0: "Normal", 1: "Fall"}


def test_reduced_decode_on_a_large_photo_matches_predict(
    runner: asyncio.Runner, default_worker: LocalDevice, tmp_path: Path
) -> None:
    big = tmp_path / "bus4x.jpg"
    with Image.open(assets() / "bus.jpg") as im:
        im.resize((im.width * 4, im.height * 4), Image.BICUBIC).save(big, quality=95)
    prepared = prepare(big, reduced=True)
    assert (prepared.width, prepared.height) == (3240, 4320)
    boxes, _ms = runner.run(default_worker.infer([prepared], CONF, IOU))
    expected = predict(big)
    strong = expected[expected[:, 4] > 0.4]
    found = boxes[0].data
    for det in strong:  # every confident detection is found at (nearly) the same place
        iou = box_iou(det[:4], found[:, :4])
        assert iou.max() > 0.9, (det, found)
        assert abs(found[iou.argmax(), 4] - det[4]) < 0.05


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area - inter)


def test_batched_equals_unbatched(runner: asyncio.Runner, default_worker: LocalDevice, tmp_path: Path) -> None:
    with Image.open(assets() / "bus.jpg") as bus, Image.open(assets() / "zidane.jpg") as zidane:
        variants = [
            bus.copy(),
            ImageOps.mirror(bus),
            ImageEnhance.Brightness(bus).enhance(0.7),
            zidane.resize(bus.size),
        ]
    items = []
    for i, image in enumerate(variants):
        image.save(tmp_path / f"{i}.jpg", quality=92)
        items.append(prepare(tmp_path / f"{i}.jpg"))
    batched, _ = runner.run(default_worker.infer(items, CONF, IOU))
    for item, boxes in zip(items, batched, strict=True):
        single, _ = runner.run(default_worker.infer([item], CONF, IOU))
        match(boxes, single[0], px=0.5, conf=1e-3)


def test_killed_worker_fails_batch_and_restarts(runner: asyncio.Runner, tiny_weights: Path) -> None:
    worker = make_worker(str(tiny_weights))

    async def main() -> None:
        await worker.start(120)
        item = prepare(assets() / "bus.jpg")
        await worker.infer([item], 0.9, IOU)  # works
        assert worker.pid is not None
        running = asyncio.create_task(worker.infer([item] * 4, 0.9, IOU))
        await asyncio.sleep(0)  # let the batch be sent
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(DeviceCrashed):
            await asyncio.wait_for(running, 30)
        assert not worker.up
        await worker.stop(0)
        await worker.start(120)
        boxes, _ = await worker.infer([item], 0.9, IOU)
        assert worker.up and isinstance(boxes[0], Boxes)
        await worker.stop(10)

    runner.run(main())


def test_overlapped_batches_are_answered_even_when_stopped(runner: asyncio.Runner) -> None:
    """The GPU's protocol, forced on a CPU: the next batch is launched before the last one is
    answered. Answers equal the batches sent alone, and a stop answers what was launched."""
    worker = make_worker("default", pipelined=True)
    conf = 0.1  # more boxes to compare

    async def main() -> None:
        await worker.start(120)
        assert worker.info.pipelined
        with Image.open(assets() / "bus.jpg") as bus:
            variants = [bus, ImageOps.mirror(bus), ImageEnhance.Brightness(bus).enhance(0.6)]
            items = []
            for i, image in enumerate(variants):
                image.save(worker_dir / f"{i}.jpg", quality=92)
                items.append(prepare(worker_dir / f"{i}.jpg"))
        batches = [items[: k % 3 + 1] for k in range(6)]
        together = await asyncio.gather(*(worker.infer(b, conf, IOU) for b in batches))
        assert sum(len(boxes) for boxes in together[0][0]) > 0
        for batch, (boxes, _ms) in zip(batches, together, strict=True):
            alone, _ = await worker.infer(batch, conf, IOU)
            for ours, theirs in zip(boxes, alone, strict=True):
                match(ours, theirs, px=1e-3, conf=1e-5)
        last = [asyncio.create_task(worker.infer(b, conf, IOU)) for b in batches[:2]]
        await asyncio.sleep(0)  # both sent: one launched, one behind it
        await worker.stop(60)
        for task in last:
            boxes, _ms = await task  # answered, not DeviceCrashed
            assert all(isinstance(b, Boxes) for b in boxes)

    worker_dir = Path(tempfile.mkdtemp())
    try:
        runner.run(main())
    finally:
        shutil.rmtree(worker_dir)


def test_missing_weights_is_a_start_error(runner: asyncio.Runner, tmp_path: Path) -> None:
    worker = make_worker(str(tmp_path / "nope.pt"))
    with pytest.raises(DeviceStartError, match=r"nope\.pt"):
        runner.run(worker.start(120))


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not cuda_available(), reason="no CUDA device")
def test_cuda_fp16_matches_cpu(runner: asyncio.Runner, default_worker: LocalDevice) -> None:
    worker = make_worker("default", device="cuda:0")
    info = runner.run(worker.start(120))
    try:
        assert info.half and info.pinned
        for name in ("bus.jpg", "zidane.jpg"):
            item = prepare(assets() / name)
            cpu, _ = runner.run(default_worker.infer([item], CONF, IOU))
            gpu, _ = runner.run(worker.infer([item, item], CONF, IOU))
            match(gpu[0], cpu[0], px=2.0, conf=0.02)
            match(gpu[1], cpu[0], px=2.0, conf=0.02)
    finally:
        runner.run(worker.stop(10))
