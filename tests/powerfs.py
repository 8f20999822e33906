"""A FUSE file system that forgets what was not synced: the disk of the power-loss tests.

    python tests/powerfs.py BACKING MOUNTPOINT [--seed N]

The whole tree lives in this process's memory, the way a page cache holds it: processes on the
mount see every write, create, rename and unlink at once. What a disk would hold is kept beside
it, as LazyFS (the file system Jepsen cuts the power of) models it:
- a file's data (its bytes and size) reaches the disk only when that file is fsynced;
- a create, mkdir, link, unlink, rmdir or rename reaches the disk when a directory it touched is
  fsynced (a rename is atomic: both of its names, or neither), together with every earlier
  change to the same file or directory (the disk sees each one's changes in order);
- nothing else ever does.
At a power cut the disk keeps only that (mode `lose`); or, in mode `reorder`, also each pending
directory change by a coin toss, as if the kernel had written some back on its own before the
cut, unless an earlier change to the same file or directory was lost (file data that was not
fsynced is still lost). This is stricter than ext4 or XFS, whose journal keeps all metadata
changes in one order: a daemon that passes here does not rely on that. The disk's state is then
written to BACKING, the mount answers EIO to everything, and the next unmount only ends it. A
clean unmount with no cut writes the tree as the processes saw it (an orderly shutdown).

Control by lines on stdin, answers on stdout ("ready" once mounted):
    arm KIND N [PREFIX] [MODE]   cut at the Nth KIND operation from now (write, fsync, fsyncdir,
                                 create, rename, unlink, mkdir) on a path starting with PREFIX;
                                 that operation fails and does not happen  -> "armed"
    cut [MODE]                   cut now                 -> "cut now" (or "cut already")
    counts                       operations of each kind so far             -> "counts {json}"
At every cut it prints "fired KIND PATH" ("fired now -" for `cut`); at the end "unmounted".
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mfusepy
from powermodel import Model, Node


class PowerFS(mfusepy.Operations):
    """The FUSE side: each operation on the model, counted, under one lock; EIO after a cut."""

    use_ns = True

    def __init__(self, backing: Path, seed: int) -> None:
        self.backing = backing
        self.model = Model()
        self.model.load(backing)
        self.mutex = threading.Lock()
        self.rng = random.Random(seed)
        self.counts: dict[str, int] = {}
        self.armed: tuple[str, int, str, str] | None = None  # kind, operations left, prefix, mode
        self.dead = False

    def _step(self, kind: str, path: str | None) -> None:
        if self.dead:
            raise mfusepy.FuseOSError(errno.EIO)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.armed is None or self.armed[0] != kind or not (path or "").startswith(self.armed[2]):
            return
        kind, left, prefix, mode = self.armed
        self.armed = (kind, left - 1, prefix, mode) if left > 1 else None
        if left == 1:
            self.cut(mode, kind, path or "-")
            raise mfusepy.FuseOSError(errno.EIO)

    def cut(self, mode: str, kind: str, path: str) -> None:
        """The power cut (the lock held): the disk's state goes to the backing directory."""
        self.dead = True
        self.model.cut(self.rng if mode == "reorder" else None)
        self.model.write_out(self.backing, durable=True)
        say(f"fired {kind} {path}")

    def control(self) -> None:
        for line in sys.stdin:
            words = line.split()
            with self.mutex:
                if words[:1] == ["arm"]:
                    prefix = words[3] if len(words) > 3 else ""
                    self.armed = (words[1], int(words[2]), prefix, words[4] if len(words) > 4 else "lose")
                    say("armed")
                elif words[:1] == ["cut"] and self.dead:
                    say("cut already")
                elif words[:1] == ["cut"]:
                    self.cut(words[1] if len(words) > 1 else "lose", "now", "-")
                    say("cut now")
                elif words[:1] == ["counts"]:
                    say(f"counts {json.dumps(self.counts)}")

    def _node(self, path: str | None, fh: int | None) -> Node:
        return self.model.nodes[fh] if fh else self.model.lookup(path or "/")

    # -- the operations
    def init(self, path: str) -> None:
        say("ready")

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self.mutex:
            if self.dead:
                raise mfusepy.FuseOSError(errno.EIO)
            node = self._node(path, fh)
            size = len(node.data) if stat.S_ISREG(node.mode) else len(node.target)
            return {
                "st_mode": node.mode, "st_ino": node.ino, "st_nlink": max(node.links, 1), "st_size": size,
                "st_uid": os.getuid(), "st_gid": os.getgid(),
                "st_atime": node.mtime_ns, "st_mtime": node.mtime_ns, "st_ctime": node.mtime_ns,
            }  # fmt: skip

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        with self.mutex:  # an inode number with each name: glibc skips entries whose d_ino is 0
            self._step("readdir", path)
            node = self._node(path, fh)
            nodes = self.model.nodes
            entries = [(".", node.ino), ("..", node.ino), *node.entries.items()]
            return [(name, {"st_ino": ino, "st_mode": nodes[ino].mode}, 0) for name, ino in entries]

    def opendir(self, path: str) -> int:
        with self.mutex:
            self._step("opendir", path)
            return self.model.lookup(path).ino

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self.mutex:
            self._step("create", path)
            node = self.model.new(stat.S_IFREG | stat.S_IMODE(mode))
            self.model.add(path, node)
            return node.ino

    def mkdir(self, path: str, mode: int) -> None:
        with self.mutex:
            self._step("mkdir", path)
            self.model.add(path, self.model.new(stat.S_IFDIR | stat.S_IMODE(mode)))

    def symlink(self, target: str, source: str) -> None:
        with self.mutex:
            self._step("create", target)
            node = self.model.new(stat.S_IFLNK | 0o777)
            node.target = source
            self.model.add(target, node)

    def readlink(self, path: str) -> str:
        with self.mutex:
            return self.model.lookup(path).target

    def link(self, target: str, source: str) -> None:
        with self.mutex:
            self._step("create", target)
            self.model.add(target, self.model.lookup(source))

    def unlink(self, path: str) -> None:
        with self.mutex:
            self._step("unlink", path)
            self.model.remove(path)

    rmdir = unlink

    def rename(self, old: str, new: str) -> None:
        with self.mutex:
            self._step("rename", f"{old} -> {new}")
            self.model.rename(old, new)

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            self._step("open", path)
            return self.model.lookup(path).ino

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            self._step("read", path)
            return bytes(self.model.nodes[fh].data[offset : offset + size])

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            self._step("write", path)
            node = self.model.nodes[fh]
            if len(node.data) < offset:
                node.data.extend(bytes(offset - len(node.data)))
            node.data[offset : offset + len(data)] = data
            node.mtime_ns = time.time_ns()
            return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        with self.mutex:
            self._step("write", path)
            node = self._node(path, fh)
            del node.data[length:]
            node.data.extend(bytes(length - len(node.data)))
            node.mtime_ns = time.time_ns()

    def fsync(self, path: str | None, datasync: int, fh: int) -> None:
        with self.mutex:
            self._step("fsync", path)
            self.model.fsync(self.model.nodes[fh])

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> None:
        with self.mutex:
            self._step("fsyncdir", path)
            self.model.fsyncdir(self._node(path, fh))

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        with self.mutex:
            self._step("utimens", path)
            self.model.lookup(path).mtime_ns = times[1] if times else time.time_ns()

    def chmod(self, path: str, mode: int) -> None:
        with self.mutex:
            node = self.model.lookup(path)
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        return None

    def flush(self, path: str | None, fh: int) -> None:
        return None

    def release(self, path: str | None, fh: int) -> None:
        return None

    def releasedir(self, path: str | None, fh: int) -> None:
        return None

    def access(self, path: str, amode: int) -> None:
        with self.mutex:
            self.model.lookup(path)

    def statfs(self, path: str) -> dict[str, int]:
        blocks = 1 << 24
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": blocks, "f_bavail": blocks,
                "f_files": 1 << 20, "f_ffree": 1 << 20, "f_namemax": 255}  # fmt: skip


_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    backing = args.backing.resolve()
    fs = PowerFS(backing, args.seed)
    threading.Thread(target=fs.control, name="control", daemon=True).start()
    mfusepy.FUSE(fs, str(args.mountpoint), foreground=True, nothreads=True, hard_remove=True, use_ino=True)
    with fs.mutex:
        if not fs.dead:
            fs.model.write_out(backing, durable=False)
    say("unmounted")


if __name__ == "__main__":
    main()
