"""Hostile and odd input: every case gets a clear reason, nothing is lost, the daemon keeps serving.

The corpus runs through `inferd run` as a real process; intake races and preprocessing corner
cases that need exact control are driven in-process against real files.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import stat
import struct
import time
import zlib
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import pytest
import uvloop
from conftest import Daemon, assets, photo_like, write_config
from PIL import Image

from daemon import intake, preprocess
from daemon.jobs import Capacity, FailReason, Failure, ItemError, Job, Outcome, Prepared

T = TypeVar("T")

RunDaemon = Callable[..., Daemon]
DONE = "done"


# ---------------------------------------------------------------------------------------------
# Helpers


def drop(incoming: Path, rel: str, data: bytes) -> Path:
    """Write under a hidden name, then rename into place, as a well-behaved producer does."""
    target = incoming / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".drop.uploading")
    tmp.write_bytes(data)
    os.rename(tmp, target)
    return target


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def write_raw(path: bytes, data: bytes) -> None:
    """Write a file whose name is given as bytes (it need not be UTF-8)."""
    with open(path, "wb") as f:
        f.write(data)


def entries(root: Path) -> list[str]:
    """Every entry below root that is not a directory (symlinks and FIFOs included), never followed."""
    found, stack = [], [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    found.append(str(Path(entry.path).relative_to(root)))
    return sorted(found)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG written byte by byte, for what PIL cannot write (16-bit RGB) or will not (a bomb)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def rgb16_png(width: int, height: int, seed: int) -> bytes:
    wide = np.asarray(photo_like(width, height, seed), dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + wide[y].astype(">u2").tobytes() for y in range(height))
    return raw_png(width, height, 16, 2, rows)


def exif_orientation_as_text() -> bytes:
    """An EXIF block whose Orientation tag is the ASCII string "x" instead of a SHORT 1..8."""
    entry = struct.pack(">HHI", 0x0112, 2, 2) + b"x\x00\x00\x00"
    return b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + entry + b"\x00" * 4


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return encode(photo_like(400, 200, seed=11), "JPEG", exif=exif)


def nth(n: int, event: str, path: str) -> Callable[[dict[str, Any]], bool]:
    """A wait_for predicate true at the n-th `event` for `path`."""
    seen = 0

    def match(record: dict[str, Any]) -> bool:
        nonlocal seen
        if record["event"] == event and record.get("path") == path:
            seen += 1
        return seen >= n

    return match


def outcome(daemon: Daemon, rel: str, timeout_s: float = 120) -> dict[str, Any]:
    return daemon.wait_for(lambda r: r["event"] in ("image_done", "image_failed") and r.get("path") == rel, timeout_s)


# ---------------------------------------------------------------------------------------------
# The corpus: one daemon, every case with its expected outcome


@dataclass(frozen=True, slots=True)
class Case:
    rel: str
    expect: str  # DONE, or the failure reason
    size: tuple[int, int] | None = None  # (width, height) the JSON must report


def corpus(tmp: Path, incoming: Path) -> list[Case]:
    """Create every hostile input in incoming/ (the FIFO first) and say what must become of it."""
    cases: list[Case] = []

    def add(rel: str, data: bytes, expect: str, size: tuple[int, int] | None = None) -> None:
        drop(incoming, rel, data)
        cases.append(Case(rel, expect, size))

    os.mkfifo(incoming / "x.jpg")  # a reader that opened this would block until a writer came
    cases.append(Case("x.jpg", "not_regular_file"))

    photo = photo_like(320, 240, seed=1)
    jpeg = encode(photo, "JPEG", quality=90)
    add("empty.jpg", b"", "not_an_image")
    add("truncated.jpg", jpeg[: len(jpeg) // 2], "not_an_image")
    add("text.jpg", b"GET / HTTP/1.1\r\nHost: example\r\n\r\nnot a picture\n", "not_an_image")
    add("random.heic", np.random.default_rng(5).bytes(4096), "not_an_image")
    add("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"><rect/></svg>', "not_an_image")

    for fmt, suffix in [("PNG", "png"), ("TIFF", "tiff"), ("WEBP", "webp"), ("BMP", "bmp"), ("GIF", "gif")]:
        add(f"formats/photo.{suffix}", encode(photo, fmt), DONE, (320, 240))
    frames = [photo_like(160, 120, seed=s) for s in range(3)]
    add(
        "formats/animated.gif",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0),
        DONE,
        (160, 120),
    )

    grey16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    add("modes/grey16.png", encode(Image.fromarray(grey16), "PNG"), DONE, (320, 240))
    add("modes/rgb16.png", rgb16_png(96, 64, seed=2), DONE, (96, 64))
    add("modes/cmyk.jpg", encode(photo.convert("CMYK"), "JPEG"), DONE, (320, 240))
    add("modes/grey.jpg", encode(photo.convert("L"), "JPEG"), DONE, (320, 240))
    add("modes/rgba.png", encode(photo.convert("RGBA"), "PNG"), DONE, (320, 240))
    palette = photo.convert("P")
    add("modes/palette-alpha.png", encode(palette, "PNG", transparency=bytes(range(256))), DONE, (320, 240))

    add("rotated.jpg", rotated_jpeg(), DONE, (200, 400))
    add("bad-orientation.jpg", encode(photo, "JPEG", exif=exif_orientation_as_text()), DONE, (320, 240))

    # 30000 x 30000 RGB claimed by the header, 16 kB on disk: PIL's own bomb guard refuses it.
    add("bomb.png", raw_png(30000, 30000, 8, 2, b"\x00" * 16384), "too_many_pixels")
    # 8000 x 8000 one-bit: 64 M pixels, above this config's pipeline.max_pixels (50 M), below PIL's limits.
    add("bomb-config.png", raw_png(8000, 8000, 1, 0, bytes(8000 // 8 + 1) * 8000), "too_many_pixels")
    add("tall.jpg", encode(photo_like(2048, 12000, seed=3), "JPEG", quality=85), DONE, (2048, 12000))

    (incoming / "d.jpg").mkdir()
    add("d.jpg/inner.jpg", jpeg, DONE, (320, 240))

    secret = tmp / "outside" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(jpeg)
    (incoming / "link.jpg").symlink_to(secret)
    cases.append(Case("link.jpg", "symlink_refused"))
    (incoming / "linkdir").symlink_to(secret.parent, target_is_directory=True)
    cases.append(Case("linkdir", "symlink_refused"))

    small = encode(photo_like(64, 48, seed=4), "JPEG")
    for name in [
        "with space.jpg",
        "ünïcödé 日本.jpg",
        "caf\u00e9.jpg",
        "cafe\u0301.jpg",
        "a\nb.jpg",
        "-rf.jpg",
        "--help.jpg",
    ]:
        add(f"names/{name}", small, DONE, (64, 48))
    add("-rf.jpg", small, DONE, (64, 48))
    return cases


@pytest.mark.slow
def test_hostile_corpus(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"], "imgsz": 320},
        intake={"settle_ms": 300},
        pipeline={"max_pixels": 50_000_000},
        log={"format": "json", "stats_interval_s": 0},
    )
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    var = tmp_path / "var"
    incoming = var / "incoming"
    secret = tmp_path / "outside" / "secret.jpg"

    cases = corpus(tmp_path, incoming)
    secret_before = (secret.read_bytes(), secret.stat().st_mtime_ns)
    observed = {case.rel: outcome(daemon, case.rel) for case in cases}

    # Still serving after all of that.
    drop(incoming, "after.jpg", (assets() / "bus.jpg").read_bytes())
    after = daemon.wait_event("image_done", path="after.jpg")
    assert (after["width"], after["height"]) == (810, 1080)
    assert daemon.stop(signal.SIGTERM) == 0

    table = {rel: r.get("reason", DONE) for rel, r in observed.items()}
    assert table == {case.rel: case.expect for case in cases}
    for case in cases:
        if case.expect == DONE:
            doc = json.loads((var / "output" / (case.rel + ".json")).read_text())
            assert doc["source"] == case.rel
            assert (doc["image"]["width"], doc["image"]["height"]) == case.size, case.rel
            assert (var / "output" / (case.rel + ".txt")).is_file()
            assert (var / "done" / case.rel).is_file()
        else:
            report = json.loads((var / "failed" / (case.rel + ".error.json")).read_text())
            assert report["source"] == case.rel and report["reason"] == case.expect and report["message"]
            assert os.path.lexists(var / "failed" / case.rel)

    rotated = json.loads((var / "output" / "rotated.jpg.json").read_text())["image"]
    assert rotated == {"width": 200, "height": 400, "exif_orientation": 6, "orientation_applied": True}
    odd = json.loads((var / "output" / "bad-orientation.jpg.json").read_text())["image"]
    assert odd["orientation_applied"] is False
    limit = json.loads((var / "failed" / "bomb-config.png.error.json").read_text())
    assert "pipeline.max_pixels=50000000" in limit["message"]
    # Special files keep what they are and are never opened; the symlinks' targets are untouched.
    assert stat.S_ISFIFO(os.lstat(var / "failed" / "x.jpg").st_mode)
    assert (var / "failed" / "link.jpg").is_symlink() and (var / "failed" / "linkdir").is_symlink()
    assert (secret.read_bytes(), secret.stat().st_mtime_ns) == secret_before
    assert entries(secret.parent) == ["secret.jpg"]

    # Every input accounted for, exactly once, and nothing left behind.
    done = [*sorted(c.rel for c in cases if c.expect == DONE), "after.jpg"]
    failed = sorted(c.rel for c in cases if c.expect != DONE)
    assert entries(var / "done") == sorted(done)
    assert entries(var / "failed") == sorted(failed + [rel + ".error.json" for rel in failed])
    assert entries(var / "output") == sorted(rel + suffix for rel in done for suffix in (".json", ".txt"))
    assert entries(incoming) == [] and entries(var / "work" / "processing") == []
    stopped = daemon.events("daemon_stopped")[0]
    assert (stopped["done"], stopped["failed"]) == (len(done), len(failed))

    # One JSON object per stdout line, even with a newline in a file name; no warnings on stderr.
    assert daemon.raw and len(daemon.lines) == len(daemon.raw)
    assert all(r["event"] != "<not json>" for r in daemon.lines)
    assert "Warning" not in daemon.stderr(), daemon.stderr()


def test_a_name_that_is_not_utf8_does_not_stop_the_daemon(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"], "imgsz": 64},
        pipeline={"drain_timeout_s": 1},
        log={"format": "json", "stats_interval_s": 0},
    )
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    var = tmp_path / "var"
    small = encode(photo_like(64, 48, seed=4), "JPEG")
    write_raw(os.fsencode(var / "incoming") + b"/bad\xff.jpg", small)  # legal on Linux, not UTF-8
    rel = os.fsdecode(b"bad\xff.jpg")
    assert outcome(daemon, rel, timeout_s=60)["event"] == "image_done"
    drop(var / "incoming", "after.jpg", small)
    daemon.wait_event("image_done", path="after.jpg", timeout_s=60)
    assert daemon.stop() == 0
    assert entries(var / "done") == sorted([rel, "after.jpg"])
    assert json.loads((var / "output" / (rel + ".json")).read_bytes())["source"] == rel  # \udcff round-trips


def test_a_name_near_the_length_limit_is_accounted_for(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"], "imgsz": 64},
        pipeline={"drain_timeout_s": 1},
        log={"format": "json", "stats_interval_s": 0},
    )
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    var = tmp_path / "var"
    rel = "n" * 246 + ".jpg"  # 250 bytes: a legal name (NAME_MAX is 255)
    (var / "incoming" / rel).write_bytes(encode(photo_like(64, 48, seed=4), "JPEG"))
    assert outcome(daemon, rel, timeout_s=20)["event"] == "image_done"
    assert daemon.stop() == 0
    assert entries(var / "work" / "processing") == [] and entries(var / "done") == [rel]
    # rel.json would be 255 bytes, rel.txt too: both keep the first bytes and a digest of the name.
    results = entries(var / "output")
    assert len(results) == 2 and all(len(name) <= 255 and name.startswith("n" * 200) for name in results)
    (document,) = [var / "output" / name for name in results if name.endswith(".json")]
    assert json.loads(document.read_text())["source"] == rel


# ---------------------------------------------------------------------------------------------
# Same names, slow writers


def test_a_slowly_written_file_is_not_read_until_complete(tmp_path: Path, daemon_factory: RunDaemon) -> None:
    # settle_ms far beyond the test: only the end-of-image marker can make slow.jpg look complete.
    config = write_config(tmp_path, intake={"settle_ms": 60_000}, log={"format": "json", "stats_interval_s": 0})
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    incoming = tmp_path / "var" / "incoming"
    data = (assets() / "bus.jpg").read_bytes()
    half = len(data) // 2
    while data[:half].endswith(b"\xff\xd9"):
        half += 1
    with open(incoming / "slow.jpg", "wb") as slow:
        slow.write(data[:half])
        slow.flush()
        # The watcher reports slow.jpg before z.jpg (same batch: sorted by name; else an earlier one),
        # so by z.jpg's image_done intake has looked at slow.jpg and left it.
        drop(incoming, "z.jpg", data)
        daemon.wait_event("image_done", path="z.jpg")
        assert (incoming / "slow.jpg").is_file()
        assert entries(tmp_path / "var" / "work" / "processing") == []
        slow.write(data[half:])
    done = daemon.wait_event("image_done", path="slow.jpg", timeout_s=30)  # well before settle_ms
    assert daemon.stop() == 0
    assert (done["width"], done["height"]) == (810, 1080)
    var = tmp_path / "var"
    whole = json.loads((var / "output" / "z.jpg.json").read_text())
    slowly = json.loads((var / "output" / "slow.jpg.json").read_text())
    assert slowly["detections"] and slowly["detections"] == whole["detections"]
    assert slowly["image"] == whole["image"]
    assert (var / "done" / "slow.jpg").read_bytes() == data
    assert not daemon.events("image_failed")


def test_the_same_name_again_is_processed_again(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    import threading

    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"]},
        log={"format": "json", "stats_interval_s": 0},
    )
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    var = tmp_path / "var"
    first, second = encode(photo_like(320, 240, seed=1), "JPEG"), encode(photo_like(640, 480, seed=2), "JPEG")
    drop(var / "incoming", "a.jpg", first)
    daemon.wait_event("image_done", path="a.jpg")
    result = var / "output" / "a.jpg.json"
    before = json.loads(result.read_text())

    # A reader polling the result while it is replaced must only ever see a whole document.
    stop, reads, torn = threading.Event(), [0], []

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(result.read_bytes())
                reads[0] += 1
            except (OSError, ValueError) as exc:
                torn.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        drop(var / "incoming", "a.jpg", second)
        daemon.wait_for(nth(2, "image_done", "a.jpg"))
    finally:
        stop.set()
        thread.join()
    assert daemon.stop() == 0
    after = json.loads(result.read_text())
    assert torn == [] and reads[0] > 0
    assert after["processed_at"] > before["processed_at"]
    assert (before["image"]["width"], after["image"]["width"]) == (320, 640)
    assert (var / "done" / "a.jpg").read_bytes() == second
    assert entries(var / "output") == ["a.jpg.json", "a.jpg.txt"]  # replaced, no temp files left


def test_same_stem_different_suffix(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"]},
        log={"format": "json", "stats_interval_s": 0},
    )
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    var = tmp_path / "var"
    drop(var / "incoming", "a.jpg", encode(photo_like(320, 240, seed=1), "JPEG"))
    drop(var / "incoming", "a.png", encode(photo_like(160, 120, seed=2), "PNG"))
    daemon.wait_event("image_done", path="a.jpg")
    daemon.wait_event("image_done", path="a.png")
    assert daemon.stop() == 0
    assert entries(var / "output") == ["a.jpg.json", "a.jpg.txt", "a.png.json", "a.png.txt"]
    widths = {
        rel: json.loads((var / "output" / f"{rel}.json").read_text())["image"]["width"] for rel in ("a.jpg", "a.png")
    }
    assert widths == {"a.jpg": 320, "a.png": 160}
    assert entries(var / "done") == ["a.jpg", "a.png"]


# ---------------------------------------------------------------------------------------------
# Intake races, driven in-process against a real directory


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class GatedCapacity(Capacity):
    """A Capacity that says when someone is waiting to claim."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.asked = asyncio.Event()

    async def acquire_up_to(self, n: int) -> int:
        self.asked.set()
        return await super().acquire_up_to(n)


