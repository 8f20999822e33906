"""No single file, mount or transient fault may stop the daemon (issue 10).

In-process tests drive one stage against real files, real device processes and real pipes, with
a fault injected at its edge; the end-to-end ones start `inferd` as a process in a mount
namespace of its own, or without root's permission bypass (setpriv), and send real signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import faulty_model
import numpy as np
import pytest
import uvloop
import watchfiles
from conftest import Daemon, assets, in_mount_namespace, photo_like, write_config
from test_device_faults import import_env, prepared, worker
from test_hostile import Events, Rig

from daemon import intake, local, preprocess, results
from daemon.config import OnSuccess, OutputConfig, PathsConfig
from daemon.devices import DeviceState
from daemon.jobs import FailReason, Failure, Inferred, Job, ModelInfo, Outcome, Prepared
from daemon.messages import LoadFailed
from daemon.tasks import Payload
from daemon.tasks.detect import Boxes

RunDaemon = Callable[..., Daemon]
NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search")


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        yield r


@pytest.fixture(scope="module")
def faulty_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faulty")
    return {f: faulty_model.save(folder / f"yolo11n-{f}.pt", f) for f in ("segfault", "hang_load", "die_load")}


def drop(incoming: Path, name: str, seed: int = 0) -> Path:
    """A photo written aside and renamed into place, as a producer should."""
    target = incoming / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    photo_like(320, 240, seed).save(tmp, format="JPEG")
    os.rename(tmp, target)
    return target


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def wait_until(condition: Callable[[], bool], root: Path, timeout_s: float) -> None:
    """Until `condition()` holds, checked at each change below `root` (and every second)."""
    deadline = time.monotonic() + timeout_s
    root.mkdir(parents=True, exist_ok=True)
    for _changes in watchfiles.watch(root, rust_timeout=1000, yield_on_timeout=True, debounce=50):
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s} s")


# ---------------------------------------------------------------------------------------------
# A last-resort failure per item in every stage


def test_an_unexpected_error_in_preprocessing_fails_that_image_alone(
    runner: asyncio.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = preprocess.prepare_any  # what the stage runs per image (a tiled image's tiles, or one Prepared)

    def prepare(job: Job, settings: preprocess.PrepSettings) -> Prepared | list[Prepared]:
        if job.rel.name == "odd.jpg":
            raise ZeroDivisionError("a bug met on this image")
        return real(job, settings)

    monkeypatch.setattr(preprocess, "prepare_any", prepare)
    names = ["a.jpg", "odd.jpg", "b.jpg"]
    for i, name in enumerate(names):
        photo_like(160, 120, i).save(tmp_path / name)

    async def main() -> None:
        jobs: asyncio.Queue[Job] = asyncio.Queue()
        ready: asyncio.Queue[Prepared] = asyncio.Queue()
        failed: asyncio.Queue[list[Outcome]] = asyncio.Queue()
        for name in names:
            jobs.put_nowait(Job(PurePosixPath(name), tmp_path / name))
        pool = ThreadPoolExecutor(2)
        settings = preprocess.PrepSettings(320, True, 10**9)
        stage = asyncio.create_task(preprocess.run(jobs, ready, failed, pool, lambda: settings, 4))
        try:
            (failure,) = await asyncio.wait_for(failed.get(), 30)
            done = sorted([str((await asyncio.wait_for(ready.get(), 30)).job.rel) for _ in range(2)])
            assert not stage.done(), "the stage ended"
        finally:
            stage.cancel()
            await asyncio.gather(stage, return_exceptions=True)
            pool.shutdown()
        assert isinstance(failure, Failure) and failure.job.rel.name == "odd.jpg"
        assert failure.error.reason is FailReason.INTERNAL and "ZeroDivisionError" in str(failure.error)
        assert done == ["a.jpg", "b.jpg"]

    runner.run(main())


def writer_rig(
    tmp_path: Path, finished: list[tuple[str, bool]], formats: tuple[str, ...], each: Callable[[], None] = lambda: None
) -> results.Writer:
    var = tmp_path / "var"
    paths = PathsConfig(var / "incoming", var / "output", var / "done", var / "failed", var / "work")
    for p in (paths.incoming, paths.output, paths.done, paths.failed, paths.work / "processing"):
        p.mkdir(parents=True, exist_ok=True)
    output = OutputConfig(formats, OnSuccess.MOVE, True, 3)

    def record(outcome: Outcome, written: bool) -> None:
        job = outcome.job if isinstance(outcome, Failure) else outcome.prepared.job
        reason = outcome.error.reason.value if isinstance(outcome, Failure) else "done"
        finished.append((f"{job.rel}:{reason}", written))
        each()

    return results.Writer(paths, output, record)


def inferred(writer: results.Writer, name: str) -> Inferred:
    path = writer.paths.work / "processing" / name
    shutil.copyfile(assets() / "bus.jpg", path)
    p = preprocess.prepare(Job(PurePosixPath(name), path), preprocess.PrepSettings(320, True, 10**9))
    boxes = Boxes(np.array([[10, 20, 300, 400, 0.9, 0]], np.float32))
    return Inferred(p, boxes, "cpu", 1, ModelInfo("w.pt", {0: "person"}, 320, False))


def test_an_unexpected_error_while_writing_fails_that_image_alone(
    runner: asyncio.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[tuple[str, bool]] = []
    both = asyncio.Event()
    writer = writer_rig(tmp_path, finished, ("txt", "json"), lambda: len(finished) == 2 and both.set())
    real = results.Writer._json

    def broken(self: results.Writer, result: Inferred, annotation_error: str | None) -> bytes:
        if result.prepared.job.rel.name == "odd.jpg":
            raise KeyError("a bug met on this image")
        return real(self, result, annotation_error)

    monkeypatch.setattr(results.Writer, "_json", broken)
    outcomes: asyncio.Queue[list[Outcome]] = asyncio.Queue()
    outcomes.put_nowait([inferred(writer, name) for name in ("odd.jpg", "b.jpg")])  # one batch

    async def main() -> None:
        stage = asyncio.create_task(results.run(outcomes, writer, concurrency=1))
        waiter = asyncio.ensure_future(both.wait())
        try:
            await asyncio.wait([stage, waiter], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            assert not stage.done(), stage.exception()  # before: the KeyError ended the stage
        finally:
            waiter.cancel()
            stage.cancel()
            await asyncio.gather(stage, return_exceptions=True)

    runner.run(main())
    assert sorted(finished) == [("b.jpg:done", True), ("odd.jpg:internal_error", True)]
    report = json.loads((writer.paths.failed / "odd.jpg.error.json").read_text())
    assert report["reason"] == "internal_error" and "KeyError" in report["message"]
    assert writer.write_errors == 0  # a bug is not a disk error: no retries
    assert (writer.paths.done / "b.jpg").exists() and (writer.paths.failed / "odd.jpg").exists()


def test_an_annotation_that_cannot_be_drawn_is_not_a_disk_error(
    runner: asyncio.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def annotate(source: Path, payload: Payload, names: dict[int, str]) -> bytes:
        raise OSError("broken data stream when reading image file")  # what PIL raises: an OSError, no errno

    monkeypatch.setattr(results, "annotate", annotate)
    finished: list[tuple[str, bool]] = []
    writer = writer_rig(tmp_path, finished, ("txt", "json", "image"))
    runner.run(writer.write(inferred(writer, "a.jpg")))
    assert finished == [("a.jpg:done", True)]
    assert writer.write_errors == 0  # before: retried as a full disk for ~2 minutes, then write_error
    document = json.loads((writer.paths.output / "a.jpg.json").read_text())
    assert "broken data stream" in document["annotation_error"] and len(document["detections"]) == 1
    assert files(writer.paths.output) == ["a.jpg.json", "a.jpg.txt"]


# ---------------------------------------------------------------------------------------------
# Intake: a claim the drain interrupts, a claim that fails


def test_a_claim_cut_short_by_the_drain_still_reaches_the_pipeline(
    runner: asyncio.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = intake._rename_into

    def slow_rename(*args: Any) -> tuple[int, bool]:
        entered.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(intake, "_rename_into", slow_rename)

    async def main() -> None:
        rig = Rig(tmp_path)
        rig.drop("a.jpg")
        scan = asyncio.create_task(rig.intake.scan())
        await asyncio.to_thread(entered.wait, 30)  # the rename runs in its thread
        scan.cancel()  # what the drain does to the feeders
        await asyncio.gather(scan, return_exceptions=True)
        release.set()
        job = await asyncio.wait_for(rig.jobs.get(), 30)  # before: moved to processing/, never queued
        assert job.rel == PurePosixPath("a.jpg") and job.path.exists()
        assert rig.capacity.in_flight == 1  # its slot went on with it, and only it

    runner.run(main())


def test_a_claim_that_fails_releases_its_slot_and_is_reported_once_per_directory(
    runner: asyncio.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events()
    monkeypatch.setattr(intake, "log", events)

    def read_only(*args: Any) -> tuple[int, bool]:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(intake, "_rename_into", read_only)

    async def main() -> None:
        rig = Rig(tmp_path, limit=2)
        for name in ("cam/a.jpg", "cam/b.jpg", "cam/c.jpg"):
            rig.drop(name)
        assert await rig.intake.scan() == 3  # before: the OSError escaped and ended the intake
        assert rig.capacity.in_flight == 0 and rig.jobs.empty()
        assert events.count("claim_failed") == 1
        await rig.intake.scan()  # a persisting fault is reported again at the next scan, once
        assert events.count("claim_failed") == 2
        record = dict(events.records)["claim_failed"]
        assert record["errno"] == "EROFS" and record["directory"] == "cam"

    runner.run(main())
    assert sorted(files(tmp_path / "incoming")) == ["cam/a.jpg", "cam/b.jpg", "cam/c.jpg"]  # nothing lost


# ---------------------------------------------------------------------------------------------
# Device workers: replies after a cancel, a process that answered ERROR, slots after a crash


class TappedPipe:
    """The parent's end of a device pipe that says when a batch has gone out."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sent = asyncio.Event()

    def send(self, message: object) -> None:
        self.conn.send(message)
        if message is not None:
            self.sent.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_reply_for_a_batch_whose_caller_gave_up_is_ignored(
    runner: asyncio.Runner, tmp_path: Path, tiny_weights: Path
) -> None:
    w = worker(tiny_weights)
    image = prepared(tmp_path, "n.jpg")

    async def main() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        await w.start(120)
        try:
            tap = TappedPipe(w._conn)
            w._conn = tap  # type: ignore[assignment]
            abandoned = asyncio.create_task(w.infer([image], 0.25, 0.7))
            await asyncio.wait_for(tap.sent.wait(), 30)
            abandoned.cancel()  # a drain that timed out cancels the stage awaiting it
            await asyncio.gather(abandoned, return_exceptions=True)
            boxes, _ = await asyncio.wait_for(w.infer([image], 0.25, 0.7), 60)  # answered after the first
            assert not isinstance(boxes[0], str) and w.up  # a payload, not a decode error
        finally:
            await w.stop(10)
        assert errors == []  # before: InvalidStateError in the pipe's reader callback

    runner.run(main())


