"""OS names for the daemon's threads, so that `top -H`, `ps -L` and the bench's CPU accounting
by stage (/proc/<pid>/task/<tid>/comm) tell them apart: Python 3.11 names threads for itself only."""

from __future__ import annotations

import contextlib
import threading


def name_os_thread(name: str, thread: threading.Thread | None = None) -> None:
    """Give `thread` (default: the calling one, as a pool's `initializer`) the OS name `name`
    (the kernel keeps 15 bytes). Nothing happens where /proc cannot be written: a name is only
    a label."""
    tid = (thread or threading.current_thread()).native_id
    with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm", "w") as comm:
        comm.write(name[:15])
