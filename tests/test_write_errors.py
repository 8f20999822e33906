"""Output disk full or read-only: no partial files, retries with backoff, nothing lost.

The daemon runs in a mount namespace of its own (`unshare -rm`, no privileges needed where
user namespaces are allowed) with a tiny tmpfs on output/. The test reaches that mount through
/proc/<pid>/root to look at it and to make room.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Daemon, assets, in_mount_namespace, write_config

RunDaemon = Callable[..., Daemon]


# A 64 KiB tmpfs with every page taken: the next byte written gets ENOSPC.
FULL_DISK = 'mount -t tmpfs -o size=64k tmpfs "$0"; head -c 64K /dev/zero > "$0/filler"'
# output/ro/ bind-mounted read-only (output/ itself stays writable, or the daemon refuses to start).
READ_ONLY_SUBDIR = 'mkdir -p "$0/ro"; mount --bind "$0/ro" "$0/ro"; mount -o remount,bind,ro "$0/ro"'


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_disk_full_retries_until_there_is_room(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    var = tmp_path / "var"
    output = var / "output"
    output.mkdir(parents=True)
    config = write_config(
        tmp_path, model={"weights": str(tiny_weights), "devices": ["cpu"]}, output={"write_attempts": 0}
    )
    daemon = daemon_factory(config, prefix=in_mount_namespace(output, FULL_DISK))
    daemon.wait_event("daemon_started")
    seen = Path(f"/proc/{daemon.proc.pid}/root") / output.relative_to("/")  # the daemon's view of output/
    incoming = var / "incoming"
    for name in ("a.jpg", "b.jpg"):
        shutil.copyfile(assets() / "bus.jpg", incoming / name)

    first = daemon.wait_event("write_failed", errno="ENOSPC")
    assert first["retry_in_s"] == 1.0
    daemon.wait_for(lambda r: r["event"] == "write_failed" and r["attempt"] == 2)  # retried, not given up
    written = files(seen)
    assert not [f for f in written if f.startswith(".")]  # no temp file left behind
    assert not [f for f in written if f.endswith(".json")]  # the .json, written last, marks a complete set
    for name in written:  # what did get written is whole: here the empty labels of a random-init model
        assert name in ("filler", "a.jpg.txt", "b.jpg.txt") and (name == "filler" or (seen / name).stat().st_size == 0)
    assert sorted(files(var / "work" / "processing")) == ["a.jpg", "b.jpg"]  # sources kept
    assert not (var / "failed").exists() or files(var / "failed") == []

    (seen / "filler").unlink()  # the operator makes room
    for name in ("a.jpg", "b.jpg"):
        daemon.wait_event("image_done", path=name, timeout_s=180)
    assert daemon.stop() == 0
    assert files(var / "done") == ["a.jpg", "b.jpg"]
    assert files(var / "work" / "processing") == []
    assert daemon.events("image_failed") == []


@pytest.mark.slow
def test_read_only_output_fails_the_item_with_the_reason_and_keeps_serving(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    var = tmp_path / "var"
    output = var / "output"
    output.mkdir(parents=True)
    config = write_config(
        tmp_path, model={"weights": str(tiny_weights), "devices": ["cpu"]}, output={"write_attempts": 2}
    )
    daemon = daemon_factory(config, prefix=in_mount_namespace(output, READ_ONLY_SUBDIR))
    daemon.wait_event("daemon_started")
    (var / "incoming" / "ro").mkdir()
    shutil.copyfile(assets() / "bus.jpg", var / "incoming" / "ro" / "bus.jpg")

    failed = daemon.wait_event("image_failed", path="ro/bus.jpg")
    assert failed["reason"] == "write_error"
    attempts = [r for r in daemon.events("write_failed") if r["path"] == "ro/bus.jpg"]
    assert [r["attempt"] for r in attempts] == [1, 2] and {r["errno"] for r in attempts} == {"EROFS"}
    report = json.loads((var / "failed" / "ro" / "bus.jpg.error.json").read_text())
    assert report["reason"] == "write_error" and "Read-only file system" in report["message"]
    assert (var / "failed" / "ro" / "bus.jpg").read_bytes() == (assets() / "bus.jpg").read_bytes()  # kept whole

    # Still serving: the rest of output/ is writable.
    shutil.copyfile(assets() / "bus.jpg", var / "incoming" / "bus.jpg")
    daemon.wait_event("image_done", path="bus.jpg")
    assert daemon.stop() == 0
    assert files(var / "work" / "processing") == [] and files(var / "incoming") == []