def test_a_worker_that_answered_error_takes_no_batch(runner: asyncio.Runner) -> None:
    class Pipe:
        def recv(self) -> LoadFailed:
            return LoadFailed("FileNotFoundError: gone.pt", True)

    async def main() -> None:
        w = worker(Path("gone.pt"))
        w._conn = Pipe()  # type: ignore[assignment]
        w._ready = asyncio.get_running_loop().create_future()
        w.state = DeviceState.STARTING
        w._on_message()  # ERROR has arrived; the process has not exited yet
        assert not w.up  # before: "up" from the ERROR until its exit was seen, so batches went to it
        with pytest.raises(local.DeviceStartError) as failed:
            await w._ready
        assert failed.value.permanent

    runner.run(main())


@pytest.mark.usefixtures("child_imports")
def test_slots_come_back_exactly_once_after_a_crash(
    runner: asyncio.Runner, tmp_path: Path, faulty_weights: dict[str, Path]
) -> None:
    w = worker(faulty_weights["segfault"])
    marker, normal = prepared(tmp_path, "m.jpg", marker=True), prepared(tmp_path, "n.jpg")

    async def main() -> None:
        await w.start(120)
        try:
            await w.infer([normal], 0.25, 0.7)  # slot 0 used and back: the next batch takes slot 1
            with pytest.raises(local.DeviceCrashed):
                await asyncio.wait_for(w.infer([marker], 0.25, 0.7), 60)
            free = [w._free.get_nowait() for _ in range(w._free.qsize())]
            assert sorted(free) == [0, 1]  # before: [0, 0]
        finally:
            await w.stop(0)

    runner.run(main())


