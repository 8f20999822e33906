"""The measured choice: `model.runtime = "auto"` and `model.precision = "auto"` on a CPU are
decided by timing the candidates on this machine, never from its flags.

The candidates are every runtime x precision the table (daemon.runtimes.specs) lists for CPUs,
x the layouts of device processes x threads over the cores, at the daemon's batch size, on the
letterboxed shape of real images (the calibration set's, else two photos shipped with
Ultralytics). Each (runtime, precision) is first checked by the accuracy gate against PyTorch
fp32 on those images; each layout is then timed for `TIME_S`, all its processes at once. The
fastest that passed wins. A candidate whose package is missing, whose precision the CPU plugin
does not offer, or that has no calibration images is listed with the reason, not timed.

It runs in the exporter's child process (python -m daemon.tuning tune) and exports what it
times into the model cache; the choice is cached beside them as `tuned-<digest>.json`, keyed by
the weights, imgsz, batch, the CPU's model name, flags and cores, every runtime's version and
the calibration set: a later start reads it and measures nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, Precision, Runtime
from daemon.messages import Go, LoadCandidate, Loaded, LoadFailed, Timed, TuneStarted, refuse
from daemon.runtimes import cache
from daemon.runtimes.specs import SPECS, cpu_field, importable
from daemon.tuning import gate
from daemon.tuning.int8 import quantize

SCHEMA = 1
TIME_S = 1.0  # per timed layout; a first batch warms up, not counted
BUDGET_S = 60.0  # the most a first start spends measuring (exports aside); what is left untimed says so
MAX_PROCESSES = 4


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a candidate and what became of it."""

    runtime: str
    precision: str
    layout: str = ""  # "processes x threads"
    batch: int = 0
    img_s: float | None = None
    gate: str = ""  # "matched/reference" against PyTorch fp32
    note: str = ""  # why it was not timed, or "chosen"


@dataclass(frozen=True, slots=True)
class Choice:
    runtime: str
    precision: str
    processes: int
    threads: int
    batch: int
    table: list[Row] = field(default_factory=list)
    tune_s: float = 0.0
    skipped: str = ""  # why nothing was measured (CUDA devices)

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, data: dict[str, Any]) -> Choice:
        return cls(**{**data, "table": [Row(**r) for r in data["table"]]})


def describe(row: Row) -> str:
    """A table row as one line: "openvino int8 1x2 b8: 33.5 img/s, gate 12/12 (chosen)"."""
    head = " ".join(x for x in (row.runtime, row.precision, row.layout, f"b{row.batch}" if row.batch else "") if x)
    figures = [f"{row.img_s} img/s" if row.img_s is not None else "", f"gate {row.gate}" if row.gate else ""]
    tail = ", ".join(f for f in figures if f)
    return head + (f": {tail}" if tail else "") + (f" ({row.note})" if row.note else "")


