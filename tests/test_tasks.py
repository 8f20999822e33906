"""Every Ultralytics task through real device processes: the .txt equals Ultralytics' own
`predict` + `Results.save_txt(save_conf=True)` for the same checkpoint and photo, and EXIF
orientation, reduced decode, device decode and batching give the same results as for detection.

The checkpoints (tests/task_models.py) carry the default detector's trained weights, so they
find the people in bus.jpg and zidane.jpg: every comparison below has something to compare.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pytest
import uvloop
from conftest import assets, oriented
from PIL import Image, ImageDraw, ImageOps

from daemon import preprocess
from daemon.config import ConfigError, LogConfig, LogFormat, parse
from daemon.jobs import Job, Prepared
from daemon.local import JPEG_SLOT_BYTES, LocalDevice
from daemon.messages import DeviceSpec
from daemon.service import prep_settings
from daemon.tasks import Payload, Task, Unsupported, checkpoint, head_of

CONF, IOU = 0.25, 0.7
TASKS = ("segment", "pose", "obb", "classify")
NOISE = 2e-4  # normalised coordinates and confidences: float32 arithmetic in another order


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        yield r


@pytest.fixture(scope="module")
def workers(runner: asyncio.Runner, task_weights: dict[str, Path]) -> Iterator[dict[str, LocalDevice]]:
    """One device process per task, at the checkpoint's own imgsz as "auto" finds it; each takes
    ready pixels and (pipeline.decode = "device") JPEG bytes alike."""
    started = {}
    for task in TASKS:
        spec = DeviceSpec(
            device="cpu",
            weights=str(task_weights[task]),
            imgsz=checkpoint.read(str(task_weights[task])).imgsz,
            precision="fp32",
            max_det=300,
            torch_threads=1,
            log=LogConfig("warning", LogFormat.JSON),
            decode_jpegs=True,
        )
        started[task] = LocalDevice(spec, max_batch=4)
    try:
        for w in started.values():
            runner.run(w.start(180))
        yield started
    finally:
        runner.run(each(w.stop(60) for w in started.values()))


async def each(steps: Iterable[Awaitable[object]]) -> None:
    await asyncio.gather(*steps)


def settings(worker: LocalDevice, *, reduced: bool = False, device: bool = False) -> preprocess.PrepSettings:
    classify = worker.info.task == "classify"
    return preprocess.PrepSettings(
        worker.model.imgsz, reduced, 10**9, JPEG_SLOT_BYTES if device and not classify else 0, classify
    )


def prepare(path: Path, s: preprocess.PrepSettings) -> Prepared:
    return preprocess.prepare(Job(PurePosixPath(path.name), path), s)


def infer(runner: asyncio.Runner, worker: LocalDevice, items: list[Prepared]) -> list[Payload]:
    answers, _ms = runner.run(worker.infer(items, CONF, IOU))
    assert all(not isinstance(a, str) for a in answers), answers
    return answers  # type: ignore[return-value]


def txt(worker: LocalDevice, item: Prepared, payload: Payload) -> str:
    return payload.txt(item.width, item.height, worker.model.names)


@functools.cache
def yolo(weights: str) -> object:
    from ultralytics import YOLO

    return YOLO(weights)


def predict_txt(weights: Path, path: Path, tmp: Path) -> str:
    """What Ultralytics writes for this photo: predict at the checkpoint's imgsz, then save_txt."""
    result = yolo(str(weights)).predict(str(path), conf=CONF, iou=IOU, verbose=False)[0]  # type: ignore[attr-defined]
    out = tmp / (path.name + ".txt")
    out.unlink(missing_ok=True)
    result.save_txt(out, save_conf=True)
    return out.read_text() if out.exists() else ""


def rows(text: str) -> list[list[float]]:
    return sorted(([float(v) for v in line.split()] for line in text.splitlines()), key=lambda r: -r[-1])