@pytest.fixture
def child_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in import_env().items():
        monkeypatch.setenv(key, value)


# ---------------------------------------------------------------------------------------------
# End to end: mounts, permissions, signals during start-up, exit statuses, /dev/shm, reload, stdout


@pytest.mark.slow
def test_a_mount_below_incoming_is_claimed_by_copy(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    var = tmp_path / "var"
    camera = var / "incoming" / "cam1"
    camera.mkdir(parents=True)
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "imgsz": 64}, intake={"settle_ms": 100})
    daemon = daemon_factory(config, prefix=in_mount_namespace(camera, 'mount -t tmpfs -o size=16m tmpfs "$0"'))
    daemon.wait_event("daemon_started")
    seen = Path(f"/proc/{daemon.proc.pid}/root") / camera.relative_to("/")  # the share, as the daemon sees it
    assert os.stat(seen).st_dev != os.stat(var / "work").st_dev
    drop(seen, "a.jpg")
    drop(var / "incoming", "b.jpg", seed=1)
    daemon.wait_event("image_done", path="cam1/a.jpg")  # before: EXDEV ended the daemon (exit 1)
    daemon.wait_event("image_done", path="b.jpg")
    assert daemon.wait_event("claimed_by_copy")["directory"] == "cam1"
    drop(seen, "c.jpg", seed=2)
    daemon.wait_event("image_done", path="cam1/c.jpg")
    assert len(daemon.events("claimed_by_copy")) == 1  # once per directory
    assert list(seen.iterdir()) == []  # the share's files were taken
    assert daemon.stop() == 0
    assert files(var / "done") == ["b.jpg", "cam1/a.jpg", "cam1/c.jpg"]


