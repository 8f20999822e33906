"""incoming/ on another filesystem: refused by default, claimed by copy with intake.claim_by_copy.

The daemon runs in a mount namespace of its own (`unshare -rm`) with a tmpfs on incoming/; the
test drops files through /proc/<pid>/root, the daemon's view of that mount.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Daemon, assets, in_mount_namespace, write_config

RunDaemon = Callable[..., Daemon]
TMPFS_ON_INCOMING = 'mount -t tmpfs -o size=16m tmpfs "$0"'


def test_another_filesystem_is_refused_with_the_fix(tmp_path: Path) -> None:
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    config = write_config(tmp_path)
    command = [
        *in_mount_namespace(incoming, TMPFS_ON_INCOMING),
        sys.executable,
        "-m",
        "daemon",
        "run",
        "--config",
        str(config),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 78
    assert "paths.work" in proc.stderr and "intake.claim_by_copy = true" in proc.stderr


@pytest.mark.slow
def test_claim_by_copy_processes_and_removes_the_original(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    var = tmp_path / "var"
    incoming = var / "incoming"
    incoming.mkdir(parents=True)
    config = write_config(tmp_path, model={"weights": str(tiny_weights)}, intake={"claim_by_copy": True})
    daemon = daemon_factory(config, prefix=in_mount_namespace(incoming, TMPFS_ON_INCOMING))
    daemon.wait_event("daemon_started")
    seen = Path(f"/proc/{daemon.proc.pid}/root") / incoming.relative_to("/")  # the daemon's incoming/
    assert os.stat(seen).st_dev != os.stat(var / "work").st_dev
    (seen / "sub").mkdir()
    shutil.copyfile(assets() / "bus.jpg", seen / "sub" / ".bus.jpg.part")
    os.rename(seen / "sub" / ".bus.jpg.part", seen / "sub" / "bus.jpg")
    os.symlink("/etc/passwd", seen / "link.jpg")

    daemon.wait_event("image_done", path="sub/bus.jpg")
    assert daemon.wait_event("image_failed", path="link.jpg")["reason"] == "symlink_refused"
    assert daemon.stop() == 0
    assert (var / "done" / "sub" / "bus.jpg").read_bytes() == (assets() / "bus.jpg").read_bytes()
    assert json.loads((var / "output" / "sub" / "bus.jpg.json").read_text())["source"] == "sub/bus.jpg"
    assert os.readlink(var / "failed" / "link.jpg") == "/etc/passwd"  # recreated, never followed
    assert [p for p in (var / "work").rglob("*") if p.is_file() and p.name.startswith(".claim-")] == []
    assert list((var / "work" / "processing").rglob("*.jpg")) == []
