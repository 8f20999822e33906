"""The measured choice and INT8, with real models, real photos and real processes.

- "auto" on a CPU is measured once (`inferd check`: runtime_tuned with its table), then read
  from the cache by the next start, which measures and exports nothing; an explicit runtime
  skips the search;
- INT8 of the real default model, calibrated on real photos, passes the accuracy gate on its
  held-out photos and the results' .json name precision "int8";
- calibrated on images unlike the ones served (flat grey frames: a camera at night), INT8 loses
  the people on the held-out photos: the start stops with exit 78, the key and the figures.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Daemon, assets, photo_like, write_config
from PIL import Image

from daemon import export, runtimes
from daemon.config import Precision, Runtime, load
from daemon.tuning import gate
from daemon.tuning.int8 import quantize

RunDaemon = Callable[..., Daemon]
pytestmark = pytest.mark.skipif(not runtimes.importable("nncf"), reason="nncf not installed (inferd[int8])")


def photos() -> list[Path]:
    import matplotlib
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return [
        data / "coffee.png", data / "chelsea.png", data / "rocket.jpg", assets() / "bus.jpg",
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg", data / "camera.png",
        data / "motorcycle_left.png", assets() / "zidane.jpg", data / "astronaut.png",
    ]  # fmt: skip


def folder(root: Path, images: list[Path]) -> Path:
    """`images` copied under names that keep their order: every fourth (bus, zidane) is held out."""
    root.mkdir(parents=True)
    for i, p in enumerate(images):
        if p.suffix:
            shutil.copyfile(p, root / f"{i:02d}-{p.name}")
        else:  # a flat grey frame
            Image.new("RGB", (1280, 720), (20, 20, 20)).save(root / f"{i:02d}-{p.name}.jpg")
    return root


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the session, linked into each daemon's paths.work: exported once."""
    return tmp_path_factory.mktemp("shared-models")


def share(tmp_path: Path, models: Path) -> None:
    work = tmp_path / "var" / "work"
    work.mkdir(parents=True)
    (work / "models").symlink_to(models)


@pytest.mark.slow
def test_measured_once_then_cached_and_explicit_skips(tmp_path: Path, daemon_factory: RunDaemon,
                                                     tiny_weights: Path) -> None:  # fmt: skip
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "runtime": "auto", "imgsz": 320})
    done = subprocess.run([sys.executable, "-m", "daemon", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    (tuned,) = [r for r in records if r["event"] == "runtime_tuned"]
    print("runtime_tuned:", tuned["runtime"], tuned["precision"], tuned["layout"], tuned["tune_s"], tuned["table"])
    assert tuned["measured_now"] and any("(chosen)" in row for row in tuned["table"]), tuned
    assert any("onnxruntime" in row for row in tuned["table"]) and any("openvino int8" in row for row in tuned["table"])
    assert any("no model.calibration images" in row for row in tuned["table"])  # skipped with its reason
    (checked,) = [r for r in records if r["event"] == "check_device"]
    assert (checked["runtime"], checked["precision"]) == (tuned["runtime"], tuned["precision"])

    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(280) == 0, daemon.stderr()
    daemon.stop()
    assert daemon.events("runtime_tune_started") == [] and daemon.events("model_export_started") == []
    (again,) = daemon.events("runtime_tuned")
    assert not again["measured_now"] and again["table"] == tuned["table"]
    started = daemon.events("daemon_started")[0]
    assert (started["runtime"], started["precision"]) == (tuned["runtime"], tuned["precision"])

    explicit = load(write_config(tmp_path, model={"weights": str(tiny_weights), "runtime": "openvino"}))
    assert asyncio.run(export.resolve(explicit)) is explicit  # no search, no child


@pytest.mark.slow
def test_int8_passes_the_gate_on_real_photos(tmp_path: Path, models: Path, daemon_factory: RunDaemon) -> None:
    calibration = folder(tmp_path / "calibration", photos())
    images = gate.images_in(calibration)
    plan = runtimes.ensure(
        str(runtimes_default()), imgsz=640, max_batch=4, runtime=Runtime.OPENVINO, precision=Precision.INT8,
        device="cpu", cache_dir=models, calibration=images, quantize=quantize,
    )  # fmt: skip
    figures = json.loads((Path(plan.artefact) / "gate.json").read_text())
    print("int8 gate:", figures)
    assert figures["held_out"] == 2 and figures["reference"] >= 6
    assert figures["matched"] >= 0.95 * figures["reference"]

    share(tmp_path, models)
    config = write_config(tmp_path, model={"runtime": "openvino", "precision": "int8", "imgsz": 640,
                                           "calibration": str(calibration)},
                          pipeline={"max_batch": 4}, output={"formats": ["json"]})  # fmt: skip
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(280) == 0, daemon.stderr()
    daemon.stop()
    assert daemon.events("model_export_started") == []  # the entry built above, found in the cache
    result = json.loads((tmp_path / "var" / "output" / "bus.jpg.json").read_text())
    assert result["model"]["precision"] == "int8", result["model"]
    assert len(result["detections"]) >= 4  # the people in bus.jpg


@pytest.mark.slow
def test_int8_below_the_gate_stops_the_start(tmp_path: Path, models: Path, daemon_factory: RunDaemon) -> None:
    grey = Path("grey")  # no suffix: folder() writes a flat dark frame
    calibration = folder(tmp_path / "calibration", [grey, grey, grey, assets() / "bus.jpg"] * 2)
    share(tmp_path, models)
    config = write_config(tmp_path, model={"runtime": "openvino", "precision": "int8", "imgsz": 640,
                                           "calibration": str(calibration)}, pipeline={"max_batch": 4})  # fmt: skip
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(280) == 78, daemon.stderr()
    daemon.stop()
    text = daemon.stderr() + json.dumps(daemon.events("model_export_failed"))
    print("int8 below the gate:", [e["error"] for e in daemon.events("model_export_failed")])
    assert "model.precision" in text and "int8 matched" in text and "held-out" in text, text[-3000:]
    digest = runtimes.cache.set_digest(gate.images_in(calibration))
    manifests = [json.loads(m.read_text())["key"] for m in models.glob(f"*-int8-*/{runtimes.MANIFEST}")]
    assert digest not in [k["calibration_sha256"] for k in manifests]  # nothing worse was cached
    assert not list(models.glob(".*.tmp-*"))


def runtimes_default() -> Path:
    from daemon.model import resolve_weights

    return Path(resolve_weights("default"))


def test_gate_counts_fp32_detections_found() -> None:
    """The gate itself: a missed box, a box of another class, a shifted box (IoU < 0.5)."""
    ref = [np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1], [50, 50, 60, 60, 0.7, 0]], np.float32)]
    ours = [np.array([[0, 0, 10, 11, 0.9, 0], [20, 20, 30, 30, 0.8, 0], [56, 56, 66, 66, 0.7, 0]], np.float32)]
    assert gate.score(ours, ref) == gate.Score(1, 3) and not gate.score(ours, ref).passed
    assert gate.score(ref, ref).passed and gate.Score(0, 0).passed


