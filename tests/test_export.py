"""The daemon's export before READY, as real processes: logged once, cached for later starts,
stopped at once by SIGTERM, and a failure that exits 78 naming the runtime and the fix."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Daemon, assets, write_config

RunDaemon = Callable[..., Daemon]
EXPECTED = "fp32"  # precision "auto" with an explicit runtime: the table's fallback (test_tuning measures auto)


def cache_entries(tmp_path: Path) -> list[str]:
    models = tmp_path / "var" / "work" / "models"
    if not models.exists():
        return []
    return sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_check_exports_once_and_run_finds_it_cached(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "runtime": "openvino"})
    check = subprocess.run(
        [sys.executable, "-m", "daemon", "check", "--config", str(config)], capture_output=True, text=True, timeout=280
    )
    assert check.returncode == 0, check.stderr
    assert '"model_export_started"' in check.stdout and '"model_export_done"' in check.stdout
    (entry,) = cache_entries(tmp_path)
    assert f"-openvino-{EXPECTED}-" in entry
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(280) == 0, daemon.stderr()
    daemon.stop()
    started = daemon.events("daemon_started")[0]
    assert (started["runtime"], started["precision"]) == ("openvino", EXPECTED)
    assert entry in started["artefact"]
    assert daemon.events("model_export_started") == []  # found in the cache
    assert [r["path"] for r in daemon.events("image_done")] == ["bus.jpg"]
    assert cache_entries(tmp_path) == [entry]


@pytest.mark.slow
def test_sigterm_during_the_export_stops_at_once(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "runtime": "openvino"})
    daemon = daemon_factory(config)
    daemon.wait_event("model_export_started")
    assert daemon.stop(signal.SIGTERM) == 0
    assert daemon.events("daemon_started") == []
    assert daemon.events("daemon_stopped")[0]["during"] == "model_export"
    assert cache_entries(tmp_path) == []  # the export was killed, not finished


def test_a_failed_export_exits_78_naming_runtime_and_fix(tmp_path: Path, daemon_factory: RunDaemon) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    config = write_config(tmp_path, model={"weights": str(broken), "runtime": "openvino"})
    daemon = daemon_factory(config)
    assert daemon.proc.wait(280) == 78
    daemon.stop()
    assert "openvino" in daemon.stderr() and 'model.runtime = "torch"' in daemon.stderr()
    assert daemon.events("model_export_failed")
    assert cache_entries(tmp_path) == []


@pytest.mark.slow
def test_a_reload_to_another_runtime_exports_while_the_old_processes_serve(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "imgsz": 320}, intake={"settle_ms": 100})
    daemon = daemon_factory(config)
    assert daemon.wait_event("daemon_started")["runtime"] == "torch"
    incoming = tmp_path / "var" / "incoming"
    config.write_text(config.read_text().replace('runtime = "torch"', 'runtime = "openvino"'))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("model_export_started")
    shutil.copyfile(assets() / "bus.jpg", incoming / ".during.jpg.part")
    (incoming / ".during.jpg.part").rename(incoming / "during.jpg")  # the daemon keeps serving during the export
    daemon.wait_event("image_done", path="during.jpg")
    done = daemon.wait_event("reload_done")
    assert "model.runtime" in done["applied"] and done["workers_restarted"] == 1
    (entry,) = cache_entries(tmp_path)
    assert "-openvino-" in entry
    shutil.copyfile(assets() / "bus.jpg", incoming / ".after.jpg.part")
    (incoming / ".after.jpg.part").rename(incoming / "after.jpg")
    daemon.wait_event("image_done", path="after.jpg")
    assert daemon.stop() == 0


@pytest.mark.slow
def test_systemd_is_kept_patient_during_the_export(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    """Before READY=1: STATUS says it exports, EXTEND_TIMEOUT_USEC and WATCHDOG=1 keep
    TimeoutStartSec and the watchdog from firing."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(240)
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "runtime": "openvino"})
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "30000000"}
    daemon = daemon_factory(config, env=env)
    before: list[str] = []
    while (message := sock.recv(4096).decode()) != "READY=1":
        before.append(message)
    sock.close()
    assert any(m.startswith("STATUS=exporting the model to openvino") for m in before), before
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in before) and "WATCHDOG=1" in before, before
    assert daemon.stop() == 0
