"""The daemon as a service: sd_notify over a real socket, SIGHUP reload, metrics and health."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from conftest import Daemon, assets, free_port, http_get, write_config
from prometheus_client.parser import text_string_to_metric_families

RunDaemon = Callable[..., Daemon]


def test_notify_reload_metrics(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    port = free_port()
    model = {"weights": str(tiny_weights), "devices": ["cpu"], "conf": 0.45}
    config = write_config(
        tmp_path,
        model=model,
        pipeline={"cpu_workers": 1},
        metrics={"listen": f"127.0.0.1:{port}"},
        log={"format": "json", "stats_interval_s": 0.5},
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(60)
    try:
        run_service(tmp_path, daemon_factory, config, sock, port)
    finally:
        sock.close()


def run_service(tmp_path: Path, daemon_factory: RunDaemon, config: Path, sock: socket.socket, port: int) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    daemon = daemon_factory(config, env=env)

    def next_message(prefix: str) -> str:
        while True:
            message = sock.recv(4096).decode()
            if message.startswith(prefix):
                return message

    assert next_message("STATUS=").startswith("STATUS=loading the model")
    next_message("READY=1")
    daemon.wait_event("daemon_started")
    status, _body = http_get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200
    next_message("WATCHDOG=1")  # idle counts as healthy

    incoming = tmp_path / "var" / "incoming"
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    (incoming / "bad.jpg").write_bytes(b"nope")
    daemon.wait_event("image_done", path="bus.jpg")
    daemon.wait_event("image_failed", path="bad.jpg")
    stats = daemon.wait_for(lambda r: r["event"] == "stats" and (r["done"], r["failed"]) == (1, 1))
    assert stats["workers_up"] == 1 and stats["in_flight"] == 0
    assert next_message("STATUS=1 done, 1 failed").endswith("1/1 devices up")

    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("inferd_images_done_total", (("device", "cpu:0"),))] == 1
    assert samples[("inferd_images_failed_total", (("reason", "not_an_image"),))] == 1
    assert samples[("inferd_workers_up", (("device", "cpu:0"),))] == 1

    # A live change: the confidence threshold; and a change that needs a restart (tests/test_reload.py
    # covers a new model).
    config.write_text(config.read_text().replace("0.45", "0.55") + "[intake]\nsettle_ms = 500\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert next_message("RELOADING=1").startswith("RELOADING=1")
    next_message("READY=1")
    reloaded = daemon.wait_event("reload_done")
    assert reloaded["applied"] == ["model.conf"] and reloaded["workers_restarted"] == 0
    assert daemon.events("reload_needs_restart")[-1]["keys"] == ["intake.settle_ms"]
    config.write_text("[model]\nimgsz = 'huge'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert "model.imgsz" in daemon.wait_event("reload_failed")["error"]

    assert daemon.stop(signal.SIGTERM) == 0
    next_message("STOPPING=1")


def test_a_stuck_worker_lets_the_watchdog_fire(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    """WATCHDOG=1 stops while work is in flight and nothing finishes, and resumes with progress."""
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "devices": ["cpu"]})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
    daemon = daemon_factory(config, env=env)
    (worker,) = daemon.wait_event("daemon_started")["pids"]
    os.kill(worker, signal.SIGSTOP)  # alive, but stuck: its pipe stays open, nothing comes back
    try:
        shutil.copyfile(assets() / "bus.jpg", tmp_path / "var" / "incoming" / "bus.jpg")
        first = daemon.wait_event("watchdog_withheld")
        daemon.wait_for(lambda r: r["event"] == "watchdog_withheld" and r is not first)
        assert daemon.events("image_done") == []  # two intervals in a row without a ping: systemd would fire
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # what was sent before the worker got stuck
                sock.recv(4096)
    finally:
        os.kill(worker, signal.SIGCONT)
    sock.settimeout(60)
    daemon.wait_event("image_done", path="bus.jpg")
    while sock.recv(4096) != b"WATCHDOG=1":  # progress: the pings resume
        pass
    assert daemon.stop() == 0
    sock.close()
