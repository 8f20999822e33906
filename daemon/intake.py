"""Stage 1: find inputs, wait until they are complete, and claim them.

Candidates come from four places: processing/ at start (claimed by an earlier run that did not
finish: taken up first), a scan of incoming/ at start, watchfiles events, and a rescan every
`reconcile_interval_s` (inotify drops events on overflow, and NFS sends none).

A file is complete when its mtime is `settle_ms` old, or sooner when its bytes end the way a
whole JPEG or PNG ends. It is claimed by an atomic rename from incoming/ into processing/: the
rename decides when two sources offer the same file, and at every instant an input lives in
exactly one place. Claiming first takes a slot of `Capacity`, so a backlog of any size waits in
incoming/, not in memory. Hidden names, temporary suffixes, symlinks and special files are
never read: symlinks and special files are moved to failed/ with the reason. Nothing is taken
through a symlinked directory (watchfiles follows them), so a file outside incoming/ is never moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import structlog
import watchfiles
from watchfiles._rust_notify import WatchfilesRustInternalError  # not re-exported by watchfiles

from daemon.jobs import Capacity, FailReason, Failure, ItemError, Job, Outcome

log = structlog.get_logger("daemon.intake")

JPEG_END = b"\xff\xd9"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@dataclass(frozen=True, slots=True)
class Settings:
    incoming: Path
    processing: Path
    settle_s: float
    ignore_suffixes: tuple[str, ...]
    reconcile_interval_s: float
    debounce_ms: int
    force_polling: bool
    claim_by_copy: bool = False  # incoming/ is on another filesystem: claim by copy, then delete


def looks_complete(path: Path) -> bool:
    """True when the file ends with a JPEG end-of-image or PNG IEND marker.

    Opened without following a symlink or waiting on a FIFO: a producer may have swapped one in
    since the file was looked at.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # gone, or a symlink now
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < len(PNG_END):
            return False
        tail = os.pread(fd, len(PNG_END), st.st_size - len(PNG_END))
    except OSError:
        return False
    finally:
        os.close(fd)
    return tail.endswith(JPEG_END) or tail == PNG_END


