"""The power-loss file system itself (tests/powerfs.py): what a cut keeps and what it loses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from powermount import Mount, skip_without_fuse

pytestmark = pytest.mark.powerloss


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[Mount, Path, Path]]:
    """A mount over a backing directory that already holds `old` ("A") in `dir/`."""
    skip_without_fuse()
    backing = tmp_path / "backing"
    (backing / "dir").mkdir(parents=True)
    (backing / "dir" / "old").write_bytes(b"A")
    with Mount(backing, tmp_path / "mnt") as mount:
        yield mount, mount.mountpoint, backing


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def test_data_written_but_not_fsynced_is_lost(disk: tuple[Mount, Path, Path]) -> None:
    mount, mnt, backing = disk
    write(mnt / "dir" / "old", b"B", sync=False)
    assert (mnt / "dir" / "old").read_bytes() == b"B"  # the page cache shows it
    mount.cut()
    mount.unmount()
    assert (backing / "dir" / "old").read_bytes() == b"A"


def test_a_new_file_fsynced_without_its_directory_is_lost(disk: tuple[Mount, Path, Path]) -> None:
    mount, mnt, backing = disk
    write(mnt / "dir" / "new", b"N", sync=True)
    mount.cut()
    mount.unmount()
    assert sorted(os.listdir(backing / "dir")) == ["old"]


def test_a_rename_without_a_directory_fsync_is_lost(disk: tuple[Mount, Path, Path]) -> None:
    mount, mnt, backing = disk
    (mnt / "done").mkdir()
    fsync_path(mnt)
    os.rename(mnt / "dir" / "old", mnt / "done" / "old")
    mount.cut()
    mount.unmount()
    assert os.listdir(backing / "done") == [] and (backing / "dir" / "old").read_bytes() == b"A"


def test_a_file_fsynced_and_renamed_with_its_directory_fsynced_survives(disk: tuple[Mount, Path, Path]) -> None:
    mount, mnt, backing = disk
    write(mnt / "dir" / ".new.tmp", b"N", sync=True)
    os.replace(mnt / "dir" / ".new.tmp", mnt / "dir" / "old")
    fsync_path(mnt / "dir")
    write(mnt / "dir" / "later", b"L", sync=True)  # after the sync point: lost
    mount.cut()
    mount.unmount()
    assert sorted(os.listdir(backing / "dir")) == ["old"] and (backing / "dir" / "old").read_bytes() == b"N"


def test_a_renamed_file_whose_data_was_not_fsynced_is_empty(disk: tuple[Mount, Path, Path]) -> None:
    """The classic zero-length file after a crash: the rename reached the disk, the bytes did not."""
    mount, mnt, backing = disk
    write(mnt / "dir" / ".new.tmp", b"N", sync=False)
    os.replace(mnt / "dir" / ".new.tmp", mnt / "dir" / "old")
    fsync_path(mnt / "dir")
    mount.cut()
    mount.unmount()
    assert sorted(os.listdir(backing / "dir")) == ["old"] and (backing / "dir" / "old").read_bytes() == b""


def test_an_armed_cut_fails_that_operation_and_everything_after(disk: tuple[Mount, Path, Path]) -> None:
    mount, mnt, backing = disk
    mount.arm("fsync", 2, "/dir/")
    write(mnt / "dir" / "a", b"1", sync=True)
    with pytest.raises(OSError):
        write(mnt / "dir" / "b", b"2", sync=True)  # the second fsync below dir/: the power goes
    assert mount.fired.wait(10) and mount.cut_line == "fired fsync /dir/b"
    with pytest.raises(OSError):
        os.listdir(mnt)
    mount.unmount()
    assert sorted(os.listdir(backing / "dir")) == ["old"]


def test_a_clean_unmount_keeps_everything(disk: tuple[Mount, Path, Path]) -> None:
    mount, mnt, backing = disk
    write(mnt / "dir" / "new", b"N", sync=False)
    os.link(mnt / "dir" / "new", mnt / "dir" / "link")
    os.rename(mnt / "dir" / "old", mnt / "moved")
    assert sorted(os.listdir(mnt / "dir")) == ["link", "new"]
    mount.unmount()
    assert sorted(os.listdir(backing / "dir")) == ["link", "new"]
    assert (backing / "moved").read_bytes() == b"A" and (backing / "dir" / "link").read_bytes() == b"N"


def test_reorder_keeps_some_changes_each_directory_in_order_a_rename_whole(disk: tuple[Mount, Path, Path]) -> None:
    """Mode `reorder`: unsynced directory changes survive by chance, each directory's in order,
    and a rename is atomic."""
    mount, mnt, backing = disk
    for i in range(40):
        (mnt / f"d{i}").mkdir()
    fsync_path(mnt)
    for i in range(40):
        write(mnt / f"d{i}" / "a", b"x", sync=True)
        write(mnt / f"d{i}" / "b", b"y", sync=True)
    os.rename(mnt / "dir" / "old", mnt / "moved")
    mount.cut("reorder")
    mount.unmount()
    kept = [[(backing / f"d{i}" / n).exists() for n in "ab"] for i in range(40)]
    assert 0 < sum(a for a, _ in kept) < 40  # some written back on their own, some not (seed 0)
    assert all(a or not b for a, b in kept)  # b (created after a) never without a
    assert (backing / "moved").exists() != (backing / "dir" / "old").exists()
