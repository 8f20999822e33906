"""What a power cut cannot take back: directories made durably, and temp files of dead runs swept.

A file renamed into a directory survives a power cut only if that directory's own entry does:
a directory just created is, to the disk, not there until its parent is fsynced. So every
directory inferd creates for its files is created by `makedirs`, which fsyncs the parent of each
directory it made. A cut can also keep a temp file whose rename it took back (tests/powerfs.py
shows both); `sweep` removes such files, once per directory and run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

UNSYNCABLE = (errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.EROFS)
TEMP = re.compile(r"\.[0-9a-f]{16}\.(\d+)\.tmp")  # sinks.files' temp names: .<digest>.<pid>.tmp


def fsync_dir(path: Path) -> None:
    """fsync a directory: the entries created, renamed or removed in it reach the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """`fsync_dir`, where the filesystem allows it. As PostgreSQL's fsync_fname: some filesystems
    cannot fsync a directory, or it is write-only to us; it is then as durable as that filesystem
    makes it."""
    try:
        fsync_dir(path)
    except OSError as exc:
        if exc.errno not in UNSYNCABLE:
            raise


def makedirs(path: Path) -> None:
    """`mkdir -p path`, then fsync the parent of every directory it created, outermost first."""
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not missing:
        return
    path.mkdir(parents=True, exist_ok=True)
    for made in reversed(missing):
        sync_dir(made.parent)


def sweep(directory: Path, pattern: re.Pattern[str] = TEMP) -> int:
    """Remove the temp files (names matching `pattern`, whose group 1 is the writer's pid) that
    runs no longer alive left in `directory`; how many."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match[1])):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
