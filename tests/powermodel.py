"""The model behind tests/powerfs.py: a tree in memory as processes see it, and what a disk holds.

No FUSE here. `Model` keeps every file's bytes and every directory's entries as the page cache
would, and beside them the disk's: a file's bytes as last fsynced, each directory's entries as
last made durable, and the directory changes (create, mkdir, link, unlink, rmdir, rename) not yet
durable, in order. `fsyncdir` and `cut` decide what of those reaches the disk (see powerfs.py);
`write_out` writes either view to a real directory.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
                raise _error(errno.ENOTDIR)
            ino = node.entries.get(part)
            if ino is None:
                raise _error(errno.ENOENT)
            node = self.nodes[ino]
        return node

    def parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        return self.lookup(head or "/"), name

    def add(self, path: str, node: Node) -> None:
        directory, name = self.parent(path)
        if name in directory.entries:
            raise _error(errno.EEXIST)
        directory.entries[name] = node.ino
        node.links += 1
        self.pending.append((frozenset({directory.ino}), ("set", directory.ino, name, node.ino)))

    def remove(self, path: str) -> None:
        directory, name = self.parent(path)
        node = self.lookup(path)
        if stat.S_ISDIR(node.mode) and node.entries:
            raise _error(errno.ENOTEMPTY)
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
                raise _error(errno.ENOTEMPTY)
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


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))