def key(request: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the choice."""
    versions: dict[str, str | None] = {}
    for name in [*(s.distribution for s in SPECS.values()), "nncf", "ultralytics"]:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    flags = " ".join(sorted(cpu_field("flags").split()))
    return {
        "schema": SCHEMA,
        "weights_sha256": cache.file_digest(Path(request["weights"])),
        "imgsz": request["imgsz"],
        "max_batch": request["max_batch"],
        "layout": [request["cpu_workers"], request["torch_threads"]],
        "cpu": cpu_field("model name"),
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "cores": len(os.sched_getaffinity(0)),
        "devices": request["devices"],
        "versions": versions,
        "calibration_sha256": cache.set_digest(tuple(Path(p) for p in request["calibration"])),
    }


def path(cache_dir: Path, k: dict[str, Any]) -> Path:
    return cache_dir / f"tuned-{hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:20]}.json"


def cached(request: dict[str, Any]) -> Choice | None:
    """The choice measured before for this request's key, if any (no child process, no torch)."""
    if not Path(request["weights"]).is_file():
        return None
    k = key(request)
    try:
        data = json.loads(path(Path(request["cache_dir"]), k).read_text())
        return Choice.load(data["choice"]) if data["key"] == k else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def candidates(calibration: tuple[Path, ...]) -> list[tuple[Runtime, Precision, str]]:
    """Every (runtime, precision) the table lists for CPUs, with why it cannot run here ("" if it can)."""
    out = []
    for spec in sorted(SPECS.values(), key=lambda s: s.runtime is Runtime.TORCH):  # the baseline last
        for precision in sorted(spec.precisions.get("cpu", ()), key=lambda p: p.value):
            out.append((spec.runtime, precision, _unavailable(spec.runtime, precision, calibration)))
    return out


def _unavailable(runtime: Runtime, precision: Precision, calibration: tuple[Path, ...]) -> str:
    spec = SPECS[runtime]
    if not spec.installed():
        return f"package {spec.distribution} not installed"
    if precision is Precision.INT8:
        if not calibration:
            return "no model.calibration images"
        if not importable("nncf"):
            return "package nncf not installed (pip install 'inferd[int8]')"
    if runtime is Runtime.OPENVINO and precision in (Precision.BF16, Precision.INT8):
        from daemon.runtimes.openvino import capabilities

        if precision.value.upper() not in capabilities():
            return f"OpenVINO's CPU plugin offers no {precision.value.upper()} on this CPU"
    return ""


def layouts(cores: int, workers: int, threads: int) -> list[tuple[int, int]]:
    """(processes, threads) to try: one process with every core, one per core, and between."""
    if workers or threads:
        p = workers or max(1, cores // max(threads, 1))
        return [(p, threads or max(1, cores // p))]
    counts = sorted({1, min(cores, MAX_PROCESSES), *([2] if cores >= 4 else [])})
    return [(p, max(1, cores // p)) for p in counts]


def tune(request: dict[str, Any], say: Any) -> Choice:
    """Measure, choose, cache the choice (see the module doc). `say(record)` reports progress."""
    began = time.monotonic()
    cache_dir, k = Path(request["cache_dir"]), key(request)
    if _has_cuda(request["devices"]):
        choice = Choice("", "", 0, 0, 0, skipped="CUDA devices: nothing measured (runtimes.specs.AUTO_ORDER)")
        return _store(cache_dir, k, choice)
    say(TuneStarted())
    cores = len(os.sched_getaffinity(0))
    plans = layouts(cores, request["cpu_workers"], request["torch_threads"])
    pool = Pool(max(p for p, _ in plans))  # they import torch while the candidates export
    try:
        table, passed, items = _gate_all(request, cores)
        table += _time_all(pool, passed, plans, request, items[0], time.monotonic())
    finally:
        pool.close()
    timed = [r for r in table if r.img_s is not None]
    if not timed:
        raise ConfigError("model.runtime", "no candidate passed here: " + "; ".join(map(describe, table)),
                          'set model.runtime = "torch"')  # fmt: skip
    best = max(timed, key=lambda r: r.img_s or 0.0)
    processes, threads = (int(x) for x in best.layout.split("x"))
    table = [Row(**{**asdict(r), "note": "chosen"}) if r is best else r for r in table]
    choice = Choice(best.runtime, best.precision, processes, threads, best.batch, table,
                    round(time.monotonic() - began, 1))  # fmt: skip
    return _store(cache_dir, k, choice)


def _gate_all(request: dict[str, Any], cores: int) -> tuple[list[Row], list[tuple[Runtime, Precision, str]], list[Any]]:
    """Export every candidate that can run here and check it against PyTorch fp32: the rows of
    those that cannot or fail, the ones that passed (with their figures), the gate's images."""
    weights, imgsz, batch = request["weights"], request["imgsz"], request["max_batch"]
    cache_dir = Path(request["cache_dir"])
    calibration = tuple(Path(p) for p in request["calibration"])
    images = gate.split(calibration)[1] if calibration else gate.sample_photos()
    ref = gate.runner(weights, "torch", "fp32", imgsz=imgsz, max_batch=batch, cache_dir=cache_dir, threads=cores)
    items = gate.prepare(images, imgsz, classify=ref.head.task.value == "classify")
    reference = gate.detections(ref, items)
    del ref
    table: list[Row] = []
    passed: list[tuple[Runtime, Precision, str]] = []
    for runtime, precision, why in candidates(calibration):
        if why:
            table.append(Row(runtime.value, precision.value, note=why))
            continue
        try:
            plan = cache.ensure(weights, imgsz=imgsz, max_batch=batch, runtime=runtime, precision=precision,
                                device="cpu", cache_dir=cache_dir, calibration=calibration,
                                quantize=quantize)  # fmt: skip
            r = gate.runner(plan.artefact, runtime.value, precision.value, imgsz=imgsz, max_batch=batch,
                            cache_dir=cache_dir, threads=cores)  # fmt: skip
            result = gate.score(gate.detections(r, items), reference)
            del r
        except gate.GateFailed as exc:  # INT8 on its held-out images
            table.append(Row(runtime.value, precision.value, note=f"below the accuracy gate: {exc}"[:400]))
            continue
        except (cache.ExportError, ConfigError) as exc:
            table.append(Row(runtime.value, precision.value, note=f"cannot run: {exc}"[:400]))
            continue
        figures = f"{result.matched}/{result.reference}"
        if not result.passed:
            table.append(Row(runtime.value, precision.value, gate=figures, note="below the accuracy gate"))
            continue
        passed.append((runtime, precision, figures))
    return table, passed, items


def _store(cache_dir: Path, k: dict[str, Any], choice: Choice) -> Choice:
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = path(cache_dir, k)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"key": k, "choice": choice.describe()}, indent=1))
    os.replace(tmp, target)
    return choice


def _has_cuda(devices: list[str]) -> bool:
    if any(d.startswith("cuda") for d in devices):
        return True
    if devices != ["auto"]:
        return False
    import torch

    return bool(torch.cuda.device_count())


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

    def rate(self, processes: int, load: dict[str, Any]) -> float:
        """img/s of `processes` of them running the candidate at once."""
        conns = [c for _, c in self.members[:processes]]
        for c in conns:
            c.send(LoadCandidate(load))
        errors = [answer for c in conns if not isinstance(answer := c.recv(), Loaded)]
        if errors:
            raise RuntimeError(errors[0].message if isinstance(errors[0], LoadFailed) else repr(errors[0]))
        for c in conns:
            c.send(Go(TIME_S))
        answers = [c.recv() for c in conns]
        return float(sum(a.images / a.seconds for a in answers))

    def close(self) -> None:
        for proc, c in self.members:
            with contextlib.suppress(OSError):
                c.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _time_all(pool: Pool, passed: list[tuple[Runtime, Precision, str]], plans: list[tuple[int, int]],
              request: dict[str, Any], item: Any, started: float) -> list[Row]:  # fmt: skip
    """Every passing candidate in every layout, until the budget is spent: layout by layout, so
    that a slow machine still times every candidate once (one process with every core first)."""
    rows: list[Row] = []
    batch = request["max_batch"]
    for processes, threads in plans:  # every candidate in the first layout before any in the next
        for runtime, precision, figures in passed:
            row = Row(runtime.value, precision.value, f"{processes}x{threads}", batch, gate=figures)
            if time.monotonic() - started > BUDGET_S - 2 * TIME_S - 3:
                rows.append(Row(**{**asdict(row), "note": f"not timed: the {BUDGET_S:.0f} s budget is spent"}))
                continue
            load = {**request, "runtime": runtime.value, "precision": precision.value, "threads": threads,
                    "image": item.image}  # fmt: skip
            try:
                rows.append(Row(**{**asdict(row), "img_s": round(pool.rate(processes, load), 2)}))
            except RuntimeError as exc:  # it would not load in a timing process
                rows.append(Row(**{**asdict(row), "note": f"cannot run: {exc}"[:400]}))
    return rows


def _load(arg: dict[str, Any]) -> tuple[Any, Any, int]:
    """A candidate's Runner with a batch of one real image in its slot, warmed up."""
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
    r.run(batch)  # warm: the first run at a shape allocates
    return r, batch, n


def _timer(conn: Connection) -> None:
    """A timing process: load a candidate, then run batches of one real image for the time asked."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as a device process runs
    r: Any = None
    batch: Any = None
    n = 0
    while (message := conn.recv()) is not None:
        match message:
            case LoadCandidate(request):
                r = None
                try:
                    r, batch, n = _load(request)
                except Exception as exc:  # noqa: BLE001 - reported as this candidate's row, the others go on
                    conn.send(LoadFailed(f"{type(exc).__name__}: {exc}", True))
                    continue
                conn.send(Loaded())
            case Go(seconds) if r is not None:
                done, t0 = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - t0) < seconds:
                    r.run(batch)
                    done += n
                conn.send(Timed(done, elapsed))
            case _:
                refuse(message, "a timing process")