def same_txt(task: str, ours: str, theirs: str, *, tol: float = NOISE, prob_tol: float = 0.01) -> None:
    """The same lines: classes equal, every number within `tol` (probabilities within `prob_tol`)."""
    if task == "classify":
        mine, other = [line.split() for line in ours.splitlines()], [line.split() for line in theirs.splitlines()]
        assert len(mine) == len(other) == 5 and mine[0][1] == other[0][1], (ours, theirs)
        probs = {name: float(p) for p, name in other}
        cut = min(probs.values())  # a class below their 5th is not listed: its probability is at most this
        for p, name in mine:  # the same probabilities; two within prob_tol of each other may swap
            if name in probs:
                assert abs(float(p) - probs[name]) <= prob_tol + 0.005, (ours, theirs)
            else:  # swapped across the 5th place with a class of (nearly) the same probability
                assert float(p) <= cut + prob_tol + 0.005, (ours, theirs)
        return
    a, b = rows(ours), rows(theirs)
    assert len(a) == len(b) >= 1, (ours, theirs)
    for x, y in zip(a, b, strict=True):
        if task == "segment":  # a mask pixel on the threshold moves a vertex by a whole pixel
            assert x[0] == y[0] and abs(x[-1] - y[-1]) <= tol, (x[0], x[-1], y[0], y[-1])
            assert overlap(polygon(x[1:-1]), polygon(y[1:-1])) >= 0.98, (x, y)
            continue
        assert x[0] == y[0] and len(x) == len(y), (x, y)
        np.testing.assert_allclose(x, y, atol=tol)


def polygon(xy: list[float], side: int = 1000) -> np.ndarray:
    """A normalised polygon, filled at side x side pixels."""
    canvas = Image.new("1", (side, side))
    ImageDraw.Draw(canvas).polygon([(u * side, v * side) for u, v in zip(xy[::2], xy[1::2], strict=True)], fill=1)
    return np.asarray(canvas, dtype=bool)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def photo(tmp: Path, name: str) -> Path:
    if name.startswith("bus-o"):
        return oriented(tmp, int(name[5]))
    return assets() / name


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", ["bus.jpg", "zidane.jpg", "bus-o6.jpg"])
def test_txt_equals_ultralytics_predict(
    runner: asyncio.Runner,
    workers: dict[str, LocalDevice],
    task_weights: dict[str, Path],
    tmp_path: Path,
    task: str,
    name: str,
) -> None:
    """bus-o6.jpg: bus.jpg stored on its side with an EXIF tag that turns it upright."""
    worker = workers[task]
    assert worker.info.task == task
    path = photo(tmp_path, name)
    item = prepare(path, settings(worker))
    (payload,) = infer(runner, worker, [item])
    assert payload.task is Task(task)
    same_txt(task, txt(worker, item, payload), predict_txt(task_weights[task], path, tmp_path))


def test_replies_are_read_whole(workers: dict[str, LocalDevice]) -> None:
    """A segmentation reply is often over 16 KiB, which a Connection writes in two parts; the
    event loop's poll made the pipe non-blocking, so a read between the parts failed as if the
    device process had died, and its batch waited for ever. The pipe must block while read."""
    for worker in workers.values():
        assert worker._conn is not None and os.get_blocking(worker._conn.fileno())


def test_auto_imgsz_is_the_training_size(task_weights: dict[str, Path], tmp_path: Path) -> None:
    config = parse({"model": {"weights": str(task_weights["segment"])}}, base=tmp_path)
    assert config.model.imgsz == 0  # "auto" is the default
    assert checkpoint.resolve_config(config).model.imgsz == 416
    fixed = parse({"model": {"weights": str(task_weights["segment"]), "imgsz": 320}}, base=tmp_path)
    assert checkpoint.resolve_config(fixed).model.imgsz == 320  # a number still overrides it
    default = checkpoint.resolve_config(parse({}, base=tmp_path))
    assert default.model.imgsz == 640  # the embedded detector was trained at 640


def variants(tmp: Path) -> list[Path]:
    with Image.open(assets() / "bus.jpg") as bus, Image.open(assets() / "zidane.jpg") as zidane:
        images = [bus.copy(), ImageOps.mirror(bus), zidane.resize(bus.size)]
    paths = []
    for i, image in enumerate(images):
        image.save(tmp / f"v{i}.jpg", quality=92)
        paths.append(tmp / f"v{i}.jpg")
    return paths


