"""End to end: `inferd run` as a real process, files dropped into its folder, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Daemon, assets, photo_like, write_config

RunDaemon = Callable[..., Daemon]


def drop(incoming: Path, rel: str, source: Path | bytes) -> None:
    """Write under a hidden name, then rename into place, as a well-behaved producer does."""
    target = incoming / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name("." + target.name + ".uploading")
    if isinstance(source, bytes):
        tmp.write_bytes(source)
    else:
        shutil.copyfile(source, tmp)
    os.rename(tmp, target)


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def check_labels(path: Path) -> list[list[float]]:
    rows = [[float(v) for v in line.split()] for line in path.read_text().splitlines()]
    for row in rows:
        assert len(row) == 6 and row[0] == int(row[0])
        assert all(0.0 <= v <= 1.0 for v in row[1:])
    return rows


def test_drop_files_into_a_running_daemon(tmp_path: Path, daemon_factory: RunDaemon) -> None:
    config = write_config(tmp_path, output={"formats": ["txt", "json", "image"]}, intake={"settle_ms": 300})
    daemon = daemon_factory(config)
    started = daemon.wait_event("daemon_started")
    assert started["devices"] == ["cpu:0"] and started["model"].endswith("best.pt")
    incoming = tmp_path / "var" / "incoming"
    drop(incoming, "bus.jpg", assets() / "bus.jpg")
    drop(incoming, "cam 2/zidané.jpg", assets() / "zidane.jpg")
    photo_like(1920, 1080, seed=7).save(tmp_path / "gen.jpg", quality=90)
    drop(incoming, "gen.jpg", tmp_path / "gen.jpg")
    drop(incoming, "bad.jpg", b"this is not a jpeg")
    drop(incoming, ".hidden.jpg", assets() / "bus.jpg")
    for rel in ("bus.jpg", "cam 2/zidané.jpg", "gen.jpg"):
        done = daemon.wait_event("image_done", path=rel)
        assert done["device"] == "cpu:0" and done["batch"] >= 1
        for stage in ("queue_ms", "decode_ms", "infer_ms", "write_ms"):
            assert done[stage] >= 0
    failed = daemon.wait_event("image_failed", path="bad.jpg")
    assert failed["reason"] == "not_an_image"

    var = tmp_path / "var"
    bus = check_labels(var / "output" / "bus.jpg.txt")
    assert len(bus) >= 3 and {row[0] for row in bus} == {0}  # the people in bus.jpg
    doc = json.loads((var / "output" / "bus.jpg.json").read_text())
    assert doc["source"] == "bus.jpg" and doc["image"] == {
        "width": 810,
        "height": 1080,
        "exif_orientation": 1,
        "orientation_applied": False,
    }
    assert doc["names"] == {"0": "Normal", "1": "Fall"} and doc["model"]["name"] == "best.pt"
    assert len(doc["detections"]) == len(bus)
    for det, row in zip(
        sorted(doc["detections"], key=lambda d: -d["confidence"]), sorted(bus, key=lambda r: -r[5]), strict=True
    ):
        x1, y1, x2, y2 = det["box_xyxy"]
        assert det["class_name"] == "Normal" and abs(det["confidence"] - row[5]) < 1e-5
        assert abs((x1 + x2) / 2 / 810 - row[1]) < 1e-3 and abs((y2 - y1) / 1080 - row[4]) < 1e-3
    assert set(doc["timings_ms"]) >= {"queue", "decode", "batch_wait", "infer", "write"}
    check_labels(var / "output" / "cam 2" / "zidané.jpg.txt")

    assert daemon.stop(signal.SIGTERM) == 0
    stopped = daemon.events("daemon_stopped")[0]
    assert (stopped["done"], stopped["failed"]) == (3, 1)
    assert files(var / "done") == ["bus.jpg", "cam 2/zidané.jpg", "gen.jpg"]
    assert files(var / "failed") == ["bad.jpg", "bad.jpg.error.json"]
    error = json.loads((var / "failed" / "bad.jpg.error.json").read_text())
    assert error["reason"] == "not_an_image" and error["message"]
    assert files(var / "output") == sorted(
        [
            "bus.jpg.annotated.jpg",
            "bus.jpg.json",
            "bus.jpg.txt",
            "gen.jpg.annotated.jpg",
            "gen.jpg.json",
            "gen.jpg.txt",
            "cam 2/zidané.jpg.annotated.jpg",
            "cam 2/zidané.jpg.json",
            "cam 2/zidané.jpg.txt",
        ]
    )
    assert files(var / "incoming") == [".hidden.jpg"]
    assert files(var / "work" / "processing") == []


@pytest.mark.slow
def test_once_mode_drains_a_prefilled_folder(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"], "imgsz": 128},  # the drain is the test, not the model
        pipeline={"cpu_workers": 2},
    )
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    for i in range(50):
        photo_like(640, 480, seed=i).save(incoming / f"img{i:02d}.jpg", quality=90)
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(300) == 0, daemon.stderr()
    daemon.stop()
    assert len(daemon.events("image_done")) == 50
    assert max(r["batch"] for r in daemon.events("image_done")) > 1  # a backlog is batched
    started = daemon.events("daemon_started")[0]
    assert started["devices"] == ["cpu:0", "cpu:1"] and started["torch_threads"] == max(
        1, len(os.sched_getaffinity(0)) // 2
    )
    assert {r["device"] for r in daemon.events("image_done")} == {"cpu:0", "cpu:1"}  # both CPU processes served
    var = tmp_path / "var"
    assert len(files(var / "done")) == 50 and files(var / "incoming") == []
    assert len([f for f in files(var / "output") if f.endswith(".json")]) == 50
    assert daemon.events("daemon_stopped")[0]["done"] == 50


@pytest.mark.slow
def test_sigint_during_a_backlog_loses_nothing(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    config = write_config(
        tmp_path, model={"weights": str(tiny_weights), "devices": ["cpu"]}, pipeline={"max_pending": 8, "max_batch": 2}
    )
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    names = {f"img{i:02d}.jpg" for i in range(40)}
    for i, name in enumerate(sorted(names)):
        photo_like(640, 480, seed=i).save(incoming / name, quality=90)
    daemon = daemon_factory(config)
    daemon.wait_event("image_done")
    assert daemon.stop(signal.SIGINT) == 0
    var = tmp_path / "var"
    done = {Path(f).name for f in files(var / "done")}
    waiting = {Path(f).name for f in files(incoming) + files(var / "work" / "processing")}
    assert done | waiting == names and not done & waiting  # each input in exactly one place
    assert 0 < len(done) < 40
    outputs = files(var / "output")
    assert all(not Path(f).name.startswith(".") for f in outputs)  # no temp files left
    assert {Path(f).name.removesuffix(".json") for f in outputs if f.endswith(".json")} == done


def test_every_stdout_line_is_json_with_the_schema(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "devices": ["cpu"]})
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    (incoming / "x.jpg").write_bytes(b"")
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(120) == 0
    daemon.stop()
    assert daemon.raw and len(daemon.lines) == len(daemon.raw)
    for record in daemon.lines:
        assert record["event"] != "<not json>", record
        assert {"ts", "level", "event", "process"} <= set(record)
        assert record["ts"].endswith("Z") and record["level"] in ("debug", "info", "warning", "error")
    assert [r["event"] for r in daemon.lines if r["event"] in ("daemon_started", "daemon_stopped")] == [
        "daemon_started",
        "daemon_stopped",
    ]
