"""`inferd run` as a real process with a segmentation model, and the refusals at start."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Daemon, assets, oriented, write_config
from PIL import Image
from test_tasks import predict_txt, same_txt

from daemon.errors import EXIT_CONFIG

RunDaemon = Callable[..., Daemon]


def test_a_segmentation_model_end_to_end(
    tmp_path: Path, daemon_factory: RunDaemon, task_weights: dict[str, Path]
) -> None:
    """.txt as Ultralytics writes it, .json with polygons in source pixels, the annotated image,
    and image_done counting the masks; imgsz is the checkpoint's own (416), not 640."""
    weights = task_weights["segment"]
    config = write_config(
        tmp_path,
        model={"weights": str(weights), "devices": ["cpu"]},
        output={"formats": ["txt", "json", "image"]},
        pipeline={"decode": "host", "reduced_decode": False},  # the pixels predict sees
    )
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    shutil.copyfile(assets() / "zidane.jpg", incoming / "zidane.jpg")
    oriented(incoming, 6)
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(300) == 0, daemon.stderr()
    daemon.stop()
    started = daemon.events("daemon_started")[0]
    assert (started["task"], started["imgsz"]) == ("segment", 416)
    done = {r["path"]: r for r in daemon.events("image_done")}
    assert sorted(done) == ["bus-o6.jpg", "bus.jpg", "zidane.jpg"]
    out = tmp_path / "var" / "output"
    for name, record in done.items():
        assert record["task"] == "segment" and record["masks"] >= 1
        ours = (out / f"{name}.txt").read_text()
        same_txt("segment", ours, predict_txt(weights, incoming.parent / "done" / name, tmp_path))
        doc = json.loads((out / f"{name}.json").read_text())
        assert doc["task"] == "segment" and doc["schema_version"] == 2 and doc["model"]["imgsz"] == 416
        width, height = doc["image"]["width"], doc["image"]["height"]
        assert len(doc["detections"]) == record["detections"] == len(ours.splitlines())
        for d in doc["detections"]:
            points = np.array(d["polygon"])
            assert len(points) >= 3 and (points >= 0).all()
            assert (points[:, 0] <= width).all() and (points[:, 1] <= height).all()
        with Image.open(out / f"{name}.annotated.jpg") as im:
            assert im.size == (width, height)
    assert done["bus-o6.jpg"]["width"] == 1080  # turned upright: the stored pixels are 1080 x 810


def refused(tmp_path: Path, daemon_factory: RunDaemon, weights: str) -> str:
    config = write_config(tmp_path, model={"weights": weights, "devices": ["cpu"]})
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(120) == EXIT_CONFIG
    daemon.stop()
    assert not (tmp_path / "var" / "output").exists() or not any((tmp_path / "var" / "output").iterdir())
    return daemon.stderr()


def test_a_yaml_model_definition_is_refused(tmp_path: Path, daemon_factory: RunDaemon) -> None:
    message = refused(tmp_path, daemon_factory, "yolo11n-seg.yaml")
    assert "model.weights" in message and "no trained weights: train it, or give a .pt" in message


@pytest.mark.parametrize("kind", ["WorldModel", "RTDETRDetectionModel"])
def test_open_vocabulary_and_rtdetr_are_refused(tmp_path: Path, daemon_factory: RunDaemon, kind: str) -> None:
    import torch
    from ultralytics.nn import tasks

    cls = getattr(tasks, kind)
    path = tmp_path / f"{kind}.pt"
    torch.save({"model": cls.__new__(cls), "train_args": {"imgsz": 640}}, path)
    message = refused(tmp_path, daemon_factory, str(path))
    assert ("open-vocabulary" if kind == "WorldModel" else "RT-DETR") in message, message
