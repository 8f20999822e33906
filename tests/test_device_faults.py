"""Faults inside the device process: a model call that segfaults, one that raises, out of memory.

The model is a real yolo11n (random weights) whose forward pass misbehaves on purpose
(tests/faulty_model.py): on a pure-red *marker* image it segfaults or raises, or it runs out
of memory on any batch of more than one image. The daemon must re-queue what was in flight,
restart the worker with backoff, quarantine a poison file after `max_attempts` crashes, and
retry an out-of-memory batch image by image, all while it keeps serving the other files.
Below the end-to-end tests, the same faults one level down: what a LocalDevice reports, and
how the Batcher spreads and counts the batches it hands out.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import faulty_model
import numpy as np
import pytest
import uvloop
from conftest import Daemon, photo_like, write_config

from daemon import preprocess
from daemon.batching import Batcher, Knobs
from daemon.config import LogConfig, LogFormat
from daemon.fleet import RESTART_BACKOFF_S
from daemon.jobs import Job, Prepared
from daemon.local import BatchFailed, DeviceCrashed, LocalDevice
from daemon.messages import DeviceSpec
from daemon.tasks.detect import Boxes

RunDaemon = Callable[..., Daemon]
TESTS = Path(__file__).parent
SEGV = -signal.SIGSEGV  # a child killed by a signal reports minus its number


@pytest.fixture(scope="module")
def faulty_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faulty")
    return {fault: faulty_model.save(folder / f"yolo11n-{fault}.pt", fault) for fault in faulty_model.FAULTS}


def import_env() -> dict[str, str]:
    """The daemon and its device processes unpickle faulty_model.FaultyDetectionModel by name."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "YOLO_AUTOINSTALL": "false"}  # a missing module must fail, never pip install


def images(incoming: Path, names: list[str], *, marker: str | None = None, marker_at: int = 0) -> None:
    """Photos in incoming/, oldest first in the order given, the marker (if any) at index `marker_at`.

    The daemon takes the oldest first, alone (the worker is idle); the next ones arrive while it
    computes, so they are batched behind it.
    """
    incoming.mkdir(parents=True, exist_ok=True)
    order = [*names]
    if marker:
        faulty_model.marker_image(320, 240).save(incoming / marker, quality=95)
        order.insert(marker_at, marker)
    for i, name in enumerate(names):
        photo_like(320, 240, seed=i).save(incoming / name, quality=90)
    for age, name in enumerate(reversed(order)):
        os.utime(incoming / name, (1e9 - age, 1e9 - age))


def drop(incoming: Path, name: str, seed: int) -> None:
    """Write under a hidden name, then rename into place, as a well-behaved producer does."""
    tmp = incoming / f".{name}.uploading"
    photo_like(320, 240, seed=seed).save(tmp, format="JPEG", quality=90)
    os.rename(tmp, incoming / name)


FINISHED = ("image_done", "image_failed")


def finished(daemon: Daemon) -> list[dict[str, object]]:
    return [r for r in daemon.lines if r["event"] in FINISHED]


def error_report(var: Path, name: str) -> dict[str, object]:
    report: dict[str, object] = json.loads((var / "failed" / f"{name}.error.json").read_text())
    return report


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def assert_done(var: Path, names: list[str]) -> list[int]:
    """Every name is in done/ with a complete JSON result; returns each result's batch size."""
    assert files(var / "done") == sorted(names)
    sizes = []
    for name in names:
        doc = json.loads((var / "output" / f"{name}.json").read_text())
        assert doc["source"] == name
        sizes.append(doc["batch_size"])
    return sizes


