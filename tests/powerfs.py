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
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mfusepy

ROOT = 1
Effect = tuple[Any, ...]  # ("set", dir, name, ino) | ("del", dir, name, ino) | ("move", d1, n1, d2, n2, ino)


@dataclass(slots=True)
class Node:
    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)
    entries: dict[str, int] = field(default_factory=dict)  # a directory's, as processes see them
    target: str = ""  # a symlink's
    links: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)


class Model:
    """The tree as processes see it, and what the disk holds; no FUSE here."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, stat.S_IFDIR | 0o755)}
        self.disk_data: dict[int, bytes] = {}  # a file's bytes as last fsynced
        self.disk_dirs: dict[int, dict[str, int]] = {ROOT: {}}  # a directory's entries on the disk
        self.pending: list[tuple[frozenset[int], Effect]] = []  # directory changes not yet on the disk
        self._next = ROOT + 1

    def load(self, backing: Path) -> None:
        """Take `backing` as the disk's content: all of it is durable."""
        seen: dict[int, int] = {}
        stack = [(backing, ROOT)]
        while stack:
            directory, ino = stack.pop()
            for entry in os.scandir(directory):
                st = entry.stat(follow_symlinks=False)
                child = seen.get(st.st_ino)
                if child is None:
                    node = self.new(st.st_mode)
                    node.mtime_ns = st.st_mtime_ns
                    seen[st.st_ino] = child = node.ino
                    if stat.S_ISDIR(st.st_mode):
                        self.disk_dirs[child] = {}
                        stack.append((Path(entry.path), child))
                    elif stat.S_ISLNK(st.st_mode):
                        node.target = os.readlink(entry.path)
                    else:
                        node.data = bytearray(Path(entry.path).read_bytes())
                        self.disk_data[child] = bytes(node.data)
                self.nodes[ino].entries[entry.name] = child
                self.nodes[child].links += 1
                self.disk_dirs[ino][entry.name] = child

    def new(self, mode: int) -> Node:
        node = Node(self._next, mode)
        self.nodes[node.ino] = node
        self._next += 1
        return node

    def lookup(self, path: str) -> Node:
        node = self.nodes[ROOT]
        for part in path.strip("/").split("/") if path.strip("/") else ():
            if not stat.S_ISDIR(node.mode):
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            ino = node.entries.get(part)
            if ino is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            node = self.nodes[ino]
        return node

    def parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        return self.lookup(head or "/"), name

    def add(self, path: str, node: Node) -> None:
        directory, name = self.parent(path)
        if name in directory.entries:
            raise mfusepy.FuseOSError(errno.EEXIST)
        directory.entries[name] = node.ino
        node.links += 1
        self.pending.append((frozenset({directory.ino}), ("set", directory.ino, name, node.ino)))

    def remove(self, path: str) -> None:
        directory, name = self.parent(path)
        node = self.lookup(path)
        if stat.S_ISDIR(node.mode) and node.entries:
            raise mfusepy.FuseOSError(errno.ENOTEMPTY)
        del directory.entries[name]
        node.links -= 1
        self.pending.append((frozenset({directory.ino}), ("del", directory.ino, name, node.ino)))

    def rename(self, old: str, new: str) -> None:
        source, old_name = self.parent(old)
        target, new_name = self.parent(new)
        node = self.lookup(old)
        replaced = target.entries.get(new_name)
        if replaced == node.ino:
            return
        if replaced is not None:  # replaced as one step with the rename: the disk never has neither
            if self.nodes[replaced].entries:
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            self.nodes[replaced].links -= 1
        del source.entries[old_name]
        target.entries[new_name] = node.ino
        effect = ("move", source.ino, old_name, target.ino, new_name, node.ino)
        self.pending.append((frozenset({source.ino, target.ino}), effect))

    def fsync(self, node: Node) -> None:
        self.disk_data[node.ino] = bytes(node.data)

    def fsyncdir(self, node: Node) -> None:
        """Persist every pending change that touched this directory, and every earlier one that
        touched the same file or directory as a change persisted (the disk sees each file's and
        each directory's changes in order); in order."""
        needed, persist = {node.ino}, set()
        for i in range(len(self.pending) - 1, -1, -1):
            keys = self._keys(*self.pending[i])
            if keys & needed:
                persist.add(i)
                needed |= keys
        for i in sorted(persist):
            self._apply(self.pending[i][1])
        self.pending = [p for i, p in enumerate(self.pending) if i not in persist]

    def cut(self, reorder: random.Random | None) -> None:
        """The power goes: pending changes are lost. With `reorder`, each may have been written
        back by a coin toss, unless an earlier change to the same file or directory was not."""
        lost: set[int] = set()
        for touched, effect in self.pending:
            keys = self._keys(touched, effect)
            if reorder is not None and not keys & lost and reorder.random() < 0.5:
                self._apply(effect)
            else:
                lost |= keys
        self.pending = []

    def _keys(self, touched: frozenset[int], effect: Effect) -> frozenset[int]:
        """What orders a change: the directories it touched, and the file it named. Not a
        directory it named: its entry in its parent is not ordered with the entries in it."""
        named = effect[-1]
        return touched if stat.S_ISDIR(self.nodes[named].mode) else touched | {named}

    def _apply(self, effect: Effect) -> None:
        if effect[0] == "move":
            _, d1, n1, d2, n2, ino = effect
            self._apply(("del", d1, n1, ino))
            self._apply(("set", d2, n2, ino))
        elif effect[0] == "set":
            self.disk_dirs.setdefault(effect[1], {})[effect[2]] = effect[3]
        elif self.disk_dirs.get(effect[1], {}).get(effect[2]) == effect[3]:
            del self.disk_dirs[effect[1]][effect[2]]

    def write_out(self, backing: Path, *, durable: bool) -> None:
        """Replace `backing`'s content by the disk's (`durable`) or by the tree processes saw."""
        for entry in os.scandir(backing):
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
        written: dict[int, Path] = {}
        stack = [(ROOT, backing)]
        while stack:
            ino, directory = stack.pop()
            entries = self.disk_dirs.get(ino, {}) if durable else self.nodes[ino].entries
            for name, child in entries.items():
                node, path = self.nodes[child], directory / name
                if child in written:
                    os.link(written[child], path)
                elif stat.S_ISDIR(node.mode):
                    path.mkdir()
                    stack.append((child, path))
                elif stat.S_ISLNK(node.mode):
                    os.symlink(node.target, path)
                else:
                    path.write_bytes(self.disk_data.get(child, b"") if durable else bytes(node.data))
                    os.chmod(path, stat.S_IMODE(node.mode))
                    os.utime(path, ns=(node.mtime_ns, node.mtime_ns))
                    written[child] = path


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
