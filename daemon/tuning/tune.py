"""The measured choice: `model.runtime = "auto"` and `model.precision = "auto"` on a CPU are
decided by timing the candidates on this machine, never from its flags.

The candidates are every runtime x precision the table (daemon.runtimes.specs) lists for CPUs,
x the layouts of device processes x threads over the cores, x the batch sizes (timing.batches:
pipeline.max_batch, half of it, 1), on the letterboxed shape of real images (the calibration
set's, else two photos shipped with Ultralytics). Each (runtime, precision) is first checked by
the accuracy gate against PyTorch fp32 on those images; each layout is then loaded once and timed
at each batch size for `TIME_S`, all its processes at once (daemon.tuning.timing). The fastest
that passed wins; the daemon's devices then take batches of at most its batch size. A candidate
whose package is missing, whose precision the CPU plugin does not offer, or that has no
calibration images is listed with the reason, not timed.

It runs in the exporter's child process (python -m daemon.tuning tune) and exports what it
times into the model cache; the choice is cached beside them as `tuned-<digest>.json`, keyed by
the weights, imgsz, max batch, the CPU's model name, flags and cores, every runtime's version and
the calibration set: a later start reads it and measures nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, Precision, Runtime
from daemon.messages import TuneStarted
from daemon.runtimes import cache
from daemon.runtimes.specs import SPECS, cpu_field, importable
from daemon.tuning import gate
from daemon.tuning.int8 import quantize
from daemon.tuning.timing import TIME_S, Pool, batches

SCHEMA = 2  # 2: the batch size is a dimension of the search
BUDGET_S = 60.0  # the most a first start spends measuring (exports aside); what is left untimed says so
MAX_PROCESSES = 4


@dataclass(frozen=True, slots=True)
class Timing:
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
    table: list[Timing] = field(default_factory=list)
    tune_s: float = 0.0
    skipped: str = ""  # why nothing was measured (CUDA devices)

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, data: dict[str, Any]) -> Choice:
        return cls(**{**data, "table": [Timing(**r) for r in data["table"]]})


def describe(row: Timing) -> str:
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
    table = [Timing(**{**asdict(r), "note": "chosen"}) if r is best else r for r in table]
    choice = Choice(best.runtime, best.precision, processes, threads, best.batch, table,
                    round(time.monotonic() - began, 1))  # fmt: skip
    return _store(cache_dir, k, choice)


def _gate_all(
    request: dict[str, Any], cores: int
) -> tuple[list[Timing], list[tuple[Runtime, Precision, str]], list[Any]]:
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
    table: list[Timing] = []
    passed: list[tuple[Runtime, Precision, str]] = []
    for runtime, precision, why in candidates(calibration):
        if why:
            table.append(Timing(runtime.value, precision.value, note=why))
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
            table.append(Timing(runtime.value, precision.value, note=f"below the accuracy gate: {exc}"[:400]))
            continue
        except (cache.ExportError, ConfigError) as exc:
            table.append(Timing(runtime.value, precision.value, note=f"cannot run: {exc}"[:400]))
            continue
        figures = f"{result.matched}/{result.reference}"
        if not result.passed:
            table.append(Timing(runtime.value, precision.value, gate=figures, note="below the accuracy gate"))
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


def _time_all(pool: Pool, passed: list[tuple[Runtime, Precision, str]], plans: list[tuple[int, int]],
              request: dict[str, Any], item: Any, started: float) -> list[Timing]:  # fmt: skip
    """Every passing candidate in every layout at every batch size, until the budget is spent:
    layout by layout, so that a slow machine still times every candidate once (one process with
    every core first), and per load the largest batch first (the daemon's max_batch)."""
    rows: list[Timing] = []
    sizes = batches(request["max_batch"])
    spent = f"not timed: the {BUDGET_S:.0f} s budget is spent"
    for processes, threads in plans:  # every candidate in the first layout before any in the next
        for runtime, precision, figures in passed:
            row = Timing(runtime.value, precision.value, f"{processes}x{threads}", gate=figures)
            if _over(started):
                rows += [Timing(**{**asdict(row), "batch": b, "note": spent}) for b in sizes]
                continue
            load = {**request, "runtime": runtime.value, "precision": precision.value, "threads": threads,
                    "image": item.image}  # fmt: skip
            try:
                pool.load(processes, load)
            except RuntimeError as exc:  # it would not load in a timing process
                rows.append(Timing(**{**asdict(row), "note": f"cannot run: {exc}"[:400]}))
                continue
            for b in sizes:
                timed = _over(started)
                rate = None if timed else round(pool.rate(processes, b), 2)
                rows.append(Timing(**{**asdict(row), "batch": b, "img_s": rate, "note": spent if timed else ""}))
    return rows


def _over(started: float) -> bool:
    """Whether another timing (a warm-up batch and TIME_S) would overrun the budget."""
    return time.monotonic() - started > BUDGET_S - 2 * TIME_S - 3