def refusal(mode: int) -> ItemError | None:
    """Why an entry of this lstat mode is not read, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return ItemError(FailReason.SYMLINK, "symbolic links are not followed")
    return ItemError(FailReason.NOT_REGULAR, "not a regular file (FIFO, socket or device)")


class Intake:
    def __init__(
        self, settings: Settings, capacity: Capacity, jobs: asyncio.Queue[Job], failed: asyncio.Queue[Outcome]
    ) -> None:
        self.settings = settings
        self.capacity = capacity
        self.jobs = jobs
        self.failed = failed
        self.claimed = 0
        self._settling: dict[Path, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._settled = asyncio.Event()
        self._settled.set()
        self._scans = 0  # scans of the whole of incoming/ now feeding claims
        self._no_scan = asyncio.Event()  # set while _scans == 0
        self._no_scan.set()
        self._rescan = asyncio.Event()  # the watcher lost events: reconcile now, not at the next interval

    def ignored(self, rel: PurePosixPath) -> bool:
        return any(p.startswith(".") for p in rel.parts) or rel.name.endswith(self.settings.ignore_suffixes)

    async def recover(self) -> int:
        """Take up what an earlier run claimed but did not finish."""
        for stale in self.settings.processing.parent.glob(".claim-*.tmp"):  # a copy-claim cut short:
            stale.unlink(missing_ok=True)  # its source is still in incoming/
        paths = await asyncio.to_thread(self._walk, self.settings.processing, False)
        for raw, _delay in paths:
            path = Path(raw)
            await self.capacity.acquire()
            job = Job(self._rel(path, self.settings.processing), path, recovered=True)
            await self._route(job, os.lstat(path).st_mode)
        if paths:
            log.info("recovered", count=len(paths))
        return len(paths)

    async def scan(self, root: Path | None = None) -> int:
        """Offer every complete file below `root` (default incoming/), oldest first."""
        whole = root is None
        if whole:
            self._scans += 1
            self._no_scan.clear()
        try:
            candidates = await asyncio.to_thread(self._walk, root or self.settings.incoming, True)
            for raw, delay in candidates:
                await self._consider(Path(raw), delay)
        finally:
            if whole:
                self._scans -= 1
                if not self._scans:
                    self._no_scan.set()
        return len(candidates)

    async def watch(self, stop: asyncio.Event) -> None:
        """Claim files as watchfiles reports them, until `stop` is set.

        A name that is not UTF-8 (legal on Linux) breaks a watchfiles watcher for good: it raises
        on every later call and the batch it was collecting is lost. The watcher is then replaced
        and a reconcile asked for, which finds what the lost events named.
        """
        while not stop.is_set():
            try:
                await self._watch(stop)
            except* WatchfilesRustInternalError as group:
                log.error("watch_restarted", error=str(group.exceptions[0]))
                self._rescan.set()

    async def _watch(self, stop: asyncio.Event) -> None:
        async for changes in watchfiles.awatch(
            self.settings.incoming,
            stop_event=stop,
            watch_filter=None,
            debounce=self.settings.debounce_ms,
            step=min(50, self.settings.debounce_ms),
            force_polling=self.settings.force_polling,
            recursive=True,
            ignore_permission_denied=True,
        ):
            for change, raw in sorted(changes, key=lambda c: c[1]):
                if change is not watchfiles.Change.deleted:
                    await self._offer(Path(raw))

    async def reconcile(self, stop: asyncio.Event) -> None:
        """Rescan every reconcile_interval_s (at once when the watcher lost events), until `stop`.

        A scan offers its files one capacity slot at a time, so with a large backlog it feeds for
        a long while; a second scan started meanwhile would only hold another list of every path
        and offer the same files again. Such a tick waits for the running scan to end instead, and
        the next one comes an interval later (or at once, if a rescan was asked for meanwhile).
        """
        while True:
            await _first(stop, self._rescan, timeout_s=self.settings.reconcile_interval_s)
            if stop.is_set():
                return
            if not self._no_scan.is_set():
                log.info("reconcile_skipped", reason="a scan of incoming/ is still running", scans=self._scans)
                await _first(stop, self._no_scan)
                continue
            self._rescan.clear()
            await self.scan()

    async def wait_settled(self) -> None:
        """Until no file is waiting for its settle time (used by --once)."""
        await self._settled.wait()

    def close(self) -> None:
        for handle in self._settling.values():
            handle.cancel()
        self._settling.clear()
        self._settled.set()
        for task in self._tasks:
            task.cancel()

    async def _offer(self, path: Path) -> None:
        try:
            rel = self._rel(path, self.settings.incoming)
        except ValueError:
            return
        if self.ignored(rel):
            return
        delay = await asyncio.to_thread(self._inspect, path)
        if isinstance(delay, str):
            await self.scan(path)  # a directory moved in brings files that raise no events
        elif delay is not None:
            await self._consider(path, delay)

    async def _consider(self, path: Path, delay: float) -> None:
        pending = self._settling.get(path)
        if pending is not None:
            if delay > 0:
                return
            # Seen while incomplete and complete now (it ends like a whole image): no need to
            # wait out the settle time set when it was first seen.
            pending.cancel()
            del self._settling[path]
            self._check_settled()
        if delay > 0:
            self._defer(path, delay)
            return
        await self._claim(path)

    def _defer(self, path: Path, delay: float) -> None:
        """Offer `path` again in `delay` seconds (replacing an earlier such plan)."""
        if (pending := self._settling.get(path)) is not None:
            pending.cancel()
        self._settled.clear()
        self._settling[path] = asyncio.get_running_loop().call_later(delay, self._resettle, path)

    def _resettle(self, path: Path) -> None:
        del self._settling[path]
        task = asyncio.get_running_loop().create_task(self._offer(path))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._check_settled()

    def _check_settled(self) -> None:
        if not self._settling and not self._tasks:
            self._settled.set()

    async def _claim(self, path: Path) -> None:
        await self.capacity.acquire()
        rel = self._rel(path, self.settings.incoming)
        target = self.settings.processing / rel
        try:
            spool = self.settings.processing.parent if self.settings.claim_by_copy else None
            mode = await asyncio.to_thread(_rename_into, path, target, self.settings.incoming, rel, spool)
        except FileNotFoundError:  # taken or deleted meanwhile
            self.capacity.release()
            return
        except OutsideIncoming as exc:
            self.capacity.release()
            log.warning("not_claimed", path=str(rel), reason=str(exc))
            return
        except FileExistsError:  # the same name is still being processed: retry once it is done
            self.capacity.release()
            self._defer(path, self.settings.settle_s or 0.5)
            return
        self.claimed += 1
        await self._route(Job(rel, target), mode)

    async def _route(self, job: Job, mode: int) -> None:
        error = refusal(mode)
        if error is None:
            await self.jobs.put(job)
        else:
            await self.failed.put(Failure(job, error))

    @staticmethod
    def _rel(path: Path, root: Path) -> PurePosixPath:
        return PurePosixPath(path.relative_to(root).as_posix())

    def _inspect(self, path: Path) -> float | str | None:
        """Seconds until `path` may be claimed; "dir" for a directory; None if it is gone."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        if not stat.S_ISREG(st.st_mode):
            return 0.0  # claimed, then failed with the reason: never opened
        age = time.time() - st.st_mtime
        if age >= self.settings.settle_s or looks_complete(path):
            return 0.0
        return self.settings.settle_s - age

    def _walk(self, root: Path, check: bool) -> list[tuple[str, float]]:
        """Every non-directory entry below root, oldest first, with its settle delay.

        Paths are kept as str: a backlog of 100,000 names then costs ~14 MB, not ~37 MB.
        """
        found: list[tuple[float, str, float]] = []
        stack = [root]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            for entry in entries:
                path = Path(entry.path)
                if check and self.ignored(self._rel(path, self.settings.incoming)):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                    continue
                delay = self._inspect(path) if check else 0.0
                if isinstance(delay, float):
                    try:
                        found.append((entry.stat(follow_symlinks=False).st_mtime, entry.path, delay))
                    except FileNotFoundError:
                        continue
        found.sort(key=lambda f: f[0])
        return [(path, delay) for _mtime, path, delay in found]