def test_layouts_and_candidates() -> None:
    """Processes x threads over the cores (a configured one is the only one), and every CPU
    runtime x precision of the table, with why one cannot run here instead of a guess."""
    from daemon.tuning import timing, tune

    assert tune.layouts(2, 0, 0) == [(1, 2), (2, 1)]
    assert tune.layouts(8, 0, 0) == [(1, 8), (2, 4), (4, 2)]
    assert tune.layouts(8, 1, 0) == [(1, 8)] and tune.layouts(8, 0, 2) == [(4, 2)]
    assert timing.batches(8) == [8, 4, 1] and timing.batches(16) == [16, 8, 1]
    assert timing.batches(2) == [2, 1] and timing.batches(1) == [1]  # at most three, max_batch first
    listed = {(r.value, p.value): why for r, p, why in tune.candidates(())}
    assert set(listed) == {("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"),
                           ("onnxruntime", "fp32"), ("torch", "fp32")}  # fmt: skip
    assert listed[("openvino", "int8")] == "no model.calibration images"
    assert listed[("openvino", "fp32")] == listed[("torch", "fp32")] == ""
    from daemon.runtimes.openvino import capabilities

    assert (listed[("openvino", "bf16")] == "") == ("BF16" in capabilities())  # asked, not read from flags


def test_the_devices_take_batches_of_the_measured_size(tmp_path: Path, daemon_factory: RunDaemon,
                                                      tiny_weights: Path) -> None:  # fmt: skip
    """A cached choice of batch 2 (max_batch 8): the start reads it (no child, nothing measured)
    and every batch the device is sent holds at most 2 images, 2 when 12 wait."""
    from daemon.tuning import tune

    config = write_config(tmp_path, model={"weights": str(tiny_weights), "runtime": "auto", "imgsz": 160},
                          pipeline={"max_batch": 8}, log={"level": "debug"})  # fmt: skip
    req = export.tune_request(load(config))
    row = tune.Timing("torch", "fp32", "1x2", 2, 9.9, "0/0", "chosen")
    tune._store(Path(req["cache_dir"]), tune.key(req), tune.Choice("torch", "fp32", 1, 2, 2, [row]))
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        photo_like(320, 240, seed=i).save(incoming / f"p{i:02d}.jpg", quality=90)
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(120) == 0, daemon.stderr()
    daemon.stop()
    (tuned,) = daemon.events("runtime_tuned")
    assert not tuned["measured_now"] and tuned["batch"] == 2
    assert tuned["table"] == ["torch fp32 1x2 b2: 9.9 img/s, gate 0/0 (chosen)"]  # the batch column
    sizes = [r["images"] for r in daemon.events("batch_sent")]
    assert sum(sizes) == 12 and max(sizes) == 2, sizes
