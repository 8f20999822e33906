"""Shared fixtures: real images, a random-init model file, and a daemon run as a real process.

The photo-like images and the daemon process are the bench's (bench/images.py, bench/harness.py):
the tests and the bench drive the daemon the same way."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench.harness import Daemon, toml
from bench.images import photo_like

# Before anything imports Ultralytics: no network probes, no installs, no banners, our own config dir.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(__file__).parent.parent / "var" / "test-ultralytics"))


def assets() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "assets"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init yolo11n detector saved as a .pt checkpoint (fast to load, real forward passes)."""
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("weights") / "yolo11n-random.pt"
    YOLO("yolo11n.yaml").save(str(path))
    return path


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for every bench run of the session (`inferd bench --models`): the exports and
    the measured choice are made by the first run only, as on a machine that benches twice."""
    return tmp_path_factory.mktemp("bench-models")


def oriented(tmp: Path, orientation: int) -> Path:
    """bus.jpg stored with an EXIF orientation tag (pixels as stored, the tag says how to turn them)."""
    path = tmp / f"bus-o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(assets() / "bus.jpg") as im:
        im.save(path, exif=exif, quality=95)
    return path


def free_port() -> int:
    """A TCP port free on the loopback now (or only a unique number, for a unix socket's name)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    """The status and body of a GET, an HTTP error's too."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def write_config(tmp: Path, **sections: dict[str, Any]) -> Path:
    """A config.toml in `tmp` with data dirs below it; `sections` override keys."""
    # One CPU process unless a test asks for more: pids, restarts and batches stay predictable.
    # PyTorch unless a test asks for a runtime: no export per test (test_runtimes covers them).
    merged: dict[str, dict[str, Any]] = {
        "model": {"devices": ["cpu"], "runtime": "torch"},
        "pipeline": {"cpu_workers": 1},
        "log": {"format": "json"},
    }
    for name, keys in sections.items():
        merged.setdefault(name, {}).update(keys)
    path = tmp / "config.toml"
    path.write_text(toml(merged))
    return path


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Path, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> Daemon:
        d = Daemon(config, *args, env=env, prefix=prefix)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def in_mount_namespace(path: Path, setup: str) -> tuple[str, ...]:
    """A command prefix: run the shell `setup` (with $0 = path) in a mount namespace of its own
    (`unshare -rm`: no privileges needed where user namespaces are allowed), then the command.
    The test sees those mounts through /proc/<pid>/root."""
    import shutil

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("mount namespaces are not available to this user")
    return ("unshare", "-rm", "sh", "-c", f'set -e; {setup}; exec "$@"', str(path))


@pytest.fixture(scope="session")
def task_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint per task (segment, pose, obb, classify) that finds real things: see task_models."""
    import task_models

    root = tmp_path_factory.mktemp("task-weights")
    return {task: task_models.build(task, root / f"yolov8s-{task}.pt") for task in task_models.IMGSZ}


@pytest.fixture(scope="session", autouse=True)
def ray_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every Ray process of the tests (heads, nodes, the daemons' drivers, a local instance) uses
    token authentication with a token of this session's: none reads or writes ~/.ray/auth_token,
    whose presence makes Ray 2.60 turn authentication on for a head but not for its drivers."""
    import secrets

    path = tmp_path_factory.mktemp("ray-auth") / "token"
    path.write_text(secrets.token_hex(32))
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Any]:
    """One real Ray head for the test session (`ray start --head --num-cpus 2`, no dashboard), in a
    process group of its own; tests that stop or kill a head start their own RayCluster."""
    pytest.importorskip("ray", reason="the Ray backend's tests need pip install '.[ray]'")
    from raycluster import RayCluster

    cluster = RayCluster(num_cpus=2).start()
    yield cluster
    cluster.stop()


__all__ = ["Daemon", "assets", "in_mount_namespace", "photo_like", "write_config"]
