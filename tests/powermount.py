"""Mount tests/powerfs.py for a test, and drive it: arm or make a power cut, unmount."""

from __future__ import annotations

import functools
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType

import pytest

POWERFS = Path(__file__).with_name("powerfs.py")


@functools.cache
def _why_no_fuse() -> str | None:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        return "power-loss tests mount FUSE: they need /dev/fuse and root"
    try:
        import mfusepy  # noqa: F401 - loads libfuse
    except (ImportError, OSError) as exc:
        return f"power-loss tests need mfusepy and libfuse 3 (Debian's fuse3): {exc}"
    with tempfile.TemporaryDirectory() as tmp:  # a container may still refuse the mount itself
        try:
            Mount(Path(tmp, "disk"), Path(tmp, "mnt")).unmount()
        except (OSError, AssertionError, TimeoutError, subprocess.CalledProcessError) as exc:
            subprocess.run(["umount", "-l", str(Path(tmp, "mnt"))], check=False, capture_output=True)
            return f"FUSE cannot be mounted here: {exc}"
    return None


def skip_without_fuse() -> None:
    """Skip where FUSE cannot be mounted: no /dev/fuse, not root, no libfuse 3, or refused."""
    if (why := _why_no_fuse()) is not None:
        pytest.skip(why)


class Mount:
    """`powerfs.py BACKING MOUNTPOINT` as a child process; its answers read by a thread."""

    def __init__(self, backing: Path, mountpoint: Path, seed: int = 0) -> None:
        self.backing, self.mountpoint = backing, mountpoint
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.cut_line: str | None = None  # "fired KIND PATH" once the power was cut
        self.fired = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, str(POWERFS), str(backing), str(mountpoint), "--seed", str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="powerfs-reader", daemon=True)
        self._reader.start()
        self.expect("ready")
        self.mounted = True

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("fired "):
                self.cut_line = line.rstrip("\n")
                self.fired.set()
            else:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str, timeout_s: float = 60) -> str:
        """The next answer, which must start with `prefix`."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"powerfs: no {prefix!r} within {timeout_s} s") from None
        if line is None:
            raise AssertionError(f"powerfs exited ({self.proc.wait()}) before {prefix!r}")
        assert line.startswith(prefix), (line, prefix)
        return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def arm(self, kind: str, n: int, prefix: str = "", mode: str = "lose") -> None:
        """Cut the power at the `n`th `kind` operation from now on a path starting with `prefix`."""
        self.send(f"arm {kind} {n} {prefix or '/'} {mode}")
        self.expect("armed")

    def cut(self, mode: str = "lose") -> None:
        """Cut the power now (if an armed cut has not already)."""
        self.send(f"cut {mode}")
        self.expect("cut")

    def unmount(self) -> None:
        """Unmount (after a cut this only ends the dead mount); the backing directory then holds
        what survived."""
        if not self.mounted:
            return
        self.mounted = False
        umount = shutil.which("fusermount3")
        command = [umount, "-u", "-z", str(self.mountpoint)] if umount else ["umount", "-l", str(self.mountpoint)]
        subprocess.run(command, check=True)
        self.expect("unmounted")
        assert self.proc.wait(60) == 0
        self._close()

    def _close(self) -> None:
        self._reader.join(60)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.mounted:
            self.mounted = False
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
            self.proc.kill()
            self.proc.wait()
            self._close()
