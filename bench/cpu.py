"""The daemon's CPU time by what its threads do, read from /proc (Linux).

The daemon names its threads for the OS (daemon/threads.py): the event loop is the main thread,
`preprocess` the decode pool, `io` asyncio's default executor (aiofiles, `to_thread`: result
writes, slot fills, claims), `log` the log writer, `database` the database sink. A `sample` at
the start and one at the end of a run give each group's CPU; what no named thread accounts for
(unnamed threads, threads that ended) is `other`, so the groups add up to the process's total.
The device processes (the daemon's spawned children) are summed apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
GROUPS = {"preprocess": "decode", "io": "io", "log": "log", "database": "database"}  # OS name -> group
ORDER = ("loop", "decode", "io", "log", "database", "other")


@dataclass(frozen=True, slots=True)
class Sample:
    pid: int  # also the id of its main thread, the event loop's
    process_s: float  # user + system CPU of every thread of the process, ended ones included
    threads: dict[int, tuple[str, float]]  # live thread id -> (OS name, its CPU s)
    devices_s: dict[int, float]  # device process pid -> its CPU s


def sample(pid: int) -> Sample:
    """The CPU of process `pid`, of each of its threads and of its device processes, now."""
    root = Path(f"/proc/{pid}")
    threads: dict[int, tuple[str, float]] = {}
    children: set[int] = set()
    for task in root.glob("task/*"):
        try:
            threads[int(task.name)] = ((task / "comm").read_text().strip(), _cpu_s(task / "stat"))
            children.update(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue  # the thread ended between the listing and the read
    devices: dict[int, float] = {}
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():  # not the resource tracker
                devices[child] = _cpu_s(Path(f"/proc/{child}/stat"))
        except (OSError, ValueError):
            continue
    return Sample(pid, _cpu_s(root / "stat"), threads, devices)


def _cpu_s(stat: Path) -> float:
    """utime + stime of a /proc stat file (fields 14 and 15; the name in brackets may hold spaces)."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def usage(before: Sample, after: Sample, images: int) -> dict[str, object]:
    """Main-process CPU ms per image between the two samples, total and by group; the device
    processes' ms per image; the number of threads in each group at the end."""
    groups = dict.fromkeys(ORDER, 0.0)
    threads = dict.fromkeys(ORDER, 0)
    for tid, (name, cpu_s) in after.threads.items():
        group = "loop" if tid == after.pid else GROUPS.get(name, "other")
        threads[group] += 1
        if group != "other":
            groups[group] += cpu_s - before.threads.get(tid, ("", 0.0))[1]
    total = after.process_s - before.process_s
    groups["other"] = total - sum(groups.values())
    devices = sum(s - before.devices_s.get(pid, 0.0) for pid, s in after.devices_s.items())
    per_image = 1000 / images
    return {
        "main_ms_per_image": total * per_image,
        "by_stage_ms_per_image": {k: v * per_image for k, v in groups.items()},
        "threads": threads,
        "device_processes": len(after.devices_s),
        "device_ms_per_image": devices * per_image,
        "tick_ms": TICK_S * 1000,  # the kernel counts CPU time in these steps, per thread
    }