async def _first(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Until one of `events` is set, or `timeout_s` has passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class OutsideIncoming(Exception):
    """The path reaches its file through a symlinked directory: the file is not in incoming/."""


def _rename_into(source: Path, target: Path, root: Path, rel: PurePosixPath, spool: Path | None = None) -> int:
    """Atomically move `source` (`root`/`rel`) to `target`, never replacing one; return the moved
    entry's lstat mode.

    Raises FileNotFoundError if the source is gone, FileExistsError if the target is taken, and
    OutsideIncoming if a directory on the way to the source is a symlink.
    """
    if os.path.realpath(source.parent) != os.path.normpath(os.path.join(os.path.realpath(root), rel.parent)):
        raise OutsideIncoming("a directory on its path is a symbolic link")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        # An empty directory left by an earlier claim of files below a directory of this name.
        with contextlib.suppress(OSError):
            target.rmdir()
    if os.path.lexists(target):
        raise FileExistsError(target)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV or spool is None:
            raise
        _copy_into(source, target, spool)
    return os.lstat(target).st_mode  # what was moved, not what was looked at before: it may have been swapped


def _copy_into(source: Path, target: Path, spool: Path) -> None:
    """Claim across filesystems (intake.claim_by_copy): copy to a temp file in `spool` (work/),
    fsync, rename into place, and only then delete the source. A crash in between leaves the
    source in incoming/ (processed again: at-least-once). A symlink or FIFO is recreated, never
    read, and failed by its mode. A source rewritten during the copy is claimed again later.
    """
    before = os.lstat(source)
    if stat.S_ISLNK(before.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISFIFO(before.st_mode):
        os.mkfifo(target)
    elif not stat.S_ISREG(before.st_mode):
        raise OutsideIncoming("a socket or device on another filesystem cannot be claimed")
    else:
        fd, name = tempfile.mkstemp(prefix=".claim-", suffix=".tmp", dir=spool)  # not in processing/
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            after = os.lstat(source)
            if (after.st_ino, after.st_size, after.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
                raise FileExistsError(source)  # changed while copied: settle and claim again
            os.rename(name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise
    os.unlink(source)