@pytest.mark.slow
def test_unwritable_and_unreadable_subfolders_are_reported_and_wait(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to run the daemon without root's permission bypass")
    var = tmp_path / "var"
    locked, secret = var / "incoming" / "locked", var / "incoming" / "secret"
    drop(locked, "a.jpg")
    drop(secret, "s.jpg", seed=1)
    locked.chmod(0o555)  # its files cannot be moved out
    secret.chmod(0o000)  # it cannot even be listed
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "imgsz": 64},
        intake={"settle_ms": 100, "reconcile_interval_s": 0.5},
    )
    try:
        daemon = daemon_factory(config, prefix=NO_DAC)
        failed = daemon.wait_event("claim_failed")  # before: the daemon exited 1 here
        assert (failed["path"], failed["errno"]) == ("locked/a.jpg", "EACCES")
        assert daemon.wait_event("directory_unreadable")["path"] == str(secret)  # before: skipped silently
        drop(var / "incoming", "b.jpg", seed=2)
        daemon.wait_event("image_done", path="b.jpg")  # still serving
        secret.chmod(0o755)
        locked.chmod(0o755)
        daemon.wait_event("directory_readable", path=str(secret))
        daemon.wait_event("image_done", path="secret/s.jpg")
        daemon.wait_event("image_done", path="locked/a.jpg")
        assert daemon.stop() == 0
    finally:
        secret.chmod(0o755)
        locked.chmod(0o755)
    assert len(daemon.events("directory_unreadable")) == 1  # when it became unreadable, not at every scan


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (the daemon's children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes():
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sigterm_during_start_up_stops_at_once_and_leaves_no_child(
    tmp_path: Path, daemon_factory: RunDaemon, faulty_weights: dict[str, Path]
) -> None:
    marker = uuid.uuid4().hex
    config = write_config(
        tmp_path,
        model={"weights": str(faulty_weights["hang_load"])},
        pipeline={"worker_start_timeout_s": 3600.0, "cpu_workers": 2},
    )
    daemon = daemon_factory(config, env={**import_env(), "INFERD_TEST_RUN": marker})
    daemon.wait_event("workers_starting")
    assert daemon.stop(signal.SIGTERM, timeout_s=60) == 0  # before: only after worker_start_timeout_s
    assert daemon.events("daemon_stopped")[0]["during"] == "start-up"
    assert daemon.events("start_abandoned")
    assert processes_with(marker) == []  # no device process left loading


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "timeout_s", "status", "says"),
    [
        ("die_load", 120.0, 1, "process exited during start"),  # transient: systemd restarts it
        ("hang_load", 2.0, 1, "model not ready after 2 s"),
        ("missing", 120.0, 78, "No such file"),  # can never work: exit 78, never restarted
    ],
)
def test_only_a_start_that_can_never_work_exits_78(
    tmp_path: Path, faulty_weights: dict[str, Path], fault: str, timeout_s: float, status: int, says: str
) -> None:
    weights = str(tmp_path / "missing.pt") if fault == "missing" else str(faulty_weights[fault])
    config = write_config(tmp_path, model={"weights": weights}, pipeline={"worker_start_timeout_s": timeout_s})
    env = {**os.environ, **import_env()}
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == status, proc.stderr
    assert says in proc.stderr