@pytest.mark.parametrize("task", TASKS)
def test_batched_equals_unbatched(
    runner: asyncio.Runner, workers: dict[str, LocalDevice], tmp_path: Path, task: str
) -> None:
    worker = workers[task]
    items = [prepare(p, settings(worker)) for p in variants(tmp_path)]
    batched = infer(runner, worker, items)
    for item, payload in zip(items, batched, strict=True):
        (alone,) = infer(runner, worker, [item])
        same_txt(task, txt(worker, item, payload), txt(worker, item, alone), prob_tol=1e-4)


def predict_rows(weights: Path, path: Path) -> np.ndarray:
    """Ultralytics' boxes for this photo: (n, 6) x1 y1 x2 y2 conf cls, or for obb (n, 7) x y w h r conf cls."""
    result = yolo(str(weights)).predict(str(path), conf=CONF, iou=IOU, verbose=False)[0]  # type: ignore[attr-defined]
    found = result.obb if result.obb is not None else result.boxes
    return np.asarray(found.data.cpu().numpy())


def xyxy(task: str, rows: np.ndarray) -> np.ndarray:
    """Corners of the boxes; an oriented box's centre and size, its angle left out."""
    if task != "obb":
        return rows[:, :4]
    return np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], 1)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(hi - lo, 0, None).prod(1)
    area = (box[2:] - box[:2]).prod() + (boxes[:, 2:] - boxes[:, :2]).prod(1)
    return np.asarray(inter / (area - inter))


def close(task: str, ours: Payload, theirs: np.ndarray, *, conf: float = 0.05) -> None:
    """The same things found where decoding differed (reduced, or on the device): each confident
    one of `theirs` has one of ours of the same class, its box overlapping (IoU > 0.85) and its
    confidence within `conf` (0.05, as test_local checks detection at 640; 0.1 at these
    checkpoints' smaller sizes, where one model pixel is more of the photo).
    The mask, keypoint and angle branches of these checkpoints are random-init, hence more
    sensitive to the pixels than the trained boxes: they are compared exactly with predict in
    test_txt_equals_ultralytics_predict."""
    data = ours.data  # type: ignore[attr-defined]
    strong = theirs[theirs[:, -2 if task == "obb" else 4] > 0.4]
    assert len(strong), theirs
    conf_col = 5 if task == "obb" else 4
    for row in strong:
        same = data[(data[:, -1 if task == "obb" else 5] == row[-1 if task == "obb" else 5])]
        near = iou(xyxy(task, row[None])[0], xyxy(task, same)) > 0.85
        assert (near & (np.abs(same[:, conf_col] - row[conf_col]) < conf)).any(), (row, data)
    if task == "segment":
        assert all(len(p) >= 3 for p in ours.polygons)  # type: ignore[attr-defined]


@pytest.mark.parametrize("task", TASKS)
def test_reduced_decode_of_a_large_photo_matches_predict(
    runner: asyncio.Runner,
    workers: dict[str, LocalDevice],
    task_weights: dict[str, Path],
    tmp_path: Path,
    task: str,
) -> None:
    big = tmp_path / "bus4x.jpg"
    with Image.open(assets() / "bus.jpg") as im:
        im.resize((im.width * 4, im.height * 4), Image.BICUBIC).save(big, quality=95)
    worker = workers[task]
    item = prepare(big, settings(worker, reduced=True))
    full = prepare(big, settings(worker, reduced=False))
    assert (item.width, item.height) == (3240, 4320)
    (payload,) = infer(runner, worker, [item])
    assert item.shape == full.shape
    if task == "classify":
        same_txt(task, txt(worker, item, payload), predict_txt(task_weights[task], big, tmp_path), prob_tol=0.03)
    else:
        close(task, payload, predict_rows(task_weights[task], big), conf=0.1)


@pytest.mark.parametrize("task", ["segment", "pose", "obb"])
def test_device_decode_matches_host(
    runner: asyncio.Runner, workers: dict[str, LocalDevice], tmp_path: Path, task: str
) -> None:
    """JPEG bytes decoded, oriented and letterboxed in the device process, in one batch with a
    mirrored and an EXIF-rotated photo, give the host path's results."""
    worker = workers[task]
    paths = [assets() / "bus.jpg", oriented(tmp_path, 2), oriented(tmp_path, 3)]
    on_device = [prepare(p, settings(worker, device=True)) for p in paths]
    assert all(p.encoded_shape is not None for p in on_device)  # bytes, not pixels
    answers = infer(runner, worker, on_device)
    for path, payload in zip(paths, answers, strict=True):
        host = prepare(path, settings(worker, reduced=True))  # DCT scaling averages, as the device's antialias
        (expected,) = infer(runner, worker, [host])
        close(task, payload, expected.data, conf=0.1)  # type: ignore[attr-defined]


