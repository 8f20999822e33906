"""`pipeline.decode = "device"`: JPEGs decoded, oriented and letterboxed in the device process.

On a CPU the device process decodes with libjpeg-turbo through torchvision, so the whole path
(routing, bytes in the shared slots, geometry, orientation, per-image errors) runs here; the
same code decodes with nvJPEG on a GPU, which the CUDA tests check where a GPU is present.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
import uvloop
from conftest import Daemon, assets, oriented, photo_like, write_config
from PIL import Image, ImageEnhance, ImageOps
from test_local import CONF, IOU, make_worker, match

from daemon import model, preprocess
from daemon.config import Decode, parse
from daemon.jobs import Job, Prepared
from daemon.local import JPEG_SLOT_BYTES, LocalDevice, resolve_decode
from daemon.tasks import Payload
from daemon.tasks.detect import Boxes

HOST = preprocess.PrepSettings(640, True, 10**9)
DEVICE = preprocess.PrepSettings(640, True, 10**9, JPEG_SLOT_BYTES)
CUDA = torch.cuda.is_available()


def prepare(path: Path, settings: preprocess.PrepSettings) -> Prepared:
    return preprocess.prepare(Job(PurePosixPath(path.name), path), settings)


def broken(tmp: Path) -> Path:
    """A JPEG whose header parses (PIL opens it lazily) but whose Huffman table is corrupt."""
    data = bytearray((assets() / "bus.jpg").read_bytes())
    data[data.index(b"\xff\xc4") + 4] = 0x5F  # a DHT with table class 5: no decoder accepts it
    path = tmp / "badtable.jpg"
    path.write_bytes(data)
    return path


def device_input(items: list[Prepared], device: str = "cpu") -> tuple[torch.Tensor, dict[int, str]]:
    jpegs = [torch.from_numpy(p.image.copy()) for p in items]
    metas = [(*p.gain, *p.pad, p.width, p.height, p.orientation) for p in items]
    return model.decode_batch(jpegs, metas, *items[0].shape, device, half=False)


def host_input(p: Prepared) -> torch.Tensor:
    return torch.from_numpy(p.image).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_letterbox_equals_host(tmp_path: Path, orientation: int) -> None:
    path = oriented(tmp_path, orientation)
    host, dev = prepare(path, HOST), prepare(path, DEVICE)
    assert dev.encoded_shape == host.shape and dev.image.ndim == 1  # bytes, not pixels
    assert (dev.width, dev.height, dev.gain, dev.pad) == (host.width, host.height, host.gain, host.pad)
    x, errors = device_input([dev])
    diff = (x[0] - host_input(host)).abs() * 255
    assert not errors
    assert diff.mean() < 0.5 and diff.max() <= 1.01  # OpenCV's fixed-point rounding, nothing more


@pytest.mark.parametrize("size", [(1920, 1080), (2048, 12000)])
def test_device_letterbox_of_large_photos_is_close_to_reduced_decode(tmp_path: Path, size: tuple[int, int]) -> None:
    """The host decodes these at 1/2 or 1/8 scale (DCT), the device at full size and averages
    down (antialiased): the same picture, not the same bits."""
    path = tmp_path / "big.jpg"
    photo_like(*size, seed=3).save(path, quality=90)
    host, dev = prepare(path, HOST), prepare(path, DEVICE)
    assert dev.encoded_shape == host.shape
    diff = (device_input([dev])[0][0] - host_input(host)).abs() * 255
    assert diff.mean() < 3, diff.mean()


def test_what_goes_to_the_device(tmp_path: Path) -> None:
    with Image.open(assets() / "bus.jpg") as bus:
        bus.convert("L").save(tmp_path / "grey.jpg")
        bus.convert("CMYK").save(tmp_path / "cmyk.jpg")
        bus.save(tmp_path / "progressive.jpg", progressive=True)
        bus.save(tmp_path / "bus.png")
    data = (assets() / "bus.jpg").read_bytes()
    (tmp_path / "trailing.jpg").write_bytes(data + b"\0" * 16)  # no end marker at the end: host
    device = {"grey.jpg"}
    for name in ("grey.jpg", "cmyk.jpg", "progressive.jpg", "bus.png", "trailing.jpg"):
        prepared = prepare(tmp_path / name, DEVICE)
        assert (prepared.encoded_shape is not None) == (name in device), name
        assert prepared.shape == prepare(tmp_path / name, HOST).shape
    small = preprocess.PrepSettings(640, True, 10**9, device_max_bytes=len(data) - 1)
    assert prepare(assets() / "bus.jpg", small).encoded_shape is None  # too big for a slot: host
    grey = prepare(tmp_path / "grey.jpg", DEVICE)
    diff = (device_input([grey])[0][0] - host_input(prepare(tmp_path / "grey.jpg", HOST))).abs() * 255
    assert diff.max() <= 1.01


def test_auto_decodes_on_the_device_only_when_every_device_is_a_gpu(tmp_path: Path) -> None:
    auto = parse({}, base=tmp_path)
    assert auto.pipeline.decode is Decode.AUTO
    assert resolve_decode(auto, ["cuda:0", "cuda:1"]).pipeline.decode is Decode.DEVICE
    assert resolve_decode(auto, ["cuda:0", "cpu:0"]).pipeline.decode is Decode.HOST
    assert resolve_decode(auto, ["cpu:0", "cpu:1"]).pipeline.decode is Decode.HOST
    explicit = parse({"pipeline": {"decode": "device"}}, base=tmp_path)
    assert resolve_decode(explicit, ["cpu:0"]).pipeline.decode is Decode.DEVICE


def test_a_broken_jpeg_fails_alone(tmp_path: Path) -> None:
    items = [prepare(assets() / "bus.jpg", DEVICE), prepare(broken(tmp_path), DEVICE)]
    items.append(prepare(assets() / "bus.jpg", DEVICE))
    x, errors = device_input(items)
    assert list(errors) == [1] and "DHT" in errors[1]
    assert torch.equal(x[0], x[2]) and x[1].eq(114 / 255).all()


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        yield r


def start(runner: asyncio.Runner, device: str, *, decode_jpegs: bool) -> LocalDevice:
    worker = make_worker("default", device=device, decode_jpegs=decode_jpegs)
    runner.run(worker.start(120))
    return worker


@pytest.fixture(scope="module")
def host_worker(runner: asyncio.Runner) -> Iterator[LocalDevice]:
    worker = start(runner, "cpu", decode_jpegs=False)
    yield worker
    runner.run(worker.stop(10))


def check_against_host(runner: asyncio.Runner, worker: LocalDevice, host_worker: LocalDevice, tmp: Path) -> None:
    """A batch of JPEGs decoded on `worker`'s device gives the host path's detections; the broken
    one in the middle fails with a reason and takes nothing with it."""
    paths = [assets() / "bus.jpg", oriented(tmp, 2), broken(tmp), oriented(tmp, 3)]
    items = [prepare(p, DEVICE) for p in paths]
    assert all(p.encoded_shape == items[0].encoded_shape for p in items)  # one batch
    px, conf = (1.0, 0.01) if worker.device == "cpu" else (2.0, 0.02)  # nvJPEG's IDCT, fp16
    answers, _ms = runner.run(worker.infer(items, CONF, IOU))
    assert isinstance(answers[2], str) and "cannot decode" in answers[2]
    for i in (0, 1, 3):
        expected, _ = runner.run(host_worker.infer([prepare(paths[i], HOST)], CONF, IOU))
        assert len(expected[0]) >= 2  # the people in the bus photo
        match(answers[i], expected[0], px=px, conf=conf)
    single, _ = runner.run(worker.infer([items[1]], CONF, IOU))  # batched == unbatched
    match(answers[1], single[0], px=0.5, conf=1e-3)


def test_cpu_device_decode_matches_host(runner: asyncio.Runner, host_worker: LocalDevice, tmp_path: Path) -> None:
    worker = start(runner, "cpu", decode_jpegs=True)
    try:
        assert worker.slot_bytes >= JPEG_SLOT_BYTES and not worker.info.pipelined
        check_against_host(runner, worker, host_worker, tmp_path)
    finally:
        runner.run(worker.stop(10))


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_nvjpeg_matches_host(runner: asyncio.Runner, host_worker: LocalDevice, tmp_path: Path) -> None:
    worker = start(runner, "cuda:0", decode_jpegs=True)
    try:
        assert worker.info.pipelined and worker.info.pinned
        check_against_host(runner, worker, host_worker, tmp_path)
    finally:
        runner.run(worker.stop(10))


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_nvjpeg_letterbox_equals_cpu(tmp_path: Path) -> None:
    for orientations in ((1, 3), (6, 8)):  # a batch shares one letterboxed shape
        items = [prepare(oriented(tmp_path, o), DEVICE) for o in orientations]
        gpu, errors = device_input(items, "cuda:0")
        cpu, _ = device_input(items)
        assert not errors
        assert ((gpu.cpu() - cpu).abs() * 255).mean() < 1.0  # two IDCTs, one picture


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_overlapped_batches_equal_one_at_a_time(runner: asyncio.Runner, tmp_path: Path) -> None:
    """Twelve batches of two shapes in turn, sent at once (two in flight: the next one copied
    and launched before the last one's results are read), give what each gives alone."""
    worker = start(runner, "cuda:0", decode_jpegs=False)
    try:
        photos = []
        for i in range(12):
            with Image.open(assets() / ("zidane.jpg" if i % 2 else "bus.jpg")) as im:
                varied = ImageEnhance.Brightness(ImageOps.mirror(im) if i % 4 > 1 else im).enhance(0.7 + i / 20)
            varied.save(tmp_path / f"{i}.jpg", quality=90)
            photos.append(prepare(tmp_path / f"{i}.jpg", HOST))
        batches = [[photos[i], photos[(i + 2) % 12], photos[(i + 4) % 12]] for i in range(12)]

        async def together() -> list[tuple[list[Payload | str], float]]:
            return await asyncio.gather(*(worker.infer(b, CONF, IOU) for b in batches))

        answers = runner.run(together())
        assert all(len(boxes) for boxes in answers[0][0])  # the people are found: the comparison has teeth
        for batch, (boxes, _ms) in zip(batches, answers, strict=True):
            alone, _ = runner.run(worker.infer(batch, CONF, IOU))
            # The same batch alone, not each image alone: in fp16 a batch of another size may
            # round two people's boxes to either side of the NMS threshold (seen on an H100:
            # IoU 0.70 against iou=0.7). Batched == unbatched is checked in fp32 in test_local.
            for ours, theirs in zip(boxes, alone, strict=True):
                assert isinstance(ours, Boxes) and isinstance(theirs, Boxes)
                match(ours, theirs, px=0.5, conf=1e-3)
    finally:
        runner.run(worker.stop(10))


def results(var: Path) -> dict[str, list[dict[str, object]]]:
    return {p.name: json.loads(p.read_text())["detections"] for p in sorted((var / "output").glob("*.json"))}


def test_daemon_with_device_decode(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    """The same folder through two daemons, host and device decode: the same detections, the
    same failures."""
    found = {}
    for decode in ("host", "device"):
        root = tmp_path / decode
        root.mkdir()
        config = write_config(root, pipeline={"decode": decode})
        incoming = root / "var" / "incoming"
        incoming.mkdir(parents=True)
        for name in ("bus.jpg", "zidane.jpg"):
            (incoming / name).write_bytes((assets() / name).read_bytes())
        oriented(incoming, 6)
        broken(incoming)
        with Image.open(assets() / "zidane.jpg") as im:
            im.save(incoming / "zidane.png")
        daemon = daemon_factory(config, "--once")
        assert daemon.proc.wait(300) == 0, daemon.stderr()
        daemon.stop()
        assert daemon.events("daemon_started")[0]["decode"] == decode
        failed = {r["path"]: r["reason"] for r in daemon.events("image_failed")}
        assert failed == {"badtable.jpg": "not_an_image"}
        assert (root / "var" / "failed" / "badtable.jpg").exists()
        found[decode] = results(root / "var")
    assert (
        sorted(found["host"])
        == sorted(found["device"])
        == ["bus-o6.jpg.json", "bus.jpg.json", "zidane.jpg.json", "zidane.png.json"]
    )
    for name, expected in found["host"].items():
        boxes = [
            np.array([[*d["box_xyxy"], d["confidence"], d["class_id"]] for d in dets], dtype=np.float32).reshape(-1, 6)
            for dets in (found["device"][name], expected)
        ]
        assert len(boxes[1]) >= 1, name
        match(boxes[0], boxes[1], px=2.0, conf=0.01)  # source pixels: 1 px at the model's scale
