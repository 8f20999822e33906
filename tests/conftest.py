"""Shared fixtures: real images, a random-init model file, and a daemon run as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

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


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """An image that compresses like a photo: smooth gradients, shapes and mild noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20, width // 4)), int(rng.integers(height // 20, height // 4))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=color)
    return image


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init yolo11n detector saved as a .pt checkpoint (fast to load, real forward passes)."""
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("weights") / "yolo11n-random.pt"
    YOLO("yolo11n.yaml").save(str(path))
    return path


def write_config(tmp: Path, **sections: dict[str, Any]) -> Path:
    """A config.toml in `tmp` with data dirs below it; `sections` override keys."""
    lines = []
    # One CPU process unless a test asks for more: pids, restarts and batches stay predictable.
    # PyTorch unless a test asks for a runtime: no export per test (test_runtimes covers them).
    merged: dict[str, dict[str, Any]] = {
        "model": {"devices": ["cpu"], "runtime": "torch"},
        "pipeline": {"cpu_workers": 1},
        "log": {"format": "json"},
    }
    for name, keys in sections.items():
        merged.setdefault(name, {}).update(keys)
    for name, keys in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in keys.items()]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """`inferd run` as a real subprocess; stdout JSON lines are collected by a reader thread."""

    def __init__(
        self, config: Path, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> None:
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr = open(config.parent / "daemon.stderr", "w+")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "daemon", "run", "--config", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=config.parent,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # kill() takes its device processes with it, even hung ones
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = {"event": "<not json>", "raw": line}
            self._queue.put(record)
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 120) -> dict[str, Any]:
        """Block until a log record matching `predicate` arrives (seen records count too)."""
        for record in self.lines:
            if predicate(record):
                return record
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching log line within {timeout_s} s; last lines: {self.raw[-5:]}")
            try:
                record = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if record is None:
                raise AssertionError(f"daemon exited ({self.proc.wait()}): {self.stderr()}\n{''.join(self.raw[-10:])}")
            self.lines.append(record)
            if predicate(record):
                return record

    def wait_event(self, event: str, timeout_s: float = 120, **fields: Any) -> dict[str, Any]:
        return self.wait_for(lambda r: r["event"] == event and all(r.get(k) == v for k, v in fields.items()), timeout_s)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.lines if r["event"] == event]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self._reader.join(timeout_s)
        while not self._queue.empty():
            record = self._queue.get()
            if record is not None:
                self.lines.append(record)
        return code

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def kill(self) -> None:
        """SIGKILL the daemon and whatever of its process group is left (a device process that
        hangs while loading never reads the pipe that would tell it its parent is gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


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


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Any]:
    """One real Ray head for the test session (`ray start --head --num-cpus 2`, no dashboard), in a
    process group of its own; tests that stop or kill a head start their own RayCluster."""
    pytest.importorskip("ray", reason="the Ray backend's tests need pip install '.[ray]'")
    from raycluster import RayCluster

    cluster = RayCluster(num_cpus=2).start()
    yield cluster
    cluster.stop()
