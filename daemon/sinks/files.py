"""Result files on disk: each written atomically, a batch of them by one thread job.

Each file goes to a hidden temporary file in its directory (`.<digest>.<pid>.tmp`, a name
`durable.sweep` recognises), is fsynced and renamed into place, and each directory is fsynced
once after its renames: a reader never sees half a file, and a power cut keeps a file whole or
not at all. Sources move to done/ or failed/ by one more thread job (`move_sources`). The results
stage (daemon/results.py) decides what the files are; this module only writes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiofiles.os
import structlog

from daemon import durable
from daemon.jobs import Job, Outcome

log = structlog.get_logger("daemon.sinks.files")
SWEPT_MAX = 10_000  # result directories remembered as swept
NAME_MAX = 255  # bytes in one file name, on every Linux filesystem inferd supports


def suffixed(path: Path, suffix: str) -> Path:
    """`bus.jpg` -> `bus.jpg.json`: results keep the source's whole name.

    A name that would pass the filesystem's 255-byte limit keeps its first bytes and gets a
    digest of the whole name instead (`<first bytes>~<16 hex><suffix>`); the .json says which
    source it belongs to.
    """
    name = path.name + suffix
    if len(os.fsencode(name)) <= NAME_MAX:
        return path.with_name(name)
    keep = NAME_MAX - len(os.fsencode(suffix)) - 17
    return path.with_name(f"{os.fsdecode(os.fsencode(path.name)[:keep])}~{digest(path.name)}{suffix}")


def digest(name: str) -> str:
    """16 hex digits of `name`: the fixed-length part of its temp files' names (and of a long name's results)."""
    return hashlib.blake2b(os.fsencode(name), digest_size=8).hexdigest()


def _prepare_dir(directory: Path, swept: set[Path]) -> None:
    """A result directory, made durably if it is missing, and on its first use in this run
    cleared of the temp files of dead runs (a power cut can keep a temp file and take back its
    rename)."""
    durable.makedirs(directory)
    if directory in swept:
        return
    if len(swept) >= SWEPT_MAX:  # a tree of many directories: forget, and sweep again on a later use
        swept.clear()
    if (removed := durable.sweep(directory)) > 0:
        log.info("temp_files_removed", directory=str(directory), count=removed)
    swept.add(directory)


@dataclass(frozen=True, slots=True)
class File:
    """One file to write: `data`, or a function that renders it in the writing thread."""

    target: Path
    data: bytes | Callable[[], bytes]
    recovered: bool  # an earlier run may have left temp files for it: remove them first
    owner: Outcome


class _Batch:
    """The files of one `write_files` job: per file its temp file, open descriptor and error."""

    def __init__(self, files: list[File], swept: set[Path]) -> None:
        self.files = files
        self.swept = swept
        self.errors: list[Exception | None] = [None] * len(files)
        self.tmps: list[Path | None] = [None] * len(files)
        self.fds: list[int | None] = [None] * len(files)
        self.dirs: set[Path] = set()  # made (and swept) for this job: each fsynced once at the end

    def write(self, i: int) -> None:
        """File `i`'s bytes into its hidden temp file beside its target (not yet fsynced)."""
        f = self.files[i]
        parent, key = f.target.parent, digest(f.target.name)  # temp names have a fixed length
        if parent not in self.dirs:
            _prepare_dir(parent, self.swept)
            self.dirs.add(parent)
        if f.recovered:
            for stale in parent.glob(f".{key}.*.tmp"):
                stale.unlink(missing_ok=True)
        data = f.data if isinstance(f.data, bytes) else f.data()
        self.tmps[i] = tmp = f.target.with_name(f".{key}.{os.getpid()}.tmp")
        self.fds[i] = out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]

    def commit(self, i: int, fsync: bool) -> None:
        """File `i`'s temp file fsynced and renamed over its target (if it was written)."""
        handle, tmp = self.fds[i], self.tmps[i]
        if handle is None or tmp is None:
            return
        if fsync:
            os.fsync(handle)
        os.close(handle)
        self.fds[i] = None
        os.replace(tmp, self.files[i].target)

    def fail(self, i: int, exc: Exception) -> None:
        self.errors[i] = exc
        if (fd := self.fds[i]) is not None:
            os.close(fd)
            self.fds[i] = None
        if (tmp := self.tmps[i]) is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def sync_dirs(self) -> None:
        """Each directory once: the renames into it reach the disk; a failure fails its files."""
        for parent in self.dirs:
            try:
                durable.fsync_dir(parent)
            except OSError as exc:
                for i, f in enumerate(self.files):
                    if f.target.parent == parent and self.errors[i] is None:
                        self.errors[i] = exc


@aiofiles.os.wrap
def write_files(files: list[File], fsync: bool, swept: set[Path]) -> list[Exception | None]:
    """Write each file atomically, in this one thread: every temp file written, then each
    fsynced (the first flush carries the others' blocks with it) and renamed into place, then
    each directory fsynced once. Per file None, or the error that kept it from being durable
    (an OSError, or a bug met rendering it: its outcome then takes the one-at-a-time path of
    `results.Writer.write`)."""
    batch = _Batch(files, swept)
    for i in range(len(files)):
        try:
            batch.write(i)
        except Exception as exc:  # noqa: BLE001 - handed back: the outcome is written again on its own
            batch.fail(i, exc)
    for i in range(len(files)):
        try:
            batch.commit(i, fsync)
        except OSError as exc:
            batch.fail(i, exc)
    if fsync:
        batch.sync_dirs()
    return batch.errors


@aiofiles.os.wrap
def move_sources(jobs: list[Job], into: Path, delete: bool) -> list[OSError | None]:
    """Move each source to `into` (done/ or failed/), or delete it, in this one thread."""
    errors: list[OSError | None] = [None] * len(jobs)
    made: set[Path] = set()
    for i, job in enumerate(jobs):
        try:
            if delete:
                os.remove(job.path)
                continue
            target = into / job.rel
            if target.parent not in made:
                durable.makedirs(target.parent)
                made.add(target.parent)
            os.replace(job.path, target)
        except OSError as exc:
            errors[i] = exc
    return errors
