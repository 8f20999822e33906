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
    model = {"devices": "auto", "runtime": "auto", **sections.pop("model", {})}
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