def test_classification_decodes_on_the_host(task_weights: dict[str, Path], tmp_path: Path) -> None:
    """Its resize and centre crop are not implemented on the device: "device" is refused for it,
    "auto" decodes on the host, and the preprocess settings never send it JPEG bytes."""
    weights = str(task_weights["classify"])
    explicit = parse({"model": {"weights": weights}, "pipeline": {"decode": "device"}}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"pipeline\.decode"):
        checkpoint.resolve_config(explicit)
    auto = checkpoint.resolve_config(parse({"model": {"weights": weights}}, base=tmp_path))
    assert auto.pipeline.decode.value == "host" and auto.model.imgsz == 224
    assert prep_settings(explicit, "classify").device_max_bytes == 0
    item = prepare(assets() / "zidane.jpg", preprocess.PrepSettings(224, True, 10**9, 0, True))
    assert item.shape == (224, 224) and item.image.shape == (224, 224, 3)


def test_payloads_json_and_counts(runner: asyncio.Runner, workers: dict[str, LocalDevice]) -> None:
    """The .json fields of each task, in source pixels."""
    for task, worker in workers.items():
        item = prepare(assets() / "bus.jpg", settings(worker))
        (payload,) = infer(runner, worker, [item])
        doc, counts = payload.json(worker.model.names), payload.counts(worker.model.names)
        if task == "classify":
            assert [d["class_name"] for d in doc["top5"]] == [
                line.split()[1] for line in txt(worker, item, payload).splitlines()
            ]
            assert counts["top1"] == doc["top5"][0]["class_name"]
            continue
        found = doc["detections"]
        assert len(found) == len(payload) == counts["detections"] >= 1
        for d in found:
            assert {"class_id", "class_name", "confidence"} <= set(d)
        if task == "segment":
            assert counts["masks"] == len(found)
            for d in found:
                points = np.array(d["polygon"])
                x1, y1, x2, y2 = d["box_xyxy"]
                assert points.shape[1] == 2 and len(points) >= 3
                assert (points[:, 0] >= x1 - 1).all() and (points[:, 0] <= x2 + 1).all()  # inside its box
                assert (points[:, 1] >= y1 - 1).all() and (points[:, 1] <= y2 + 1).all()
        if task == "pose":
            assert all(np.array(d["keypoints"]).shape == (17, 3) for d in found)
            assert 0 <= counts["keypoints"] <= 17 * len(found)
        if task == "obb":
            for d in found:
                x, y, w, h, _r = d["xywhr"]
                corners = np.array(d["corners"])
                assert corners.shape == (4, 2)
                np.testing.assert_allclose(corners.mean(0), (x, y), atol=0.02)
                assert 0 < x < item.width and 0 < y < item.height and w > 0 and h > 0


def test_unsupported_models_are_refused(tmp_path: Path) -> None:
    import torch
    from ultralytics.nn.tasks import RTDETRDetectionModel, WorldModel, YOLOEModel

    with pytest.raises(Unsupported, match=r"no trained weights: train it, or give a \.pt"):
        checkpoint.read("yolo11n.yaml")
    for cls, why in (
        (WorldModel, "open-vocabulary"),
        (YOLOEModel, "open-vocabulary"),
        (RTDETRDetectionModel, "RT-DETR"),
    ):
        path = tmp_path / f"{cls.__name__}.pt"
        torch.save({"model": cls.__new__(cls), "train_args": {}}, path)  # the class is what counts
        with pytest.raises(Unsupported, match=why):
            checkpoint.read(str(path))
        with pytest.raises(Unsupported, match=why):  # and the device process's own check
            head_of(SimpleNamespace(model=cls.__new__(cls), names={0: "a"}), 300)
    with pytest.raises(Unsupported, match="task 'semantic' is not supported"):
        head_of(SimpleNamespace(model=None, task="semantic", names={0: "a"}), 300)
