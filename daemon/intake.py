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

from daemon import durable
from daemon.errors import OutsideIncoming as OutsideIncoming  # re-exported: its old home
from daemon.jobs import Capacity, FailReason, Failure, ItemError, Job, Outcome

log = structlog.get_logger("daemon.intake")

JPEG_END = b"\xff\xd9"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
WATCH_RETRY_S = 5.0  # a watcher that failed is replaced after this; scans cover the gap
CLAIM_GROUP = 32  # files claimed by one thread job


@dataclass(frozen=True, slots=True)
class IntakeSettings:
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


def entry_error(mode: int) -> ItemError | None:
    """Why an entry of this lstat mode is not read, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return ItemError(FailReason.SYMLINK, "symbolic links are not followed")
    return ItemError(FailReason.NOT_REGULAR, "not a regular file (FIFO, socket or device)")


class Intake:
    def __init__(
        self,
        settings: IntakeSettings,
        capacity: Capacity,
        jobs: asyncio.Queue[Job],
        failed: asyncio.Queue[list[Outcome]],
    ) -> None:
        self.settings = settings
        self.capacity = capacity
        self.jobs = jobs
        self.failed = failed
        self.claimed = 0
        self.found = 0  # inputs offered by recover() and whole scans (--once: the backlog to do)
        self._settling: dict[Path, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._settled = asyncio.Event()
        self._settled.set()
        self._scans = 0  # scans of the whole of incoming/ now feeding claims
        self._no_scan = asyncio.Event()  # set while _scans == 0
        self._no_scan.set()
        self._rescan = asyncio.Event()  # the watcher lost events: reconcile now, not at the next interval
        self._closed = False  # the drain began: no new claim
        self._claim_errors: set[tuple[PurePosixPath, int | None]] = set()  # reported in this scan
        self._copied_dirs: set[PurePosixPath] = set()
        self._unreadable = Unreadable()
        self.watching = asyncio.Event()  # set once the watcher is in place (scan after it, miss nothing)

    def ignored(self, rel: PurePosixPath) -> bool:
        return any(p.startswith(".") for p in rel.parts) or rel.name.endswith(self.settings.ignore_suffixes)

    async def recover(self) -> int:
        """Take up what an earlier run claimed but did not finish."""
        await asyncio.to_thread(self._remove_stale_copies)
        paths, _unreadable = await asyncio.to_thread(self._walk, self.settings.processing, False)
        self.found += len(paths)
        for raw, mode in paths:
            path = Path(raw)
            await self.capacity.acquire()
            job = Job(self._rel(path, self.settings.processing), path, recovered=True)
            await self._route(job, int(mode))
        if paths:
            log.info("recovered", count=len(paths))
        return len(paths)

    def _remove_stale_copies(self) -> None:
        for stale in self.settings.processing.parent.glob(".claim-*.tmp"):  # a copy-claim cut short:
            stale.unlink(missing_ok=True)  # its source is still in incoming/

    async def scan(self, root: Path | None = None) -> int:
        """Offer every complete file below `root` (default incoming/), oldest first."""
        whole = root is None
        if whole:
            self._scans += 1
            self._no_scan.clear()
        try:
            candidates, unreadable = await asyncio.to_thread(self._walk, root or self.settings.incoming, True)
            if whole:
                self.found += len(candidates)
                self._claim_errors.clear()  # a problem that persists is reported again once per scan
                self._unreadable.update(unreadable)
            ready: list[Path] = []
            for raw, delay in candidates:
                if self._consider(Path(raw), delay):
                    ready.append(Path(raw))
                if len(ready) == CLAIM_GROUP:
                    await self._claim(ready)
                    ready = []
            await self._claim(ready)
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
            except* Exception as group:  # noqa: BLE001 - e.g. the inotify watch limit: scans go on meanwhile
                log.error("watch_failed", error=str(group.exceptions[0]), retry_in_s=WATCH_RETRY_S)
                self._rescan.set()
                await _first(stop, timeout_s=WATCH_RETRY_S)  # a backoff, not a wait for something

    async def _watch(self, stop: asyncio.Event) -> None:
        # No await between this and the watcher's creation at the first step of `awatch`: a task
        # woken by `watching` runs once the watcher is in place, so a scan then misses nothing.
        self.watching.set()
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
            changed = sorted(raw for change, raw in changes if change is not watchfiles.Change.deleted)
            await self._offer(*map(Path, changed))

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
        self._closed = True
        for handle in self._settling.values():
            handle.cancel()
        self._settling.clear()
        self._settled.set()
        for task in self._tasks:
            task.cancel()

    async def _offer(self, *paths: Path) -> None:
        """Claim those of `paths` that are complete; the others are looked at again later."""
        offered = [p for p in paths if self._below_incoming(p)]
        if not offered:
            return
        delays = await asyncio.to_thread(lambda: [self._inspect(p) for p in offered])  # one thread job
        ready = []
        for path, delay in zip(offered, delays, strict=True):
            if isinstance(delay, str):
                await self.scan(path)  # a directory moved in brings files that raise no events
            elif delay is not None and self._consider(path, delay):
                ready.append(path)
        await self._claim(ready)

    def _below_incoming(self, path: Path) -> bool:
        try:
            return not self.ignored(self._rel(path, self.settings.incoming))
        except ValueError:
            return False

    def _consider(self, path: Path, delay: float) -> bool:
        """Whether `path` may be claimed now; if not yet, it is offered again once settled."""
        pending = self._settling.get(path)
        if pending is not None:
            if delay > 0:
                return False
            # Seen while incomplete and complete now (it ends like a whole image): no need to
            # wait out the settle time set when it was first seen.
            pending.cancel()
            del self._settling[path]
            self._check_settled()
        if delay > 0:
            self._defer(path, delay)
            return False
        return True

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
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("internal_error", stage="intake", exc_info=exc)  # a bug: its file waits for a scan
        self._check_settled()

    def _check_settled(self) -> None:
        if not self._settling and not self._tasks:
            self._settled.set()

    async def _claim(self, paths: list[Path]) -> None:
        """Claim `paths` in order, as many at a time as capacity allows (up to CLAIM_GROUP): one
        thread job renames a group, so a backlog costs the event loop one hop per group."""
        i = 0
        while i < len(paths):
            taken = await self.capacity.acquire_up_to(min(CLAIM_GROUP, len(paths) - i))
            group, i = paths[i : i + taken], i + taken
            if self._closed:
                self.capacity.release(taken)
                return
            # From here the claim runs to its end even if the drain cancels this task: a file moved
            # into processing/ must reach the pipeline, and a slot not used must come back.
            await asyncio.shield(self._claim_held(group))

    async def _claim_held(self, paths: list[Path]) -> None:
        """Claim `paths` with a capacity slot held for each; every way out releases it or hands it on."""
        rels = [self._rel(p, self.settings.incoming) for p in paths]
        targets = [self.settings.processing / rel for rel in rels]
        spool = self.settings.processing.parent

        def rename_all() -> list[tuple[int, bool] | Exception]:
            results: list[tuple[int, bool] | Exception] = []
            checked: set[Path] = set()
            for path, rel, target in zip(paths, rels, targets, strict=True):
                try:
                    results.append(_rename_into(path, target, self.settings.incoming, rel, spool, checked))
                except Exception as exc:  # noqa: BLE001 - each path's own outcome, handled below
                    results.append(exc)
            return results

        try:
            outcomes = await asyncio.to_thread(rename_all)
        except BaseException:
            self.capacity.release(len(paths))
            raise
        for path, rel, target, outcome in zip(paths, rels, targets, outcomes, strict=True):
            try:
                await self._claimed(path, rel, target, outcome)
            except Exception as exc:
                log.error("internal_error", stage="intake", path=str(rel), exc_info=exc)

    async def _claimed(
        self, path: Path, rel: PurePosixPath, target: Path, outcome: tuple[int, bool] | Exception
    ) -> None:
        """Route one claimed file on, or release its slot: what its rename gave."""
        if isinstance(outcome, Exception):
            self.capacity.release()
            if isinstance(outcome, FileNotFoundError):  # taken or deleted meanwhile
                return
            if isinstance(outcome, OutsideIncoming):
                log.warning("not_claimed", path=str(rel), reason=str(outcome))
            elif isinstance(outcome, FileExistsError):  # the same name is still being processed: retry once done
                self._defer(path, self.settings.settle_s or 0.5)
            elif isinstance(outcome, OSError):  # EACCES, EROFS, ENOSPC...: it stays in incoming/, the next scan retries
                self._claim_failed(rel, outcome)
            else:
                log.error("internal_error", stage="intake", path=str(rel), exc_info=outcome)
            return
        mode, copied = outcome
        if copied and not self.settings.claim_by_copy and rel.parent not in self._copied_dirs:
            self._copied_dirs.add(rel.parent)
            log.warning(
                "claimed_by_copy",
                directory=str(rel.parent),
                reason="it is on another filesystem than work/ (a mount below incoming/)",
            )
        self.claimed += 1
        await self._route(Job(rel, target), mode)

    def _claim_failed(self, rel: PurePosixPath, exc: OSError) -> None:
        """Log a claim error once per directory and errno in each scan (a persisting one recurs)."""
        key = (rel.parent, exc.errno)
        if key in self._claim_errors:
            return
        self._claim_errors.add(key)
        log.error(
            "claim_failed",
            path=str(rel),
            directory=str(rel.parent),
            errno=errno.errorcode.get(exc.errno or 0, exc.errno),
            error=exc.strerror or str(exc),
            hint="the file stays in incoming/ and is retried at every reconcile; "
            "inferd needs write access to its directory and to work/",
        )

    async def _route(self, job: Job, mode: int) -> None:
        error = entry_error(mode)
        if error is None:
            await self.jobs.put(job)
        else:
            await self.failed.put([Failure(job, error)])

    @staticmethod
    def _rel(path: Path, root: Path) -> PurePosixPath:
        return PurePosixPath(path.relative_to(root).as_posix())

    def _inspect(self, path: Path) -> float | str | None:
        """Seconds until `path` may be claimed; "dir" for a directory; None if it is gone."""
        try:
            st = os.lstat(path)
        except OSError:  # gone; or its directory cannot be searched, which the scan reports
            return None
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        if not stat.S_ISREG(st.st_mode):
            return 0.0  # claimed, then failed with the reason: never opened
        age = time.time() - st.st_mtime
        if age >= self.settings.settle_s or looks_complete(path):
            return 0.0
        return self.settings.settle_s - age

    def _walk(self, root: Path, check: bool) -> tuple[list[tuple[str, float]], dict[str, str]]:
        """Every non-directory entry below root, oldest first, with its settle delay (with
        `check`) or its lstat mode; and the directories that could not be read, with why.

        Paths are kept as str: a backlog of 100,000 names then costs ~14 MB, not ~37 MB.
        """
        found: list[tuple[float, str, float]] = []
        unreadable: dict[str, str] = {}
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:  # EACCES, EIO: its files wait, and the operator is told once
                unreadable[str(directory)] = exc.strerror or str(exc)
                continue
            for entry in entries:
                path = Path(entry.path)
                if check and self.ignored(self._rel(path, self.settings.incoming)):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                delay = self._inspect(path) if check else float(st.st_mode)
                if isinstance(delay, float):
                    found.append((st.st_mtime, entry.path, delay))
        found.sort(key=lambda f: f[0])
        return [(path, delay) for _mtime, path, delay in found], unreadable


class Unreadable:
    """Directories below incoming/ that a scan could not read: each is logged when it becomes
    unreadable and when it is readable again, not at every scan."""

    def __init__(self) -> None:
        self.now: dict[str, str] = {}

    def update(self, found: dict[str, str]) -> None:
        for path, error in found.items():
            if path not in self.now:
                log.error("directory_unreadable", path=path, error=error, hint="its files wait until it can be read")
        for path in self.now.keys() - found.keys():
            log.info("directory_readable", path=path)
        self.now = found


async def _first(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Until one of `events` is set, or `timeout_s` has passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _rename_into(
    source: Path, target: Path, root: Path, rel: PurePosixPath, spool: Path, checked: set[Path] | None = None
) -> tuple[int, bool]:
    """Atomically move `source` (`root`/`rel`) to `target`, never replacing one; return the moved
    entry's lstat mode, and whether it was copied: a source on another filesystem (all of
    incoming/ with intake.claim_by_copy, or a mount below it) is copied through `spool`.
    `checked`: the source directories one group of claims has already checked (and made below
    processing/); each costs a dozen lstat calls.

    Raises FileNotFoundError if the source is gone, FileExistsError if the target is taken, and
    OutsideIncoming if a directory on the way to the source is a symlink.
    """
    if checked is None or source.parent not in checked:
        if os.path.realpath(source.parent) != os.path.normpath(os.path.join(os.path.realpath(root), rel.parent)):
            raise OutsideIncoming("a directory on its path is a symbolic link")
        durable.makedirs(target.parent)  # a claim into a directory a power cut can take back would be lost
        if checked is not None:
            checked.add(source.parent)
    try:
        taken: int | None = os.lstat(target).st_mode
    except FileNotFoundError:
        taken = None
    if taken is not None and stat.S_ISDIR(taken):
        # An empty directory left by an earlier claim of files below a directory of this name.
        with contextlib.suppress(OSError):
            target.rmdir()
            taken = None
    if taken is not None:
        raise FileExistsError(target)
    copied = False
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_into(source, target, spool)
        copied = True
    return os.lstat(target).st_mode, copied  # what was moved, not what was looked at: it may have been swapped


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
    # The copy's name reaches the disk before the source's removal can: they may be on two
    # filesystems, whose writes a power cut does not keep in order.
    durable.sync_dir(target.parent)
    os.unlink(source)
