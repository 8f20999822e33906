"""Fault-injection soak: files stream in while the faults of a long run happen one after another.

The daemon runs in a mount namespace of its own: output/ is a small tmpfs that the test fills
and frees, and incoming/cam is another filesystem (a camera share). While photos and a few broken
files stream in, chunk by chunk, the test SIGKILLs each device process in turn, fills the
output disk until writes fail and then frees it, and sends a SIGHUP that changes the config.
Once every input is accounted for, SIGTERM. Every input must then be in done/ with complete
results or in failed/ with a reason; nothing may remain in processing/, no temp file anywhere,
and the daemon must have served throughout and exited 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Daemon, in_mount_namespace, photo_like, write_config

RunDaemon = Callable[..., Daemon]
MOUNTS = 'mount -t tmpfs -o size=8m tmpfs "$0/output"; mount -t tmpfs -o size=8m tmpfs "$0/incoming/cam"'
COUNT = 96  # photos; every 12th goes to the camera share
BROKEN = 4  # files that are not images


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class Producer:
    """Writes photos into incoming/ (every 12th into the share), each renamed into place; every
    25th from the 7th on is not an image."""

    def __init__(self, incoming: Path, camera: Path) -> None:
        self.incoming, self.camera = incoming, camera
        self.names: list[str] = []

    def send(self, count: int) -> None:
        for _ in range(count):
            i = len(self.names)
            folder, prefix = (self.camera, "cam/") if i % 12 == 5 else (self.incoming, "")
            name = f"{i:03}.jpg"
            tmp = folder / f".{name}.part"
            if i % 25 == 7:
                tmp.write_bytes(b"not an image at all " * 50)
            else:
                photo_like(320, 240, i).save(tmp, format="JPEG")
            os.rename(tmp, folder / name)
            self.names.append(prefix + name)


@pytest.mark.slow
def test_soak_with_faults(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    var = tmp_path / "var"
    for sub in ("output", "incoming/cam"):
        (var / sub).mkdir(parents=True)
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "imgsz": 64},
        pipeline={"cpu_workers": 2, "max_batch": 4},
        intake={"settle_ms": 200, "reconcile_interval_s": 1.0},
        output={"write_attempts": 0},  # a full disk is waited out, never failed
    )
    daemon = daemon_factory(config, prefix=in_mount_namespace(var, MOUNTS))
    pids = daemon.wait_event("daemon_started")["pids"]
    root = Path(f"/proc/{daemon.proc.pid}/root")  # the daemon's view of its mounts
    output, camera = root / (var / "output").relative_to("/"), root / (var / "incoming" / "cam").relative_to("/")
    producer = Producer(var / "incoming", camera)

    def finished() -> int:
        return len(daemon.events("image_done")) + len(daemon.events("image_failed"))

    def after(n: int) -> None:
        daemon.wait_for(lambda _r: finished() >= n, timeout_s=240)

    # Each fault lands while a chunk of 20 files is in the pipeline.
    producer.send(20)
    after(5)
    os.kill(pids[0], signal.SIGKILL)  # a device process dies mid-stream
    daemon.wait_event("worker_restarted", device="cpu:0")

    filler = output / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):  # the output disk fills up
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    producer.send(20)
    daemon.wait_event("write_failed", errno="ENOSPC")
    filler.unlink()  # and is freed: the retries go through

    producer.send(20)
    after(45)
    config.write_text(config.read_text().replace("[model]", "[model]\nconf = 0.3"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("reload_done")

    producer.send(20)
    after(65)
    os.kill(pids[1], signal.SIGKILL)
    daemon.wait_event("worker_restarted", device="cpu:1")

    producer.send(COUNT + BROKEN - len(producer.names))
    after(COUNT + BROKEN)
    assert camera.is_dir() and files(camera) == []  # the share's files were taken (by copy)
    assert [p for p in files(output) if Path(p).name.startswith(".")] == []  # no temp file
    done, failed, written = set(files(var / "done")), set(files(var / "failed")), set(files(output))
    for name in producer.names:
        if name in done:
            assert {f"{name}.txt", f"{name}.json"} <= written, name
            assert json.loads(Path(output, f"{name}.json").read_text())["source"] == name
        else:
            assert {name, f"{name}.error.json"} <= failed, name
            report = json.loads((var / "failed" / f"{name}.error.json").read_text())
            assert report["reason"] == "not_an_image", report
    assert len(done) == COUNT and len(failed) == 2 * BROKEN
    assert daemon.stop(signal.SIGTERM) == 0  # it served until now
    assert files(var / "work" / "processing") == []
    assert [p for p in files(var / "work") if p.endswith(".tmp")] == []
    assert files(var / "incoming") == []
    stopped = daemon.events("daemon_stopped")[0]
    assert (stopped["done"], stopped["failed"], stopped["left_in_processing"]) == (COUNT, BROKEN, 0)
    assert not daemon.events("internal_error") and not daemon.events("drain_incomplete")
