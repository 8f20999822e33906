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
