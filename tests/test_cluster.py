"""The Ray backend against a real Ray cluster (`ray start` nodes as separate processes)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, assets, photo_like, write_config

RunDaemon = Callable[..., Daemon]
pytestmark = pytest.mark.slow


def ray_config(tmp: Path, address: str, **sections: dict[str, Any]) -> Path:
    cluster = {"backend": "ray", "address": address, "cpu_actors": 1, "connect_timeout_s": 20}
    cluster.update(sections.pop("cluster", {}))
    # PyTorch unless a test asks for a runtime ("auto" measures on the node: its own test).
    model = {"devices": "auto", "runtime": "torch", **sections.pop("model", {})}
    return write_config(tmp, cluster=cluster, model=model, **sections)


def fill(incoming: Path, count: int) -> set[str]:
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    shutil.copyfile(assets() / "zidane.jpg", incoming / "zidane.jpg")
    for i in range(count - 2):
        photo_like(480, 360, seed=i).save(incoming / f"img{i:02d}.jpg", quality=90)
    return {p.name for p in incoming.iterdir()}


def rows(output: Path) -> dict[str, list[list[float]]]:
    return {
        p.name: [[float(v) for v in line.split()] for line in p.read_text().splitlines()]
        for p in sorted(output.glob("*.txt"))
    }


def same_rows(a: list[list[float]], b: list[list[float]]) -> bool:
    if len(a) != len(b):
        return False
    pairs = zip(a, b, strict=True)
    return all(len(x) == len(y) and all(abs(u - v) < 1e-4 for u, v in zip(x, y, strict=True)) for x, y in pairs)


def test_ray_results_equal_the_local_backend(tmp_path: Path, daemon_factory: RunDaemon, ray_head: Any) -> None:
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local_dir.mkdir()
    ray_dir.mkdir()
    names = fill(local_dir / "var" / "incoming", 6)
    fill(ray_dir / "var" / "incoming", 6)
    # Both decode the JPEGs in the device process (the Ray backend's "auto"): the same arithmetic.
    local = daemon_factory(write_config(local_dir, pipeline={"decode": "device", "cpu_workers": 1}), "--once")
    assert local.proc.wait(300) == 0, local.stderr()
    local.stop()
    remote = daemon_factory(ray_config(ray_dir, ray_head.address), "--once")
    started = remote.wait_event("daemon_started")
    assert started["devices"] == ["ray:cpu:0"] and started["decode"] == "device"
    maps = Path(f"/proc/{remote.proc.pid}/maps").read_text()
    assert "_raylet" not in maps  # the daemon's own process never loads ray (its driver process does)
    assert remote.proc.wait(300) == 0, remote.stderr()
    remote.stop()
    assert {r["device"] for r in remote.events("image_done")} == {"ray:cpu:0"}
    a, b = rows(local_dir / "var" / "output"), rows(ray_dir / "var" / "output")
    assert set(a) == set(b) == {f"{n}.txt" for n in names}
    assert len(a["bus.jpg.txt"]) >= 3  # the people in bus.jpg
    for name in a:
        assert same_rows(a[name], b[name]), (name, a[name], b[name])
    doc = json.loads((ray_dir / "var" / "output" / "bus.jpg.json").read_text())
    assert doc["device"] == "ray:cpu:0" and doc["model"]["name"] == "best.pt"


def healthz(port: int) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def drop_many(incoming: Path, count: int) -> set[str]:
    incoming.mkdir(parents=True, exist_ok=True)
    names = set()
    for i in range(count):
        name = f"s{i:03d}.jpg"
        photo_like(640, 480, seed=100 + i).save(incoming / f".{name}.part", "JPEG", quality=90)
        (incoming / f".{name}.part").rename(incoming / name)
        names.add(name)
    return names


def finished(daemon: Daemon, names: set[str], timeout_s: float = 240) -> None:
    seen: set[str] = set()
    daemon.wait_for(lambda r: r["event"] == "image_done" and not seen.add(r["path"]) and seen >= names, timeout_s)


def test_a_ray_worker_killed_mid_stream_loses_nothing(tmp_path: Path, daemon_factory: RunDaemon, ray_head: Any) -> None:
    import os
    import signal

    config = ray_config(tmp_path, ray_head.address, pipeline={"max_batch": 2}, intake={"settle_ms": 100})
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    actor = daemon.wait_event("actor_started")
    names = drop_many(tmp_path / "var" / "incoming", 40)
    daemon.wait_event("image_done")
    os.kill(actor["pid"], signal.SIGKILL)  # the actor's Ray worker process, as the OOM killer would
    crashed = daemon.wait_event("worker_crashed")
    assert crashed["device"] == "ray:cpu:0" and crashed["started"] is True
    restarted = daemon.wait_event("worker_restarted", device="ray:cpu:0")
    assert restarted["pid"] != actor["pid"]
    finished(daemon, names)
    assert daemon.stop() == 0
    stopped = daemon.events("daemon_stopped")[0]
    assert (stopped["done"], stopped["failed"]) == (40, 0)
    assert {p.name for p in (tmp_path / "var" / "done").iterdir()} == names
    assert not list((tmp_path / "var" / "work" / "processing").iterdir())


def test_the_ray_head_stopped_and_restarted_mid_stream_loses_nothing(tmp_path: Path, daemon_factory: RunDaemon) -> None:
    pytest.importorskip("ray")
    from conftest import free_port
    from raycluster import RayCluster

    cluster = RayCluster(num_cpus=2).start()
    try:
        port = free_port()
        config = ray_config(
            tmp_path,
            cluster.address,
            cluster={"connect_timeout_s": 10},
            pipeline={"max_batch": 2},
            intake={"settle_ms": 100},
            metrics={"listen": f"127.0.0.1:{port}"},
        )
        daemon = daemon_factory(config)
        daemon.wait_event("actor_started")
        assert healthz(port) == (200, "ok\n")
        names = drop_many(tmp_path / "var" / "incoming", 24)
        daemon.wait_event("image_done")
        cluster.head.kill()  # the whole head: GCS, raylet, the actor's worker
        lost = daemon.wait_event("cluster_lost")
        assert lost["address"] == cluster.address
        status, body = healthz(port)
        assert status == 503 and "Ray cluster lost" in body
        cluster.head.start()
        daemon.wait_event("cluster_reconnected", timeout_s=120)
        finished(daemon, names)
        assert healthz(port) == (200, "ok\n")
        assert daemon.stop() == 0
        stopped = daemon.events("daemon_stopped")[0]
        assert (stopped["done"], stopped["failed"]) == (24, 0)
        assert {p.name for p in (tmp_path / "var" / "done").iterdir()} == names
    finally:
        cluster.stop()


def test_a_cluster_unreachable_at_start_exits_naming_the_address(tmp_path: Path, daemon_factory: RunDaemon) -> None:
    pytest.importorskip("ray")
    from conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    daemon = daemon_factory(ray_config(tmp_path, address, cluster={"connect_timeout_s": 3}))
    assert daemon.proc.wait(120) == 1  # not 78: systemd restarts it, the cluster may come up
    daemon.stop()
    failed = daemon.events("start_failed")[0]
    assert f"cannot reach the Ray cluster at {address}" in failed["error"] and failed["permanent"] is False


def test_an_image_that_kills_actors_fails_as_poison(tmp_path: Path, daemon_factory: RunDaemon, ray_head: Any) -> None:
    import os

    import faulty_model

    weights = faulty_model.save(tmp_path / "yolo11n-segfault.pt", "segfault")
    tests = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)}
    model = {"weights": str(weights)}
    config = ray_config(tmp_path, ray_head.address, model=model, intake={"settle_ms": 0}, pipeline={"max_attempts": 2})
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    faulty_model.marker_image(320, 240).save(incoming / "marker.jpg", quality=95)
    for i in range(4):
        photo_like(320, 240, seed=i).save(incoming / f"ok{i}.jpg", quality=90)
    daemon = daemon_factory(config, "--once", env=env)
    assert daemon.proc.wait(240) == 0, daemon.stderr()
    daemon.stop()
    failed = daemon.wait_event("image_failed", path="marker.jpg")
    assert failed["reason"] == "worker_crashed_repeatedly"
    assert len([r for r in daemon.events("worker_crashed") if r["started"]]) == 2  # pipeline.max_attempts actors
    assert {r["path"] for r in daemon.events("image_done")} == {f"ok{i}.jpg" for i in range(4)}


def test_a_reload_with_a_new_model_starts_new_actors(
    tmp_path: Path, daemon_factory: RunDaemon, ray_head: Any, tiny_weights: Path
) -> None:
    import signal

    def config(weights: str) -> Path:
        return ray_config(tmp_path, ray_head.address, model={"weights": weights}, intake={"settle_ms": 0})

    daemon = daemon_factory(config("default"))
    first = daemon.wait_event("actor_started")
    config(str(tiny_weights))
    daemon.proc.send_signal(signal.SIGHUP)
    done = daemon.wait_event("reload_done")
    assert done["workers_restarted"] == 1 and done["pids"] != [first["pid"]]
    names = drop_many(tmp_path / "var" / "incoming", 4)
    finished(daemon, names)
    assert daemon.stop() == 0
    assert all(r["device"] == "ray:cpu:0" for r in daemon.events("image_done"))
    doc = json.loads((tmp_path / "var" / "output" / "s000.jpg.json").read_text())
    assert doc["model"]["name"] == tiny_weights.name  # the new model's results


def test_a_node_added_to_the_cluster_gets_an_actor(tmp_path: Path, daemon_factory: RunDaemon, ray_head: Any) -> None:
    """Last in this file: the node it adds to the session's head is killed at the end, and Ray
    takes a while to mark it dead (an actor placed there meanwhile would die loading)."""
    config = ray_config(
        tmp_path, ray_head.address, cluster={"rescan_interval_s": 1}, pipeline={"max_batch": 2}, intake={"settle_ms": 0}
    )
    daemon = daemon_factory(config)
    assert daemon.wait_event("daemon_started")["devices"] == ["ray:cpu:0"]
    node = ray_head.add_node(num_cpus=1)
    try:
        added = daemon.wait_event("device_added", timeout_s=120)
        assert added["device"] == "ray:cpu:1" and added["devices"] == 2
        names = drop_many(tmp_path / "var" / "incoming", 16)
        finished(daemon, names)
        assert {r["device"] for r in daemon.events("image_done")} == {"ray:cpu:0", "ray:cpu:1"}
        assert daemon.stop() == 0
    finally:
        node.kill()


def test_an_empty_address_starts_a_local_ray_instance(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    pytest.importorskip("ray")
    import subprocess

    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    for i in range(3):
        photo_like(320, 240, seed=i).save(incoming / f"l{i}.jpg", quality=90)
    config = ray_config(tmp_path, "", model={"weights": str(tiny_weights)}, cluster={"connect_timeout_s": 60})
    daemon = daemon_factory(config, "--once")
    assert daemon.proc.wait(240) == 0, daemon.stderr()
    daemon.stop()
    assert daemon.events("cluster_connected")[0]["address"] == "a local Ray instance"
    assert len(daemon.events("image_done")) == 3
    # The instance was the driver's: it is gone with it (no gcs_server left in the daemon's session).
    left = subprocess.run(["pgrep", "-s", str(daemon.proc.pid), "-f", "gcs_server"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def test_the_runner_runs_a_batch_it_is_handed(tmp_path: Path) -> None:
    """What an actor does: model.Runner on the bytes of a batch (RayDevice's pack), not a slot;
    pixels give exactly the slot path's boxes, JPEG bytes the same people."""
    import mmap
    from pathlib import PurePosixPath

    import numpy as np

    from daemon import preprocess
    from daemon.cluster.device import pack
    from daemon.config import LogConfig, LogFormat
    from daemon.jobs import Job
    from daemon.messages import Batch, DeviceSpec
    from daemon.model import Runner
    from daemon.tasks.detect import Boxes

    slot = 2 * 640 * 640 * 3
    spec = DeviceSpec(
        device="cpu", weights="default", imgsz=640, precision="fp32", max_det=300, torch_threads=2,
        log=LogConfig("warning", LogFormat.JSON), slot_bytes=slot, slots=1, decode_jpegs=True, max_batch=2,
    )  # fmt: skip
    handed, slotted = Runner(spec, None), Runner(spec, mmap.mmap(-1, slot))
    photos = [assets() / "bus.jpg"]

    def boxes(runner: Runner, items: list[Any], data: Any) -> list[Any]:
        h, w = items[0].shape
        metas = [(p.gain[0], p.gain[1], p.pad[0], p.pad[1], p.width, p.height) for p in items]
        jpegs = [(p.image.nbytes, p.orientation) for p in items] if items[0].encoded_shape else None
        out, _ms = runner.run(Batch(0, 0, len(items), h, w, metas, 0.25, 0.7, jpegs), data)
        assert all(isinstance(o, Boxes) for o in out), out
        return [o.data for o in out]  # type: ignore[union-attr]

    for path in photos:
        pixels = [preprocess.prepare(Job(PurePosixPath(path.name), path), preprocess.PrepSettings(640, True, 10**9))]
        data, jpegs = pack(pixels)
        assert jpegs is None and data.shape == (1, *pixels[0].shape, 3)
        view = np.frombuffer(slotted.buffer, dtype=np.uint8, count=data.nbytes)  # type: ignore[arg-type]
        view[:] = data.reshape(-1)
        del view
        from_slot = boxes(slotted, pixels, None)[0]
        from_bytes = boxes(handed, pixels, data)[0]
        assert len(from_slot) >= 1 and np.array_equal(from_slot, from_bytes)
        settings = preprocess.PrepSettings(640, True, 10**9, device_max_bytes=32 << 20)
        encoded = [preprocess.prepare(Job(PurePosixPath(path.name), path), settings)]
        assert encoded[0].encoded_shape is not None
        data, jpegs = pack(encoded)
        decoded = boxes(handed, encoded, data)[0]
        assert len(decoded) == len(from_slot)
