"""SIGHUP with a new model: new device processes start beside the old ones and take over.

Real daemons, real spawned workers, the random-init checkpoint from conftest; every wait is on a
log line. A worker is frozen with SIGSTOP so that batches are certainly in flight at the switch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, assets, write_config

RunDaemon = Callable[..., Daemon]


def drop(incoming: Path, names: list[str]) -> None:
    """Copy bus.jpg under each name, written aside and renamed into place as a producer should."""
    for name in names:
        shutil.copyfile(assets() / "bus.jpg", incoming / f".{name}.part")
        os.rename(incoming / f".{name}.part", incoming / name)


def model_of(var: Path, name: str) -> dict[str, Any]:
    model: dict[str, Any] = json.loads((var / "output" / f"{name}.json").read_text())["model"]
    return model


def start(tmp_path: Path, daemon_factory: RunDaemon, weights: Path, **pipeline: Any) -> tuple[Path, Daemon, int]:
    model = {"weights": str(weights), "devices": ["cpu"], "imgsz": 320}
    config = write_config(tmp_path, model=model, intake={"settle_ms": 100}, pipeline={"cpu_workers": 1, **pipeline})
    daemon = daemon_factory(config)
    pids = daemon.wait_event("daemon_started")["pids"]
    assert len(pids) == 1
    return config, daemon, pids[0]


@pytest.mark.slow
def test_a_new_model_takes_over_without_losing_a_file(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    second = tmp_path / "second.pt"
    shutil.copyfile(tiny_weights, second)
    # Batches of 2: the frozen worker's two slots hold 4 of the 8 images dropped while it is frozen
    # (claims and decoding go in groups: with batches of 8 all of them could be in flight on it).
    config, daemon, old_pid = start(tmp_path, daemon_factory, tiny_weights, max_batch=2)
    var = tmp_path / "var"
    before, during, after = ["b0.jpg", "b1.jpg"], [f"d{i}.jpg" for i in range(8)], ["a0.jpg", "a1.jpg"]
    drop(var / "incoming", before)
    for name in before:
        daemon.wait_event("image_done", path=name)

    # New weights and a smaller input: images letterboxed at 320 must still fit the new slots.
    text = config.read_text().replace(str(tiny_weights), str(second)).replace("imgsz = 320", "imgsz = 256")
    config.write_text(text)
    os.kill(old_pid, signal.SIGSTOP)  # what it is sent now stays in flight until the switch
    try:
        drop(var / "incoming", during)
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_event("reload_started")["restart_workers"]
        daemon.proc.send_signal(signal.SIGHUP)  # during a reload: queued, run after it
        daemon.wait_event("reload_queued")
        switching = daemon.wait_event("reload_switching")
        assert switching["retiring"] == [old_pid] and switching["batches_in_flight"] >= 1
    finally:
        os.kill(old_pid, signal.SIGCONT)
    done = daemon.wait_event("reload_done")
    assert done["applied"] == ["model.imgsz", "model.weights"] and done["workers_restarted"] == 1
    assert done["pids"] != [old_pid] and not Path(f"/proc/{old_pid}").exists()
    again = daemon.wait_for(lambda r: r["event"] == "reload_done" and r is not done)
    assert again["applied"] == [] and again["workers_restarted"] == 0 and again["pids"] == done["pids"]

    drop(var / "incoming", after)
    for name in during + after:
        daemon.wait_event("image_done", path=name)
    assert daemon.stop(signal.SIGTERM) == 0

    assert sorted(p.name for p in (var / "done").iterdir()) == sorted(before + during + after)
    assert not list((var / "failed").iterdir())
    for event in (
        "image_failed",
        "worker_crashed",
        "worker_exited",
        "worker_kill",
        "reload_failed",
        "reload_needs_restart",
    ):
        assert not daemon.events(event), daemon.events(event)
    old = {"weights": str(tiny_weights), "imgsz": 320}
    new = {"weights": str(second), "imgsz": 256}
    models = {name: {k: model_of(var, name)[k] for k in old} for name in before + during + after}
    assert all(models[name] == old for name in before)
    assert all(models[name] == new for name in after)
    # What was in flight on the frozen worker was answered by it, the rest by the new one.
    assert 1 <= sum(models[name] == old for name in during) < len(during)
    assert all(models[name] in (old, new) for name in during)


@pytest.mark.slow
def test_a_model_that_cannot_start_is_rejected_and_the_old_config_keeps_running(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config, daemon, pid = start(tmp_path, daemon_factory, tiny_weights)
    var = tmp_path / "var"
    missing = tmp_path / "missing.pt"
    # A model that cannot load, and a live key beside it: neither may be applied.
    text = config.read_text().replace(str(tiny_weights), str(missing))
    config.write_text(text.replace('format = "json"', 'format = "json"\nlevel = "warning"'))
    daemon.proc.send_signal(signal.SIGHUP)
    failed = daemon.wait_event("reload_failed")
    assert "missing.pt" in failed["error"] and failed["changed"] == ["log.level", "model.weights"]

    drop(var / "incoming", ["after.jpg"])
    daemon.wait_event("image_done", path="after.jpg")  # an info line: the log level did not change
    assert daemon.stop(signal.SIGTERM) == 0
    assert model_of(var, "after.jpg")["weights"] == str(tiny_weights)
    assert not daemon.events("reload_done") and not daemon.events("worker_exited")
    assert daemon.events("daemon_stopped")[0]["done"] == 1
    assert not Path(f"/proc/{pid}").exists()