@pytest.mark.slow
def test_a_dev_shm_too_small_stops_the_start_with_the_size_needed(tmp_path: Path, tiny_weights: Path) -> None:
    config = write_config(tmp_path, model={"weights": str(tiny_weights)})
    command = [
        *in_mount_namespace(Path("/dev/shm"), 'mount -t tmpfs -o size=1m tmpfs "$0"'),
        *(sys.executable, "-m", "daemon", "run", "--config", str(config)),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 78, proc.stderr  # before: SIGBUS in the middle of the first copy
    assert "--shm-size" in proc.stderr and "MiB" in proc.stderr and "pipeline.max_batch" in proc.stderr


@pytest.mark.slow
def test_a_restart_that_finds_no_room_for_its_slots_retries_until_there_is(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "imgsz": 64}, intake={"settle_ms": 100})
    shm = Path("/dev/shm")
    daemon = daemon_factory(config, prefix=in_mount_namespace(shm, 'mount -t tmpfs -o size=4m tmpfs "$0"'))
    pid = daemon.wait_event("daemon_started")["pids"][0]
    seen = Path(f"/proc/{daemon.proc.pid}/root") / shm.relative_to("/")
    filler = seen / "filler"
    os.kill(pid, signal.SIGKILL)
    daemon.wait_event("worker_exited")  # its slots are unmapped: now take every page that is left
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    failed = daemon.wait_event("worker_restart_failed")  # before: the OSError ended supervision and the daemon
    assert "--shm-size" in failed["error"]
    filler.unlink()
    daemon.wait_event("worker_restarted")
    drop(tmp_path / "var" / "incoming", "a.jpg")
    daemon.wait_event("image_done", path="a.jpg")
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_reload_starts_the_stats_line_and_reaches_the_workers_log_level(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "imgsz": 64},
        intake={"settle_ms": 100},
        log={"format": "json", "stats_interval_s": 0.0},
    )
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    config.write_text(config.read_text().replace("stats_interval_s = 0.0", 'stats_interval_s = 0.2\nlevel = "debug"'))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("reload_done")
    daemon.wait_event("stats")  # before: an interval of 0 at start kept the stats line off for good
    drop(tmp_path / "var" / "incoming", "a.jpg")
    daemon.wait_event("image_done", path="a.jpg")
    batch = daemon.wait_event("batch_done")  # before: the device processes kept logging at info
    assert batch["process"] == "worker:cpu" and batch["images"] == 1
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_stdout_nobody_reads_does_not_stall_the_pipeline(tmp_path: Path, tiny_weights: Path) -> None:
    """Logging waits for stdout only once its backlog is full, not at every line."""
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "imgsz": 64}, intake={"settle_ms": 100})
    incoming, done = tmp_path / "var" / "incoming", tmp_path / "var" / "done"
    names = [f"{i:02}.jpg" for i in range(30)]
    for i, name in enumerate(names):
        drop(incoming, name, seed=i)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: ~10 log lines fill it
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        stdout=write_end,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    os.close(write_end)
    try:
        # Nobody reads the log meanwhile: done/ is the only sign of progress.
        wait_until(lambda: len(files(done)) == len(names) or proc.poll() is not None, done, timeout_s=240)
        assert files(done) == names  # before: the event loop blocked on its ~11th log line
    finally:
        proc.send_signal(signal.SIGTERM)
        with os.fdopen(read_end, "rb") as log:
            lines = log.read().splitlines()  # read now: the daemon writes its backlog, then exits
        assert proc.wait(60) == 0
    events = [json.loads(line)["event"] for line in lines]
    assert events.count("image_done") == len(names) and events[-1] == "daemon_stopped"  # nothing dropped
