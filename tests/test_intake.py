"""Intake against a real directory: claim by rename, settle, filters, special files, events, backpressure."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from conftest import assets

from daemon import intake
from daemon.jobs import Capacity, FailReason, Failure, Job, Outcome

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class Rig:
    def __init__(self, tmp: Path, *, settle_s: float = 60.0, limit: int = 100) -> None:
        self.incoming, self.processing = tmp / "incoming", tmp / "processing"
        self.incoming.mkdir()
        self.processing.mkdir()
        self.capacity = Capacity(limit)
        self.jobs: asyncio.Queue[Job] = asyncio.Queue(limit)
        self.failed: asyncio.Queue[list[Outcome]] = asyncio.Queue(limit)
        settings = intake.IntakeSettings(self.incoming, self.processing, settle_s, (".tmp", ".part"), 30.0, 20, False)
        self.intake = intake.Intake(settings, self.capacity, self.jobs, self.failed)

    def drop(self, rel: str, source: Path | None = None, *, age_s: float = 3600) -> Path:
        path = self.incoming / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source or assets() / "bus.jpg", path)
        then = time.time() - age_s
        os.utime(path, (then, then))
        return path

    def jobs_now(self) -> list[str]:
        out = []
        while not self.jobs.empty():
            out.append(str(self.jobs.get_nowait().rel))
        return out


def test_scan_claims_by_rename_and_skips_hidden_and_temp(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.drop("b.jpg", age_s=100)
        rig.drop("a.jpg", age_s=200)
        rig.drop("sub/deeper/c.jpg")
        rig.drop(".hidden.jpg")
        rig.drop("upload.jpg.part")
        rig.drop(".cache/d.jpg")
        await rig.intake.scan()
        assert rig.jobs_now() == ["sub/deeper/c.jpg", "a.jpg", "b.jpg"]  # oldest first
        assert (rig.processing / "sub/deeper/c.jpg").is_file()
        assert not (rig.incoming / "a.jpg").exists()
        assert sorted(p.name for p in rig.incoming.rglob("*") if p.is_file()) == [
            ".hidden.jpg",
            "d.jpg",
            "upload.jpg.part",
        ]
        assert rig.capacity.in_flight == 3

    run(main())


def test_symlink_and_fifo_are_failed_without_being_opened(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        outside = tmp_path / "secret.jpg"
        shutil.copyfile(assets() / "bus.jpg", outside)
        (rig.incoming / "link.jpg").symlink_to(outside)
        os.mkfifo(rig.incoming / "pipe.jpg")
        await asyncio.wait_for(rig.intake.scan(), 10)  # a FIFO opened for reading would block here
        reasons = {}
        while not rig.failed.empty():
            (failure,) = rig.failed.get_nowait()
            assert isinstance(failure, Failure)
            reasons[str(failure.job.rel)] = failure.error.reason
        assert reasons == {"link.jpg": FailReason.SYMLINK, "pipe.jpg": FailReason.NOT_REGULAR}
        assert (rig.processing / "link.jpg").is_symlink() and outside.is_file()

    run(main())


def test_fresh_incomplete_file_waits_for_settle(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, settle_s=0.3)
        data = (assets() / "bus.jpg").read_bytes()
        partial = rig.incoming / "slow.jpg"
        partial.write_bytes(data[:1000])  # being written: fresh mtime, no JPEG end marker
        complete = rig.incoming / "whole.jpg"
        complete.write_bytes(data)  # fresh mtime, but ends like a whole JPEG
        await rig.intake.scan()
        assert rig.jobs_now() == ["whole.jpg"]
        assert partial.exists()
        job = await asyncio.wait_for(rig.jobs.get(), 5)  # claimed once its mtime is 0.3 s old
        assert str(job.rel) == "slow.jpg"
        await asyncio.wait_for(rig.intake.wait_settled(), 5)

    run(main())


def test_watch_claims_new_files_and_directories(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        stop = asyncio.Event()
        watcher = asyncio.create_task(rig.intake.watch(stop))
        # The watcher is live once an event arrives; keep dropping distinct files until one is seen.
        first = None
        for i in range(50):
            rig.drop(f"probe{i}.jpg")
            try:
                first = await asyncio.wait_for(rig.jobs.get(), 0.5)
                break
            except TimeoutError:
                continue
        assert first is not None
        staged = tmp_path / "staged"
        (staged / "inner").mkdir(parents=True)
        shutil.copyfile(assets() / "zidane.jpg", staged / "inner" / "z.jpg")
        os.rename(staged, rig.incoming / "batch")  # a directory moved in: its files raise no events
        seen = set()
        while "batch/inner/z.jpg" not in seen:
            seen.add(str((await asyncio.wait_for(rig.jobs.get(), 10)).rel))
        stop.set()
        await asyncio.wait_for(watcher, 10)

    run(main())


def test_capacity_bounds_claims(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, limit=2)
        for i in range(5):
            rig.drop(f"{i}.jpg", age_s=100 - i)
        scan = asyncio.create_task(rig.intake.scan())
        first = [await asyncio.wait_for(rig.jobs.get(), 5) for _ in range(2)]
        assert len(list(rig.processing.iterdir())) == 2 and not scan.done()
        rig.capacity.release()
        third = await asyncio.wait_for(rig.jobs.get(), 5)
        assert [str(j.rel) for j in [*first, third]] == ["0.jpg", "1.jpg", "2.jpg"]
        assert len(list(rig.incoming.iterdir())) == 2
        scan.cancel()

    run(main())


def test_recover_takes_up_processing_first(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        (rig.processing / "sub").mkdir()
        shutil.copyfile(assets() / "bus.jpg", rig.processing / "sub" / "left.jpg")
        assert await rig.intake.recover() == 1
        job = rig.jobs.get_nowait()
        assert str(job.rel) == "sub/left.jpg" and job.path == rig.processing / "sub" / "left.jpg"

    run(main())


@pytest.mark.parametrize(("tail", "complete"), [(b"\xff\xd9", True), (b"\x00\x00", False)])
def test_looks_complete(tmp_path: Path, tail: bytes, complete: bool) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\xff\xd8" + b"\x00" * 20 + tail)
    assert intake.looks_complete(path) is complete
