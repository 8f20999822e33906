"""Stage 1: find inputs, wait until they are complete, and claim them.

Candidates come from four places: processing/ at start (claimed by an earlier run that did not
finish: taken up first), a scan of incoming/ at start, watchfiles events, and a rescan every
`reconcile_interval_s` (inotify drops events on overflow, and NFS sends none).

A file is complete when its mtime is `settle_ms` old, or sooner when its bytes end the way a
whole JPEG or PNG ends. It is claimed by an atomic rename from incoming/ into processing/: the
rename decides when two sources offer the same file, and at every instant an input lives in
exactly one place. Claiming first takes a slot of `Capacity`, so a backlog of any size waits in
incoming/, not in memory. Hidden names, temporary suffixes, symlinks and special files are
never read: symlinks and special files are moved to failed/ with the reason.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import structlog
import watchfiles

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


def looks_complete(path: Path) -> bool:
    """True when the file ends with a JPEG end-of-image or PNG IEND marker."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), os.SEEK_END)
            tail = f.read()
    except OSError:  # shorter than the marker, or gone
        return False
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

    def ignored(self, rel: PurePosixPath) -> bool:
        return any(p.startswith(".") for p in rel.parts) or rel.name.endswith(self.settings.ignore_suffixes)

    async def recover(self) -> int:
        """Take up what an earlier run claimed but did not finish."""
        paths = await asyncio.to_thread(self._walk, self.settings.processing, False)
        for path, _delay in paths:
            await self.capacity.acquire()
            job = Job(self._rel(path, self.settings.processing), path, recovered=True)
            await self._route(job, os.lstat(path).st_mode)
        if paths:
            log.info("recovered", count=len(paths))
        return len(paths)

    async def scan(self, root: Path | None = None) -> int:
        """Offer every complete file below `root` (default incoming/), oldest first."""
        candidates = await asyncio.to_thread(self._walk, root or self.settings.incoming, True)
        for path, delay in candidates:
            await self._consider(path, delay)
        return len(candidates)

    async def watch(self, stop: asyncio.Event) -> None:
        """Claim files as watchfiles reports them, until `stop` is set."""
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
        """Rescan every reconcile_interval_s, for events that never came."""
        while True:
            try:
                await asyncio.wait_for(stop.wait(), self.settings.reconcile_interval_s)
                return
            except TimeoutError:
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
        if path in self._settling:
            return
        if delay > 0:
            self._settled.clear()
            self._settling[path] = asyncio.get_running_loop().call_later(delay, self._resettle, path)
            return
        await self._claim(path)

    def _resettle(self, path: Path) -> None:
        del self._settling[path]
        task = asyncio.get_running_loop().create_task(self._offer(path))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._settling and not self._tasks:
            self._settled.set()

    async def _claim(self, path: Path) -> None:
        await self.capacity.acquire()
        rel = self._rel(path, self.settings.incoming)
        target = self.settings.processing / rel
        try:
            mode = await asyncio.to_thread(_rename_into, path, target)
        except FileNotFoundError:  # taken or deleted meanwhile
            self.capacity.release()
            return
        except FileExistsError:  # the same name is still being processed: retry once it is done
            self.capacity.release()
            self._settled.clear()
            self._settling[path] = asyncio.get_running_loop().call_later(
                self.settings.settle_s or 0.5, self._resettle, path
            )
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

    def _walk(self, root: Path, check: bool) -> list[tuple[Path, float]]:
        """Every non-directory entry below root, oldest first, with its settle delay."""
        found: list[tuple[float, Path, float]] = []
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
                        found.append((entry.stat(follow_symlinks=False).st_mtime, path, delay))
                    except FileNotFoundError:
                        continue
        found.sort(key=lambda f: f[0])
        return [(path, delay) for _mtime, path, delay in found]


def _rename_into(source: Path, target: Path) -> int:
    """Atomically move `source` to `target` (never replacing one); return its lstat mode."""
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = os.lstat(source).st_mode
    if os.path.lexists(target):
        raise FileExistsError(target)
    os.rename(source, target)
    return mode
