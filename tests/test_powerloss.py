"""Power loss, not just kill -9 (issue 22): nothing acknowledged is lost when unsynced writes vanish.

inferd runs on tests/powerfs.py, a FUSE file system that keeps only what was fsynced (and, in
`reorder` mode, some unsynced directory changes by chance) when the power is cut. A stream of
images goes through it with a cut in every round, each aimed at one kind of operation: a batch's
result writes, fsyncs and renames, its fsync of output/, its database commit, its source move, a
claim, a failure report; inferd restarts on what survived each time. The model is
bench/fake_model.py's instant detector (real NMS and real result files, no real forward pass):
what is tested is the file handling, not the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from conftest import write_config
from powermount import Mount, skip_without_fuse
from powerstream import CHECKOUT, TARGETS, Stream, check, files

from daemon import durable, intake

pytestmark = pytest.mark.powerloss


@pytest.fixture(scope="module")
def instant_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench import fake_model

    return fake_model.save(tmp_path_factory.mktemp("instant") / "instant-yolo11n.pt")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[Mount, Path, Path]]:
    """A powerfs mount (and its backing directory) with work/processing/ made as inferd makes it."""
    skip_without_fuse()
    with Mount(tmp_path / "disk", tmp_path / "mnt") as mount:
        durable.makedirs(mount.mountpoint / "work" / "processing")
        yield mount, mount.mountpoint, mount.backing


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_claim_into_a_new_subdirectory_survives_a_cut(disk: tuple[Mount, Path, Path]) -> None:
    """Regression: processing/sub/ was made by a plain mkdir, so once the producer's next fsync of
    incoming/sub/ made the claim durable, the claimed file sat in a directory the disk did not
    have: lost. Directories inferd makes are now made durably (daemon/durable.py)."""
    mount, mnt, backing = disk
    (mnt / "incoming" / "sub").mkdir(parents=True)
    (mnt / "incoming" / "sub" / "x.jpg").write_bytes(b"x")
    for path in (mnt / "incoming" / "sub" / "x.jpg", mnt / "incoming" / "sub", mnt / "incoming", mnt):
        fsync_path(path)  # acknowledged
    incoming_x, target = mnt / "incoming" / "sub" / "x.jpg", mnt / "work" / "processing" / "sub" / "x.jpg"
    intake._rename_into(incoming_x, target, mnt / "incoming", PurePosixPath("sub/x.jpg"), mnt / "work")
    fsync_path(mnt / "incoming" / "sub")  # the producer acknowledges its next file there
    mount.cut()
    mount.unmount()
    assert files(backing / "incoming") == [] and files(backing / "work" / "processing") == ["sub/x.jpg"]


def test_a_claim_by_copy_survives_the_next_fsync_of_incoming(disk: tuple[Mount, Path, Path]) -> None:
    """Regression: a claim by copy (intake.claim_by_copy, or a camera share mounted below
    incoming/) renamed the copy into processing/ and deleted the source, with no fsync between:
    the producer's next fsync of incoming/ made the deletion durable and not the copy. Across two
    filesystems no journal keeps them in order. processing/ is now fsynced before the delete."""
    mount, mnt, backing = disk
    (mnt / "incoming").mkdir()
    (mnt / "incoming" / "x.jpg").write_bytes(b"x")
    for path in (mnt / "incoming" / "x.jpg", mnt / "incoming", mnt):
        fsync_path(path)  # acknowledged
    intake._copy_into(mnt / "incoming" / "x.jpg", mnt / "work" / "processing" / "x.jpg", mnt / "work")
    fsync_path(mnt / "incoming")  # the producer acknowledges its next file
    mount.cut()
    mount.unmount()
    assert files(backing / "incoming") == [] and files(backing / "work" / "processing") == ["x.jpg"]
    assert files(backing / "work") == ["processing/x.jpg"]  # no claim temp file either


def test_makedirs_is_durable_and_os_makedirs_is_not(disk: tuple[Mount, Path, Path]) -> None:
    mount, mnt, backing = disk
    durable.makedirs(mnt / "done" / "a" / "b")
    os.makedirs(mnt / "failed" / "a" / "b")
    mount.cut()
    mount.unmount()
    assert (backing / "done" / "a" / "b").is_dir() and not (backing / "failed").exists()


def test_temp_files_of_dead_runs_are_swept(tmp_path: Path) -> None:
    """Regression: a cut can keep a temp file whose rename it took back; when its source came back
    to incoming/ (its claim was taken back too) nothing removed it. Each result directory is now
    swept on its first use in a run; a live process's temp file is kept."""
    dead = tmp_path / ".0123456789abcdef.999999999.tmp"  # no such pid
    live = tmp_path / f".0123456789abcdef.{os.getppid()}.tmp"
    other = tmp_path / ".0123456789abcdef.tmp"  # not a name inferd writes
    for path in (dead, live, other):
        path.write_bytes(b"")
    assert durable.sweep(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_what_acknowledged_means(tmp_path: Path, instant_weights: Path) -> None:
    """A file is acknowledged once its bytes and its name in incoming/ are fsynced; inferd owes
    it results. A name not fsynced may vanish at a cut; bytes not fsynced behind a synced name
    leave a torn file, which inferd fails with a reason (never results from half an image)."""
    s = stream(tmp_path, instant_weights, seed=3)
    incoming = s.var / "incoming"
    with Mount(s.disk, s.var) as mount:
        durable.makedirs(incoming)
        s.producer.send(1)  # 0000.jpg: the whole protocol
        good = (incoming / "0000.jpg").read_bytes()
        (incoming / "unsynced-bytes.jpg").write_bytes(good)
        fsync_path(incoming)  # name synced, bytes not
        (incoming / "unsynced-name.jpg").write_bytes(good)
        fsync_path(incoming / "unsynced-name.jpg")  # bytes synced, name not
        mount.cut()
        mount.unmount()
    s.finish(images=1)
    disk = s.disk
    assert files(disk / "done") == ["0000.jpg"]
    assert files(disk / "failed") == ["unsynced-bytes.jpg", "unsynced-bytes.jpg.error.json"]
    assert files(disk / "incoming") == [] and files(disk / "output") == ["0000.jpg.json", "0000.jpg.txt"]


def stream(tmp_path: Path, weights: Path, seed: int) -> Stream:
    skip_without_fuse()
    config = write_config(
        tmp_path,
        model={"weights": str(weights), "imgsz": 64},
        pipeline={"max_batch": 8},
        intake={"settle_ms": 200, "reconcile_interval_s": 1.0},
    )
    path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p)
    return Stream(tmp_path, config, {"PYTHONPATH": path}, seed=seed)


def run(s: Stream, images: int, cuts: int) -> dict[str, int]:
    started = time.monotonic()
    chunk = -(-images // cuts)
    for i in range(cuts):
        s.round(chunk, TARGETS[i % len(TARGETS)], "lose" if i % 2 == 0 else "reorder")
    s.finish(images)
    counts = check(s.disk, s.producer)
    print(f"\n{cuts} cuts over {s.producer.sent} files in {time.monotonic() - started:.0f} s: {counts}")
    print("\n".join(s.cuts))
    return counts


def test_power_cuts_in_a_stream_lose_nothing_acknowledged(tmp_path: Path, instant_weights: Path) -> None:
    counts = run(stream(tmp_path, instant_weights, seed=1), images=200, cuts=10)
    assert counts["acknowledged"] >= 150


@pytest.mark.long
@pytest.mark.timeout(7200)
def test_hundreds_of_power_cuts(tmp_path: Path, instant_weights: Path) -> None:
    counts = run(stream(tmp_path, instant_weights, seed=2), images=400, cuts=200)
    assert counts["acknowledged"] >= 300