@pytest.mark.slow
def test_a_poison_file_is_quarantined_after_max_attempts_and_the_daemon_keeps_serving(
    tmp_path: Path, daemon_factory: RunDaemon, faulty_weights: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(faulty_weights["segfault"]), "devices": ["cpu"]},
        pipeline={"max_attempts": 3, "max_batch": 4, "max_wait_ms": 2000},
        intake={"settle_ms": 200},
        log={"format": "json", "level": "debug"},  # batch_sent
    )
    var = tmp_path / "var"
    normal = [f"img{i}.jpg" for i in range(7)]
    stage = tmp_path / "stage"
    images(stage, normal, marker="marker.jpg")
    daemon = daemon_factory(config, env=import_env())
    pid = daemon.wait_event("daemon_started")["pids"][0]
    # Frozen, the device takes the marker and cannot crash on it before a batch is queued behind it.
    os.kill(pid, signal.SIGSTOP)
    os.rename(stage / "marker.jpg", var / "incoming" / "marker.jpg")
    daemon.wait_event("batch_sent", images=1)
    for name in normal:
        os.rename(stage / name, var / "incoming" / name)
    daemon.wait_event("batch_sent", in_flight=2)
    os.kill(pid, signal.SIGCONT)
    daemon.wait_for(lambda r: r["event"] in FINISHED and len(finished(daemon)) == 8, timeout_s=240)
    assert [(r["path"], r["reason"]) for r in daemon.events("image_failed")] == [
        ("marker.jpg", "worker_crashed_repeatedly")
    ]
    daemon.wait_event("worker_restarted", restarts=3, timeout_s=120)

    drop(var / "incoming", "after.jpg", seed=99)  # still serving
    assert daemon.wait_event("image_done", path="after.jpg", timeout_s=120)["batch"] == 1
    assert daemon.stop(signal.SIGTERM) == 0

    report = error_report(var, "marker.jpg")
    assert report["reason"] == "worker_crashed_repeatedly" and report["attempts"] == 3
    assert files(var / "failed") == ["marker.jpg", "marker.jpg.error.json"]
    assert_done(var, [*normal, "after.jpg"])
    assert len(daemon.events("worker_exited")) == 3  # max_attempts, never more: no crash loop
    crashes = daemon.events("worker_crashed")  # one per failed batch: the running one, maybe one queued
    assert len([c for c in crashes if c["started"]]) == 3, crashes
    assert any(not c["started"] for c in crashes), crashes  # the batch queued behind the marker
    assert all(f"exited with code {SEGV}" in c["error"] for c in crashes), crashes  # a real segfault
    assert [r["restarts"] for r in daemon.events("worker_restarted")] == [1, 2, 3]
    assert all(r["restart_in_s"] >= RESTART_BACKOFF_S[0] for r in daemon.events("worker_exited"))
    assert (daemon.events("daemon_stopped")[0]["done"], daemon.events("daemon_stopped")[0]["failed"]) == (8, 1)


@pytest.mark.slow
def test_a_model_error_fails_only_its_image_after_a_retry_alone(
    tmp_path: Path, daemon_factory: RunDaemon, faulty_weights: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(faulty_weights["raise"]), "devices": ["cpu"]},
        pipeline={"max_batch": 4, "max_wait_ms": 2000},
    )
    var = tmp_path / "var"
    normal = [f"img{i}.jpg" for i in range(7)]
    images(var / "incoming", normal, marker="marker.jpg", marker_at=2)  # batched behind the first
    daemon = daemon_factory(config, "--once", env=import_env())
    assert daemon.proc.wait(240) == 0, daemon.stderr()
    daemon.stop()

    report = error_report(var, "marker.jpg")
    assert report["reason"] == "inference_error" and "marker image" in str(report["message"])
    assert files(var / "failed") == ["marker.jpg", "marker.jpg.error.json"]
    assert_done(var, normal)
    failures = daemon.events("batch_failed")
    assert [(f["kind"], f["size"] > 1) for f in failures] == [("error", True), ("error", False)], failures
    assert report["attempts"] == 2  # failed in a batch, then failed alone: only then filed
    assert not daemon.events("worker_crashed") and not daemon.events("worker_exited")


@pytest.mark.slow
def test_out_of_memory_on_a_batch_retries_its_images_singly(
    tmp_path: Path, daemon_factory: RunDaemon, faulty_weights: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(faulty_weights["oom"]), "devices": ["cpu"]},
        pipeline={"max_batch": 4, "max_wait_ms": 2000},
    )
    var = tmp_path / "var"
    names = [f"img{i}.jpg" for i in range(8)]
    images(var / "incoming", names)
    daemon = daemon_factory(config, "--once", env=import_env())
    assert daemon.proc.wait(240) == 0, daemon.stderr()
    daemon.stop()

    failures = daemon.events("batch_failed")
    assert failures, "no batch of more than one image formed: the test proves nothing"
    assert all(f["kind"] == "oom" and f["size"] > 1 for f in failures)
    assert files(var / "failed") == []
    assert assert_done(var, names) == [1] * len(names)  # every image succeeded alone
    assert not daemon.events("image_failed") and not daemon.events("worker_exited")


# The device worker on its own: what the batcher is told when a process dies or a batch fails.


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        yield r


def prepared(tmp_path: Path, name: str, *, marker: bool = False, seed: int = 0) -> Prepared:
    path = tmp_path / name
    (faulty_model.marker_image(320, 240) if marker else photo_like(320, 240, seed=seed)).save(path, quality=95)
    return preprocess.prepare(Job(PurePosixPath(name), path), preprocess.PrepSettings(640, True, 10**9))


def worker(weights: Path) -> LocalDevice:
    spec = DeviceSpec(
        device="cpu",
        weights=str(weights),
        imgsz=640,
        precision="auto",
        max_det=300,
        torch_threads=1,
        log=LogConfig("warning", LogFormat.JSON),
    )
    return LocalDevice(spec, max_batch=4)


@pytest.fixture
def child_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in import_env().items():
        monkeypatch.setenv(key, value)


