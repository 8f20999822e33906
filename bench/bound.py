"""The bound: the daemon's own `model.Runner` (forward + NMS) on ready letterboxed tensors, one
process per device process of the daemon, all at once: no decode, no I/O, the ceiling."""

from __future__ import annotations

import asyncio
import mmap
import multiprocessing
import time
from pathlib import Path, PurePosixPath
from typing import Any

from bench import BenchError, rate, torch_device
from daemon import export, progress
from daemon.config import Config, Precision, Runtime

SINGLE_IMAGE_RUNS = 20  # batch-1 Runner calls; the median is the single-image model time


def measure_runner(images: list[Path], config: Config, devices: list[str]) -> dict[str, Any]:
    """The daemon's own Runner on ready letterboxed tensors, in batches of max_batch: one process
    per device process the daemon runs, with its threads, all at once (on a CPU the daemon runs
    several). Then, alone, the median batch-1 time: the single-image model time."""
    from daemon.local import torch_threads

    threads = torch_threads(config, devices)
    ctx = multiprocessing.get_context("spawn")
    start, finish = ctx.Barrier(len(devices)), ctx.Barrier(len(devices))
    answers: multiprocessing.SimpleQueue[dict[str, Any]] = ctx.SimpleQueue()
    procs = [
        ctx.Process(
            target=_runner_loop, args=(config, torch_device(d), threads, images, start, finish, answers, i == 0)
        )
        for i, d in enumerate(devices)
    ]
    for proc in procs:
        proc.start()
    progress.note(f"bound: {len(procs)} Runner processes, {len(images)} images each, load and warm-up included")
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise BenchError(f"bound: a Runner process failed (exit codes {[proc.exitcode for proc in procs]})")
    loops = [answers.get() for _ in procs]
    (first,) = [a for a in loops if "single_image_ms" in a]
    total = sum(a["images"] for a in loops)
    return rate(
        total,
        max(a["seconds"] for a in loops),  # they started together: the longest is the wall time
        threads=f"{len(devices)}x{threads}",
        input_shape=first["input_shape"],
        single_image_ms=first["single_image_ms"],
        runtime=first["runtime"],
        batch=first["batch"],
    )


def variants(devices: list[str], calibration: tuple[Path, ...] = ()) -> list[tuple[Runtime, Precision]]:
    """Every runtime and precision the bench's devices can run here (the table's, installed)."""
    from daemon.runtimes import SPECS
    from daemon.tuning import tune

    if any(d.startswith("cuda") for d in devices):
        return [(s.runtime, p) for s in SPECS.values() if s.installed() for p in sorted(
            s.precisions.get("cuda", ()), key=lambda p: p.value)]  # fmt: skip
    return [(r, p) for r, p, why in tune.candidates(calibration) if not why]


def measure_bounds(
    images: list[Path], config: Config, devices: list[str], *, skip: str, layouts: dict[str, tuple[int, int, int]]
) -> dict[str, dict[str, Any]]:
    """The bound of each runtime and precision but `skip` ("openvino bf16"), each in its fastest
    measured layout and batch size (`layouts`: "openvino fp32" -> (processes, threads, batch)),
    else the daemon's."""
    import dataclasses

    from daemon.local import calibration_images, resolve_devices

    out = {}
    calibration = tuple(Path(p) for p in calibration_images(config))
    for runtime, precision in variants(devices, calibration):
        if f"{runtime.value} {precision.value}" == skip:
            continue
        c = dataclasses.replace(config, model=dataclasses.replace(config.model, runtime=runtime, precision=precision))
        if (layout_of := layouts.get(f"{runtime.value} {precision.value}")) is not None:
            processes, threads, batch = layout_of
            pipeline = dataclasses.replace(c.pipeline, cpu_workers=processes, torch_threads=threads, tuned_batch=batch)
            c = dataclasses.replace(c, pipeline=pipeline)
        layout = asyncio.run(resolve_devices(c))  # the daemon's processes and threads for this runtime
        asyncio.run(export.prepare(c, layout))
        bound = measure_runner(images, c, layout)
        bound.pop("single_image_ms")
        out[bound["runtime"]] = bound
    return out


def _runner_loop(
    config: Config,
    device: str,
    threads: int,
    images: list[Path],
    start: Any,
    finish: Any,
    answers: Any,
    singles: bool,
) -> None:
    """One process of the bound (spawned): load, prepare, wait for the others, time the loop."""
    import msgspec
    import numpy as np

    from daemon import model, preprocess
    from daemon.devices import calibration_images
    from daemon.jobs import Job
    from daemon.messages import Batch, DeviceSpec

    m, p = config.model, config.pipeline
    settings = preprocess.PrepSettings(m.imgsz, p.reduced_decode, p.max_pixels)
    ready = [preprocess.prepare(Job(PurePosixPath(x.name), x), settings) for x in images]
    size = p.device_batch  # the daemon's batches: max_batch, capped by the measured choice's batch size
    chunks = [ready[i : i + size] for i in range(0, len(ready), size)]
    slot_bytes = size * m.imgsz * m.imgsz * 3
    # Every batch in its own slot, filled before the clock starts, page-locked on a GPU as the daemon's are.
    buffer = mmap.mmap(-1, slot_bytes * len(chunks))
    spec = DeviceSpec(
        device=device, weights=m.weights, imgsz=m.imgsz, precision=m.precision.value, max_det=m.max_det,
        torch_threads=threads, log=config.log, slot_bytes=slot_bytes, slots=len(chunks), runtime=m.runtime.value,
        cache_dir=str(config.paths.work / "models"), max_batch=p.max_batch, calibration=calibration_images(config),
    )  # fmt: skip
    runner = model.Runner(spec, buffer)
    batches = []
    for slot, items in enumerate(chunks):
        h, w = items[0].shape
        view = np.frombuffer(buffer, dtype=np.uint8, count=len(items) * h * w * 3, offset=slot * slot_bytes)
        np.stack([x.image for x in items], out=view.reshape(len(items), h, w, 3))
        metas = [(x.gain[0], x.gain[1], x.pad[0], x.pad[1], x.width, x.height) for x in items]
        batches.append(Batch(slot, slot, len(items), h, w, metas, m.conf, m.iou))
    del view

    def timed(todo: list[Batch]) -> float:
        """Runner's launch/finish as the device process runs them: on a GPU the next batch is
        launched before the last one finishes."""
        started = time.perf_counter()
        last = None
        for batch in todo:
            launched = runner.launch(batch)
            if last is not None:
                runner.finish(last)
            last = launched
            if not runner.pipelined:
                runner.finish(last)
                last = None
        if last is not None:
            runner.finish(last)
        return time.perf_counter() - started

    timed(batches[:2])  # warm-up at this shape: the bound is the steady state
    start.wait()
    seconds = timed(batches)
    finish.wait()
    info = runner.info()
    answer = {
        "images": len(ready),
        "seconds": seconds,
        "input_shape": f"{ready[0].shape[1]}x{ready[0].shape[0]}",
        "runtime": f"{info.runtime} {info.precision}",
        "batch": size,
    }
    if singles:  # the others are done: this one is alone on the device
        one = [msgspec.structs.replace(b, n=1, metas=b.metas[:1]) for b in batches]
        timed(one[:1])
        runs = sorted(timed([b]) for b in (one * SINGLE_IMAGE_RUNS)[:SINGLE_IMAGE_RUNS])
        answer["single_image_ms"] = runs[len(runs) // 2] * 1000
    answers.put(answer)