class Events:
    """Stands in for intake's structlog logger: records events, wakes whoever waits for one."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    def _log(self, event: str, **fields: Any) -> None:
        self.records.append((event, fields))
        self._changed.set()

    debug = info = warning = error = _log

    def count(self, event: str) -> int:
        return sum(name == event for name, _ in self.records)

    async def until(self, event: str, n: int = 1, timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while self.count(event) < n:
                self._changed.clear()
                await self._changed.wait()


class Rig:
    def __init__(self, tmp: Path, *, settle_s: float = 60.0, limit: int = 100, reconcile_s: float = 30.0) -> None:
        self.incoming, self.processing = tmp / "incoming", tmp / "processing"
        self.incoming.mkdir()
        self.processing.mkdir()
        self.capacity = GatedCapacity(limit)
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()
        self.failed: asyncio.Queue[list[Outcome]] = asyncio.Queue()
        settings = intake.IntakeSettings(self.incoming, self.processing, settle_s, (".tmp",), reconcile_s, 20, False)
        self.intake = intake.Intake(settings, self.capacity, self.jobs, self.failed)

    def drop(self, rel: str, data: bytes | None = None, *, age_s: float = 3600) -> Path:
        path = self.incoming / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((assets() / "bus.jpg").read_bytes() if data is None else data)
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    def jobs_now(self) -> list[str]:
        out = []
        while not self.jobs.empty():
            out.append(str(self.jobs.get_nowait().rel))
        return out


@pytest.mark.parametrize("via", ["scan", "event"])
def test_a_file_deleted_between_event_and_claim(tmp_path: Path, via: str) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, limit=1)
        await rig.capacity.acquire()  # every slot taken: the claim has to wait
        rig.capacity.asked.clear()
        path = rig.drop("sub/gone.jpg")
        offer = asyncio.create_task(rig.intake.scan() if via == "scan" else rig.intake._offer(path))
        await asyncio.wait_for(rig.capacity.asked.wait(), 10)  # it saw the file and waits for a slot
        path.unlink()
        rig.capacity.release()
        await asyncio.wait_for(offer, 10)
        assert rig.jobs.empty() and rig.failed.empty()
        assert rig.intake.claimed == 0 and rig.capacity.in_flight == 0  # its slot was given back
        assert entries(rig.processing) == [] and entries(rig.incoming) == []
        rig.drop("next.jpg")  # and intake carries on
        await rig.intake.scan()
        assert rig.jobs_now() == ["next.jpg"]

    run(main())


def test_reconcile_never_starts_a_scan_while_one_is_feeding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        events = Events()
        monkeypatch.setattr(intake, "log", events)
        rig = Rig(tmp_path, limit=2, reconcile_s=0.05)
        for i in range(5):
            rig.drop(f"{i}.jpg", age_s=100 - i)
        first = asyncio.create_task(rig.intake.scan())  # the start-up scan: 5 files, 2 slots
        claimed = [await asyncio.wait_for(rig.jobs.get(), 10) for _ in range(2)]
        scan = rig.intake.scan
        started_while_feeding: list[bool] = []

        async def counted_scan(root: Path | None = None) -> int:
            started_while_feeding.append(not first.done())
            return await scan(root)

        rig.intake.scan = counted_scan  # type: ignore[method-assign]
        stop = asyncio.Event()
        reconcile = asyncio.create_task(rig.intake.reconcile(stop))
        await events.until("reconcile_skipped")  # a tick came while the first scan waits for capacity
        assert started_while_feeding == [] and not first.done()
        for _ in range(3):
            rig.capacity.release()
            claimed.append(await asyncio.wait_for(rig.jobs.get(), 10))
        await asyncio.wait_for(first, 10)
        assert [str(j.rel) for j in claimed] == [f"{i}.jpg" for i in range(5)]
        rig.drop("late.jpg")  # found by the next reconcile, once the first scan is over
        rig.capacity.release()
        late = await asyncio.wait_for(rig.jobs.get(), 10)
        assert str(late.rel) == "late.jpg"
        assert started_while_feeding and not any(started_while_feeding)
        stop.set()
        await asyncio.wait_for(reconcile, 10)

    run(main())


def test_a_partial_file_is_claimed_as_soon_as_it_is_whole(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, settle_s=60)
        data = (assets() / "bus.jpg").read_bytes()
        path = rig.incoming / "slow.jpg"
        path.write_bytes(data[:1000])
        await rig.intake._offer(path)  # the "added" event: fresh and not whole, so it waits
        assert rig.jobs.empty() and path.exists()
        append(path, data[1000:])
        await rig.intake._offer(path)  # the "modified" event: it now ends like a whole JPEG
        assert rig.jobs_now() == ["slow.jpg"]  # not 60 s later
        await asyncio.wait_for(rig.intake.wait_settled(), 5)  # and nothing is left waiting

    run(main())


def test_a_name_still_in_processing_is_claimed_once_free(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, settle_s=0.2)
        (rig.processing / "a.jpg").write_bytes(b"the first a.jpg, still being processed")
        rig.drop("a.jpg")
        await rig.intake.scan()
        assert rig.jobs.empty() and rig.capacity.in_flight == 0  # not replaced, slot given back
        (rig.processing / "a.jpg").unlink()  # the first one is done
        job = await asyncio.wait_for(rig.jobs.get(), 10)
        assert (
            str(job.rel) == "a.jpg" and (rig.processing / "a.jpg").read_bytes() == (assets() / "bus.jpg").read_bytes()
        )

    run(main())


def test_a_leftover_directory_does_not_block_a_file_of_that_name(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, settle_s=60)
        rig.drop("d.jpg/inner.jpg")
        await rig.intake.scan()
        assert rig.jobs_now() == ["d.jpg/inner.jpg"]
        (rig.processing / "d.jpg" / "inner.jpg").unlink()  # done: processing/d.jpg/ stays, empty
        (rig.incoming / "d.jpg").rmdir()
        rig.drop("d.jpg")  # now a file of the same name
        await rig.intake.scan()
        assert rig.jobs_now() == ["d.jpg"] and (rig.processing / "d.jpg").is_file()

    run(main())


def test_nothing_is_taken_through_a_symlinked_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """watchfiles follows symlinked directories and reports their files below incoming/: such a
    report must not move a file that lives elsewhere."""

    async def main() -> None:
        events = Events()
        monkeypatch.setattr(intake, "log", events)
        rig = Rig(tmp_path)
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        (outside / "x.jpg").write_bytes((assets() / "bus.jpg").read_bytes())
        (rig.incoming / "link").symlink_to(outside, target_is_directory=True)
        await rig.intake._offer(rig.incoming / "link" / "x.jpg")
        assert (outside / "x.jpg").is_file() and entries(rig.processing) == []
        assert rig.jobs.empty() and rig.failed.empty() and rig.capacity.in_flight == 0
        assert events.count("not_claimed") == 1
        await rig.intake.scan()  # the link itself is claimed, and failed as a symlink
        (failure,) = rig.failed.get_nowait()
        assert isinstance(failure, Failure) and failure.error.reason is FailReason.SYMLINK
        assert str(failure.job.rel) == "link" and (outside / "x.jpg").is_file()

    run(main())


def test_the_watcher_survives_a_name_that_is_not_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        events = Events()
        monkeypatch.setattr(intake, "log", events)
        rig = Rig(tmp_path)
        stop = asyncio.Event()
        watcher = asyncio.create_task(rig.intake.watch(stop))
        reconcile = asyncio.create_task(rig.intake.reconcile(stop))
        # The watcher is live once an event arrives; keep dropping distinct files until one is seen.
        for i in range(100):
            rig.drop(f"probe{i}.jpg")
            try:
                await asyncio.wait_for(rig.jobs.get(), 0.5)
                break
            except TimeoutError:
                continue
        write_raw(os.fsencode(rig.incoming) + b"/bad\xff.jpg", (assets() / "bus.jpg").read_bytes())
        await events.until("watch_restarted")
        rig.drop("after.jpg")  # the replacement watcher sees new files, and the rescan finds the odd name
        seen: set[str] = set()
        while not {"after.jpg", os.fsdecode(b"bad\xff.jpg")} <= seen:
            seen.add(str((await asyncio.wait_for(rig.jobs.get(), 10)).rel))
        stop.set()
        await asyncio.wait_for(asyncio.gather(watcher, reconcile), 10)

    run(main())


def test_the_completeness_check_neither_blocks_on_a_fifo_nor_follows_a_symlink(tmp_path: Path) -> None:
    """The entry may have been swapped since it was looked at (lstat said: regular file)."""
    whole = tmp_path / "whole.jpg"
    whole.write_bytes((assets() / "bus.jpg").read_bytes())
    (tmp_path / "link.jpg").symlink_to(whole)
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(intake.looks_complete, fifo)
        try:
            assert future.result(timeout=10) is False
        finally:
            if not future.done():  # blocked on open(): give it a writer so the thread can end
                with open(fifo, "wb"):
                    pass
    assert intake.looks_complete(whole) and not intake.looks_complete(tmp_path / "link.jpg")


# ---------------------------------------------------------------------------------------------
# Preprocessing corner cases (warnings are errors here)


PRE = preprocess.PrepSettings(imgsz=640, reduced_decode=True, max_pixels=100_000_000)


def prepared(path: Path) -> Prepared:
    return preprocess.prepare(Job(PurePosixPath(path.name), path), PRE)


@pytest.mark.parametrize("value", ["text", 9, 0])
def test_a_malformed_orientation_tag_is_ignored(tmp_path: Path, value: str | int) -> None:
    path = tmp_path / "odd.jpg"
    if isinstance(value, str):
        path.write_bytes(encode(photo_like(320, 240, seed=1), "JPEG", exif=exif_orientation_as_text()))
    else:
        exif = Image.Exif()
        exif[0x0112] = value
        path.write_bytes(encode(photo_like(320, 240, seed=1), "JPEG", exif=exif))
    p = prepared(path)
    assert (p.width, p.height, p.orientation) == (320, 240, 1)


def test_palette_transparency_in_bytes_decodes_without_warning(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    path.write_bytes(encode(photo_like(64, 48, seed=1).convert("P"), "PNG", transparency=bytes(range(256))))
    p = prepared(path)
    assert (p.width, p.height) == (64, 48) and p.image.dtype == np.uint8


def test_a_fifo_reaching_decode_fails_without_blocking(tmp_path: Path) -> None:
    """Intake routes a FIFO to failed/ by its mode; one swapped in after that must not hang a thread."""
    path = tmp_path / "swapped.jpg"
    os.mkfifo(path)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(prepared, path)
        try:
            with pytest.raises(ItemError) as err:
                future.result(timeout=10)
        finally:
            if not future.done():  # blocked on open(): give it a writer so the thread can end
                with open(path, "wb"):
                    pass
    assert err.value.reason is FailReason.NOT_REGULAR


def test_symlinks_and_missing_files_fail_with_their_own_reason(tmp_path: Path) -> None:
    target = tmp_path / "real.jpg"
    target.write_bytes((assets() / "bus.jpg").read_bytes())
    (tmp_path / "link.jpg").symlink_to(target)
    with pytest.raises(ItemError) as err:
        prepared(tmp_path / "link.jpg")
    assert err.value.reason is FailReason.SYMLINK
    with pytest.raises(ItemError) as err:
        prepared(tmp_path / "vanished.jpg")
    assert err.value.reason is FailReason.UNREADABLE and "No such file" in str(err.value)


# ---------------------------------------------------------------------------------------------
# A flood


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.mark.slow
def test_ten_thousand_files_at_once(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    total, early = 10_000, 2_000
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"], "imgsz": 64},
        pipeline={"max_batch": 32},
        output={"formats": ["json"], "fsync": False},
        log={"format": "json", "stats_interval_s": 0},
    )
    daemon = daemon_factory(config)
    daemon.wait_event("daemon_started")
    var = tmp_path / "var"
    staging = tmp_path / "staging"
    staging.mkdir()
    variants = [encode(photo_like(64, 48, seed=s), "JPEG") for s in range(8)]
    names = [f"img{i:05d}.jpg" for i in range(total)]
    for i, name in enumerate(names):
        (staging / name).write_bytes(variants[i % len(variants)])
    started = time.monotonic()
    for name in names:  # all of them within a fraction of a second
        os.rename(staging / name, var / "incoming" / name)

    memory: dict[int, dict[str, int]] = {}
    done = 0

    def sample(record: dict[str, Any]) -> bool:
        nonlocal done
        if record["event"] == "image_done":
            done += 1
            if done % 1000 == 0:
                memory[done] = memory_kib(daemon.proc.pid)
        return done >= total

    daemon.wait_for(sample, timeout_s=280)
    elapsed_s = time.monotonic() - started
    assert daemon.stop() == 0
    growth_mib = (memory[total]["VmHWM"] - memory[early]["VmRSS"]) / 1024
    rss_mib = {n: round(m["VmRSS"] / 1024, 1) for n, m in memory.items()}
    print(f"\n{total} files in {elapsed_s:.1f} s; main process VmRSS MiB by images done: {rss_mib}")
    assert growth_mib < 50 and memory[total]["VmHWM"] < 1.25 * memory[early]["VmRSS"], memory
    assert len(os.listdir(var / "done")) == total and len(os.listdir(var / "output")) == total
    assert entries(var / "incoming") == [] and entries(var / "work" / "processing") == []
    assert not daemon.events("image_failed")
