"""A stream of images through inferd on tests/powerfs.py, with power cuts: the rig of test_powerloss.

Each round mounts the file system over the daemon's `var/` (incoming/, work/processing/, output/,
done/, failed/ and results.sqlite3 all on it), arms a cut at the Nth operation of one kind on one
path prefix (a batch's result writes, its database commit, its source move, ...), starts inferd
on what the last cut left, and drops a chunk of images. When the cut comes (or the chunk is done
and the cut is made then), the daemon is SIGKILLed, the mount ends, and the backing directory
holds what a disk would after a reboot. A last round runs `inferd run --once` with no cut and
unmounts cleanly; `check` then reads the backing directory.

A source is *acknowledged* once its producer has written it to a hidden name, fsynced it, renamed
it into incoming/ and fsynced incoming/, and all of that returned. inferd owes every acknowledged
source its results; a source whose hand-over was cut short may vanish.
"""

from __future__ import annotations

import io
import json
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from powermount import Mount

from bench.harness import Daemon, DaemonExited, Record
from bench.images import photo_like

CHECKOUT = Path(__file__).resolve().parent.parent
# (kind, path prefix, what a cut there interrupts, operations of that kind per image, about)
TARGETS = (
    ("write", "/output/", "a batch's result writes", 2.0),
    ("fsync", "/output/", "a result file's fsync", 2.0),
    ("rename", "/output/", "a result renamed into place", 2.0),
    ("fsyncdir", "/output", "a batch's fsync of output/", 0.15),
    ("write", "/results.sqlite3-wal", "a database commit's writes", 0.3),
    ("fsync", "/results.sqlite3-wal", "a database commit's fsync", 0.1),
    ("rename", "/work/processing/", "a source moved to done/ or failed/", 1.0),
    ("rename", "/incoming/", "a claim, or the producer's rename into incoming/", 1.0),
    ("fsync", "/failed/", "a failure report's fsync", 0.04),
    ("create", "/", "any create", 2.0),
)
BAD_EVERY = 25  # every 25th file (from the 7th) is not an image: it must end in failed/ with its reason
BOXES = 5  # bench/fake_model.py's detections per image
WINDOW = 4  # files the producer keeps ahead of inferd


