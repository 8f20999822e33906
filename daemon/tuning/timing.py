"""Timing the candidates: spawned processes that load one candidate each, all at once, then run
batches of one real image for `TIME_S` per batch size.

A candidate is loaded once per layout (processes x threads) and timed at every batch size of
`batches(max_batch)` from that one load (the exported artefacts are dynamic in batch up to
max_batch): a batch size costs `TIME_S` and one warm-up batch, not a load.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from daemon.config import Precision, Runtime
from daemon.messages import Go, LoadCandidate, Loaded, LoadFailed, Timed, refuse
from daemon.runtimes import cache
from daemon.tuning import gate
from daemon.tuning.int8 import quantize

TIME_S = 1.0  # per timed (layout, batch size); a first batch at that size warms up, not counted


def batches(max_batch: int) -> list[int]:
    """The batch sizes timed, largest first: pipeline.max_batch, half of it and 1 (at most three,
    so the search grows by two timings per load, not by a factor)."""
    return sorted({max_batch, max(1, max_batch // 2), 1}, reverse=True)


class Pool:
    """Spawned timing processes, each answering LoadCandidate and Go (`daemon.messages`)."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.members: list[tuple[Any, Connection]] = []
        for _ in range(size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_timer, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.members.append((proc, ours))

    def load(self, processes: int, load: dict[str, Any]) -> None:
        """The candidate loaded and warmed up in the first `processes` of them; RuntimeError if not."""
        conns = [c for _, c in self.members[:processes]]
        for c in conns:
            c.send(LoadCandidate(load))
        errors = [answer for c in conns if not isinstance(answer := c.recv(), Loaded)]
        if errors:
            raise RuntimeError(errors[0].message if isinstance(errors[0], LoadFailed) else repr(errors[0]))

    def rate(self, processes: int, batch: int) -> float:
        """img/s of `processes` of them running batches of `batch` images at once (after `load`)."""
        conns = [c for _, c in self.members[:processes]]
        for c in conns:
            c.send(Go(TIME_S, batch))
        answers = [c.recv() for c in conns]
        return float(sum(a.images / a.seconds for a in answers))

    def close(self) -> None:
        for proc, c in self.members:
            with contextlib.suppress(OSError):
                c.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _load(arg: dict[str, Any]) -> tuple[Any, Any]:
    """A candidate's Runner with max_batch copies of one real image in its slot, warmed up."""
    import numpy as np

    from daemon.messages import Batch

    runtime, precision = Runtime(arg["runtime"]), Precision(arg["precision"])
    calibration = tuple(Path(p) for p in arg["calibration"])
    plan = cache.ensure(arg["weights"], imgsz=arg["imgsz"], max_batch=arg["max_batch"], runtime=runtime,
                        precision=precision, device="cpu", cache_dir=Path(arg["cache_dir"]),
                        calibration=calibration, quantize=quantize)  # fmt: skip
    r = gate.runner(plan.artefact, runtime.value, precision.value, imgsz=arg["imgsz"], max_batch=arg["max_batch"],
                    cache_dir=Path(arg["cache_dir"]), threads=arg["threads"])  # fmt: skip
    image, n = arg["image"], arg["max_batch"]
    h, w = image.shape[:2]
    view = np.frombuffer(r.buffer, dtype=np.uint8, count=n * h * w * 3)
    view.reshape(n, h, w, 3)[:] = image
    del view
    batch = Batch(0, 0, n, h, w, [(1.0, 1.0, 0, 0, w, h)] * n, 0.25, 0.7)
    return r, batch


def _timer(conn: Connection) -> None:
    """A timing process: load a candidate, then run batches of one real image for the time asked."""
    import msgspec

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as a device process runs
    r: Any = None
    full: Any = None
    while (message := conn.recv()) is not None:
        match message:
            case LoadCandidate(request):
                r = None
                try:
                    r, full = _load(request)
                except Exception as exc:  # noqa: BLE001 - reported as this candidate's row, the others go on
                    conn.send(LoadFailed(f"{type(exc).__name__}: {exc}", True))
                    continue
                conn.send(Loaded())
            case Go(seconds, n) if r is not None:
                batch = msgspec.structs.replace(full, n=n, metas=full.metas[:n])
                r.run(batch)  # warm: the first run at a shape allocates
                done, t0 = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - t0) < seconds:
                    r.run(batch)
                    done += n
                conn.send(Timed(done, elapsed))
            case _:
                refuse(message, "a timing process")