@pytest.mark.usefixtures("child_imports")
def test_a_segfault_fails_the_running_batch_as_started_and_the_queued_one_as_not(
    runner: asyncio.Runner, tmp_path: Path, faulty_weights: dict[str, Path]
) -> None:
    w = worker(faulty_weights["segfault"])
    marker, normal = prepared(tmp_path, "m.jpg", marker=True), prepared(tmp_path, "n.jpg")

    async def main() -> None:
        await w.start(120)
        try:
            boxes, _ = await w.infer([normal], 0.25, 0.7)  # the marker detector leaves others alone
            assert isinstance(boxes[0], Boxes)
            sent = w._conn.send  # the first batch must be in the pipe before the second is given
            went = asyncio.Event()

            def send(message: object) -> None:
                sent(message)  # type: ignore[arg-type]
                went.set()

            w._conn.send = send  # type: ignore[method-assign,union-attr]
            running = asyncio.create_task(w.infer([marker, normal], 0.25, 0.7))
            await asyncio.wait_for(went.wait(), 30)
            queued = asyncio.create_task(w.infer([normal], 0.25, 0.7))  # the second slot
            results = await asyncio.wait_for(asyncio.gather(running, queued, return_exceptions=True), 60)
            assert all(isinstance(r, DeviceCrashed) for r in results), results
            crashed, bystander = results
            assert isinstance(crashed, DeviceCrashed) and isinstance(bystander, DeviceCrashed)
            assert crashed.started and f"code {SEGV}" in str(crashed)
            assert not bystander.started  # it never reached the model: it must not count as an attempt
            assert not w.up
        finally:
            await w.stop(0)

    runner.run(main())


@pytest.mark.usefixtures("child_imports")
def test_a_raising_model_fails_the_batch_and_the_worker_stays_up(
    runner: asyncio.Runner, tmp_path: Path, faulty_weights: dict[str, Path]
) -> None:
    w = worker(faulty_weights["raise"])
    marker, normal = prepared(tmp_path, "m.jpg", marker=True), prepared(tmp_path, "n.jpg")

    async def main() -> None:
        await w.start(120)
        try:
            with pytest.raises(BatchFailed, match="marker image") as failed:
                await w.infer([normal, marker], 0.25, 0.7)
            assert failed.value.kind == "error" and w.up
            boxes, _ = await w.infer([normal], 0.25, 0.7)
            assert isinstance(boxes[0], Boxes)
        finally:
            await w.stop(10)

    runner.run(main())


def test_a_batch_sent_to_a_process_that_just_died_is_a_crash_it_did_not_cause(
    runner: asyncio.Runner, tmp_path: Path, tiny_weights: Path
) -> None:
    w = worker(tiny_weights)
    normal = prepared(tmp_path, "n.jpg")

    async def main() -> None:
        await w.start(120)
        try:
            assert w.pid is not None
            os.kill(w.pid, signal.SIGKILL)
            # Block the loop on purpose until the process is dead (not reaped): the loop must not see the EOF.
            os.waitid(os.P_PID, w.pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
            assert w.up
            with pytest.raises(DeviceCrashed) as crashed:  # not BrokenPipeError, which would stop the batcher
                await w.infer([normal], 0.25, 0.7)
            assert not crashed.value.started
        finally:
            await w.stop(10)

    runner.run(main())


# The batcher's side: how many batches a worker holds counts from the moment one is given to it.


class HeldWorker:
    """The batcher's edge: a device that records each batch and holds it until released."""

    def __init__(self, device: str, calls: asyncio.Queue[tuple[str, int]]) -> None:
        self.device = device
        self.up = True
        self.slots = 2
        self.max_batch = 4
        self.slot_bytes = 4 * 640 * 640 * 3
        self.in_flight = 0  # what the batcher read before it kept its own count
        self.calls = calls
        self.release = asyncio.Event()

    async def infer(self, batch: list[Prepared], conf: float, iou: float) -> tuple[list[Boxes], float]:
        self.in_flight += 1  # as the real worker: counted once its batch is sent
        self.calls.put_nowait((self.device, len(batch)))
        await self.release.wait()
        self.in_flight -= 1
        return [Boxes(np.zeros((0, 6), np.float32)) for _ in batch], 1.0


def test_a_backlog_is_spread_over_idle_workers(runner: asyncio.Runner) -> None:
    async def main() -> None:
        calls: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        workers = [HeldWorker("a", calls), HeldWorker("b", calls)]
        ready: asyncio.Queue[Prepared] = asyncio.Queue()
        for i in range(8):
            job = Job(PurePosixPath(f"{i}.jpg"), Path(f"{i}.jpg"))
            image = np.zeros((480, 640, 3), np.uint8)
            ready.put_nowait(Prepared(job, image, 640, 480, 1, (1.0, 1.0), (0, 0), time.monotonic()))
        batcher = Batcher(ready, workers, asyncio.Queue(), Knobs(4, 10_000, 0.25, 0.7, 3))
        task = asyncio.create_task(batcher.run())
        try:
            sent = [await asyncio.wait_for(calls.get(), 10) for _ in range(2)]
            assert sorted(sent) == [("a", 4), ("b", 4)]  # not both on "a", with "b" idle
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    runner.run(main())
