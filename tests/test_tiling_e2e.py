"""Tiling end to end: the daemon as a process, the default person detector, real photos of people
pasted on a strip far taller than the model input (bench/strips.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench import strips
from bench.harness import Daemon
from tests.conftest import write_config

RunDaemon = Callable[..., Daemon]


@pytest.fixture(scope="module")
def strip() -> tuple[Image.Image, np.ndarray]:
    """A 640x12000 strip (letterboxed to 640 it shrinks 18.75x, as a 2048x12000 one does) with three
    photos of people, and the reference: the model's confident detections on each photo alone."""
    from daemon.model import resolve_weights

    image, pasted = strips.strip(640, 12000, seed=1, count=3)
    return image, strips.reference(resolve_weights("default"), pasted)


def run_once(root: Path, daemon_factory: RunDaemon, images: dict[str, Image.Image], **sections: Any) -> Daemon:
    root.mkdir()
    config = write_config(root, **sections)
    incoming = root / "var" / "incoming"
    incoming.mkdir(parents=True)
    for name, image in images.items():
        image.save(incoming / name, quality=90)
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(300) == 0, daemon.stderr()
    daemon.stop()
    return daemon


def boxes(document: dict[str, Any]) -> np.ndarray:
    rows = [d["box_xyxy"] + [d["confidence"], d["class_id"]] for d in document["detections"]]
    return np.array(rows, np.float32).reshape(-1, 6)


@pytest.mark.slow
def test_people_on_a_strip_are_found_with_tiling_and_missed_without(
    tmp_path: Path, daemon_factory: RunDaemon, strip: tuple[Image.Image, np.ndarray]
) -> None:
    image, ref = strip
    found: dict[str, tuple[int, int]] = {}
    for mode in ("off", "auto"):
        run_once(tmp_path / mode, daemon_factory, {"strip.jpg": image}, tiling={"mode": mode})
        document = json.loads((tmp_path / mode / "var" / "output" / "strip.jpg.json").read_text())
        found[mode] = strips.score(boxes(document), ref)
        assert document.get("tiles") == (24 if mode == "auto" else None)  # 640x12000 in 640 tiles, stride 512
        if mode == "auto":  # the .txt is normalised to the whole image, as the .json is in its pixels
            txt = (tmp_path / mode / "var" / "output" / "strip.jpg.txt").read_text().splitlines()
            first = [float(v) for v in txt[0].split()]
            x1, y1, x2, y2 = document["detections"][0]["box_xyxy"]
            xywhn = [(x1 + x2) / 1280, (y1 + y2) / 24000, (x2 - x1) / 640, (y2 - y1) / 12000]
            assert first[1:5] == pytest.approx(xywhn, abs=1e-4)
    assert found["off"][0] == 0  # letterboxed whole, the people are a few pixels tall
    assert found["auto"][0] >= len(ref) - 1, (found, len(ref))


def straddling(seed: int) -> tuple[Image.Image, list[strips.Pasted]]:
    """A 640x1152 image (two 640 tiles, overlapping over y 512-640) with a photo of people across
    that border."""
    image = Image.new("RGB", (640, 1152), (120, 110, 100))
    name, photo = strips.photos()[seed % 3]
    photo = photo.copy()
    photo.thumbnail((600, 600))
    x, y = 20, 576 - photo.height // 2 + 40 * (seed - 1)
    image.paste(photo, (x, y))
    return image, [strips.Pasted(name, (x, y, x + photo.width, y + photo.height), photo)]


@pytest.mark.slow
def test_tiles_of_several_images_share_batches_with_the_results_of_one_at_a_time(
    tmp_path: Path, daemon_factory: RunDaemon
) -> None:
    from daemon.model import resolve_weights

    made = {f"img{i}.jpg": straddling(i) for i in range(3)}
    images = {name: image for name, (image, _) in made.items()}
    results: dict[int, dict[str, np.ndarray]] = {}
    for max_batch in (8, 1):
        root = tmp_path / f"batch{max_batch}"
        daemon = run_once(
            root, daemon_factory, images, tiling={"mode": "on"}, pipeline={"max_batch": max_batch, "max_wait_ms": 2000}
        )
        done = daemon.events("image_done")
        assert len(done) == 3 and all(r["tiles"] == 2 for r in done)
        if max_batch == 8:  # each image has two 640x640 tiles: a batch of more holds tiles of several images
            assert max(r["batch"] for r in done) > 2
        output = root / "var" / "output"
        results[max_batch] = {name: boxes(json.loads((output / f"{name}.json").read_text())) for name in images}
    for name in images:
        batched, alone = results[8][name], results[1][name]
        assert batched.shape == alone.shape, name
        np.testing.assert_allclose(batched, alone, atol=0.05)
    weights = resolve_weights("default")
    found, wanted = 0, 0
    for name, (_, pasted) in made.items():  # the people across the border are found whole (IoU >= 0.5)
        ref = strips.reference(weights, pasted)
        found, wanted = found + strips.score(results[8][name], ref)[0], wanted + len(ref)
    assert found >= wanted - 1, (found, wanted)  # one of Zidane's two is found as one loose box