@dataclass
class Producer:
    """Writes files into incoming/ the way inferd asks a producer to, and notes what was acknowledged."""

    incoming: Path
    acknowledged: list[str] = field(default_factory=list)
    cut_short: list[str] = field(default_factory=list)
    sent: int = 0

    def send(self, count: int) -> bool:
        """Up to `count` files; False at the first error (the power went)."""
        for _ in range(count):
            i, self.sent = self.sent, self.sent + 1
            name = f"{i:04}.jpg"
            try:
                self._deliver(name, i)
            except OSError:
                self.cut_short.append(name)
                return False
            self.acknowledged.append(name)
        return True

    def _deliver(self, name: str, i: int) -> None:
        tmp = self.incoming / f".{name}.part"
        if i % BAD_EVERY == 7:
            data = b"not an image at all " * 20
        else:
            buffer = io.BytesIO()
            photo_like(96, 64, i).save(buffer, format="JPEG")
            data = buffer.getvalue()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.incoming / name)
        directory = os.open(self.incoming, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # now it is acknowledged
        finally:
            os.close(directory)

    def tidy(self) -> None:
        """What a producer does at its own restart: remove its half-written files."""
        for stale in self.incoming.glob(".*.part"):
            stale.unlink()


@dataclass
class Stream:
    """Rounds of images and power cuts over one backing directory ("the disk")."""

    root: Path  # holds config.toml; var/ below it is the mount point
    config: Path
    env: dict[str, str]
    seed: int = 0
    cuts: list[str] = field(default_factory=list)  # what each cut interrupted, in order

    def __post_init__(self) -> None:
        self.disk = self.root / "disk"
        self.var = self.root / "var"
        self.rng = random.Random(self.seed)
        self.producer = Producer(self.var / "incoming")

    def round(self, chunk: int, target: tuple[str, str, str, float], mode: str) -> None:
        """Mount, arm a cut, start inferd, drop `chunk` files; cut, kill, unmount."""
        kind, prefix, what, per_image = target
        n = self.rng.randint(1, max(1, int(per_image * chunk)))
        with Mount(self.disk, self.var, seed=self.rng.randrange(1 << 30)) as mount:
            mount.arm(kind, n, prefix, mode)
            daemon = Daemon(self.config, env=self.env)
            try:
                self._feed(daemon, mount, chunk)
                if mount.cut_line is None:
                    mount.cut(mode)
                if mount.cut_line == "fired now -":
                    self.cuts.append(f"{mode}: idle, after the chunk (no {n}th {kind} on {prefix})")
                else:
                    self.cuts.append(f"{mode}: {kind} #{n} on {prefix} ({what}): {mount.cut_line}")
            finally:
                daemon.kill()
            mount.unmount()

    def _feed(self, daemon: Daemon, mount: Mount, chunk: int) -> None:
        """Once inferd is up, drop the chunk as a stream (WINDOW files ahead of what inferd has
        finished, so that its claims, writes and moves interleave with the producer's fsyncs);
        until the cut, or until every acknowledged source is done."""
        if not self._until(daemon, mount, lambda r: r["event"] == "daemon_started"):
            return
        self.producer.tidy()
        end = self.producer.sent + chunk
        if not self.producer.send(min(WINDOW, chunk)):
            return
        while self.producer.sent < end:
            target = _finished(daemon) + 1
            if not self._until(daemon, mount, lambda _r, t=target: _finished(daemon) >= t) or not self.producer.send(1):
                return
        self._until(daemon, mount, lambda _r: self._accounted(self.var))

    def _until(self, daemon: Daemon, mount: Mount, predicate: Callable[[Record], bool], timeout_s: float = 120) -> bool:
        """Wait for a log record that satisfies `predicate`: True; False once the power is cut."""
        deadline = time.monotonic() + timeout_s
        while mount.cut_line is None:
            try:
                daemon.wait_for(predicate, timeout_s=1)
                return True
            except TimeoutError:  # no such record yet: the cut is looked for again
                if time.monotonic() > deadline:
                    raise
            except DaemonExited:
                if mount.cut_line is None:
                    raise
        return False

    def _accounted(self, var: Path) -> bool:
        try:
            finished = set(files(var / "done")) | set(files(var / "failed"))
        except OSError:
            return True  # the power went: nothing more to wait for
        return all(name in finished for name in self.producer.acknowledged)

    def finish(self, images: int) -> Daemon:
        """The last round: the files still to send (up to `images`), then inferd --once on what
        is left, no cut, a clean unmount."""
        with Mount(self.disk, self.var) as mount:
            self.producer.tidy()
            self.producer.send(images - self.producer.sent)
            daemon = Daemon(self.config, "--once", env=self.env)
            try:
                daemon.wait_event("daemon_stopped", timeout_s=240)
                assert daemon.proc.wait(60) == 0, daemon.stderr()
            finally:
                daemon.kill()
            mount.unmount()
        return daemon


def _finished(daemon: Daemon) -> int:
    return sum(r["event"] in ("image_done", "image_failed") for r in daemon.lines)


def files(root: Path) -> list[str]:
    """Every file below `root`, relative; [] if it does not exist."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def check(disk: Path, producer: Producer) -> dict[str, int]:
    """What must hold on the disk after the last round; returns the counts it found."""
    done, failed, output = set(files(disk / "done")), set(files(disk / "failed")), set(files(disk / "output"))
    assert files(disk / "incoming") == [], "left in incoming/"
    assert files(disk / "work" / "processing") == [], "stuck in processing/"
    hidden = [p for d in ("output", "done", "failed", "work") for p in files(disk / d) if "/." in f"/{p}"]
    assert hidden == [], f"temp files left: {hidden}"
    sources = {n for n in done | failed if not n.endswith(".error.json")}
    stray = sources - set(producer.acknowledged) - set(producer.cut_short)
    assert not stray, f"sources no producer sent: {stray}"
    for name in producer.acknowledged:
        if name in done:
            assert name not in failed, f"{name} both in done/ and failed/"
            check_results(disk / "output", name)
        else:
            assert name in failed, f"acknowledged {name} is lost"
            report = json.loads((disk / "failed" / f"{name}.error.json").read_text())
            assert report["reason"] == "not_an_image", (name, report)
            assert int(name[:4]) % BAD_EVERY == 7, f"a good image failed: {name} {report}"
    for name in set(producer.cut_short) & done:
        check_results(disk / "output", name)
    expected = {f"{n}{s}" for n in done for s in (".txt", ".json")}
    assert output == expected, f"results without a source in done/: {output - expected}, missing: {expected - output}"
    rows = check_database(disk / "results.sqlite3")
    assert rows == {n: "done" for n in done} | {n: "failed" for n in sources - done}, "database rows"
    return {"done": len(done), "failed": len(sources - done), "acknowledged": len(producer.acknowledged)}


def check_results(output: Path, name: str) -> None:
    """Complete, parseable .txt and .json for `name`: BOXES detections in both."""
    missing = [s for s in (".txt", ".json") if not (output / f"{name}{s}").is_file()]
    assert not missing, f"done/{name} has no {' nor '.join(missing)} in output/: its results were lost"
    document = json.loads((output / f"{name}.json").read_text())
    assert document["source"] == name and len(document["detections"]) == BOXES, (name, document)
    lines = (output / f"{name}.txt").read_text().splitlines()
    assert len(lines) == BOXES and all(len(line.split()) >= 5 for line in lines), (name, lines)
    for line in lines:
        [float(v) for v in line.split()]


def check_database(path: Path) -> dict[str, str]:
    """PRAGMA integrity_check, one images row per source with BOXES detections if done; its statuses."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute(
            "SELECT source, status, (SELECT COUNT(*) FROM detections d WHERE d.image_id = i.id) FROM images i"
        ).fetchall()
    conn.close()
    sources = [r[0] for r in rows]
    assert len(sources) == len(set(sources)), "a source has two rows"
    for source, status, detections in rows:
        assert detections == (BOXES if status == "done" else 0), (source, status, detections)
    return {source: status for source, status, _ in rows}
