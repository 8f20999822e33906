"""`inferd bench`: inferd against seed 002's designs and the model's own bound, in one run.

Every mode runs on the same generated JPEGs with the same model, model load excluded:

- naive:   Ultralytics `predict` one image at a time, each .txt written inline (seed 002 before)
- naive_export: the same loop on the artefact the daemon runs (its OpenVINO/TensorRT export), as
           Ultralytics loads it (OpenVINO: compiled with the CPU's default precision and every
           core); skipped when the daemon's runtime is PyTorch
- seed002: the same loop, writes handed to a `Queue(maxsize=200)` and a writer thread (after)
- seed000: seed 000's design: each batch decoded by a `ThreadPoolExecutor().map`, then one
           batched `predict` on the decoded arrays, .txt written inline; batches do not overlap
- bound:   the daemon's `model.Runner` (forward + NMS) on ready letterboxed tensors in batches
           of `max_batch`, one process per device process of the daemon (with its threads), all
           at once: no decode, no I/O, the ceiling. Measured for the daemon's runtime and
           precision, and (`bounds`) for every runtime and precision this machine has; the
           headline `inferd/fastest_bound` compares with the fastest of them
- inferd:  `inferd run --once` as a subprocess, timed from `daemon_started` to the last `image_done`

`--latency` drops files one at a time into a running daemon and times drop -> `image_done`;
`--backlog` fills incoming/ with N files and reads the daemon's peak RSS (VmHWM) at its end.
The report is a plain-text table; `--json PATH` writes the same numbers, `--plot PATH` a chart.
While it runs, a bar per mode on stderr when that is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import multiprocessing
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any

from daemon import export, progress
from daemon.config import DEFAULTS, Config, ConfigError, Precision, Runtime, parse

if TYPE_CHECKING:
    from PIL import Image

MODES = ("naive", "naive_export", "seed002", "seed000", "bound", "inferd")
SEED_QUEUE_SIZE = 200  # seed 002's write queue
NOTES = {
    "naive": "Ultralytics predict per image, .txt written inline",
    "naive_export": "the same on the daemon's export ({runtime} artefact; Ultralytics compiles it its way)",
    "seed002": f"Ultralytics predict per image, .txt via Queue({SEED_QUEUE_SIZE}) + writer thread",
    "seed000": "batches of {max_batch}: ThreadPoolExecutor decode, then batched predict, .txt inline",
    "bound": "Runner forward + NMS on ready tensors, batch {max_batch}, input {shape}, {runtime}, no I/O",
    "inferd": "inferd run --once, daemon_started -> last image_done (threads: torch + decode)",
}
SINGLE_IMAGE_RUNS = 20  # batch-1 Runner calls; the median is the single-image model time
BACKLOG_SIZE = (320, 240)
STALL_TIMEOUT_S = 600.0  # the daemon must log something this often, or the bench gives up
EXIT_TIMEOUT_S = 120.0


class BenchError(Exception):
    """A run did not complete as it must (missing results, bad exit status); no number is reported."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `inferd bench`, on the sub-parser that cli.py made."""
    p.add_argument("--size", type=_size, default=(1920, 1080), help="generated image size WxH (default 1920x1080)")
    p.add_argument("--count", type=_positive(int), default=50, help="images per mode and files dropped by --latency")
    p.add_argument("--weights", default=DEFAULTS["model"]["weights"], help='"default" (embedded), a path or a name')
    p.add_argument("--devices", default="auto", help='"auto", or comma-separated: cpu, cuda:0, ...')
    p.add_argument("--batch", type=int, default=8, help="the daemon's pipeline.max_batch (default 8)")
    p.add_argument("--imgsz", type=int, default=640, help="model input size (default 640)")
    p.add_argument(
        "--decode",
        choices=("auto", "host", "device"),
        default="auto",
        help="the daemon's pipeline.decode (default auto: device on GPUs)",
    )
    p.add_argument(
        "--database",
        default=DEFAULTS["output"]["database"],
        help='the daemon\'s output.database (default: its own, SQLite in the run dir); "" = off, to see its cost',
    )
    p.add_argument("--modes", type=_modes, help=f"comma-separated subset of {','.join(MODES)} (default all)")
    p.add_argument("--latency", action="store_true", help="measure drop -> result latency on a running daemon")
    p.add_argument("--rate", type=_positive(float), default=2.0, help="files/s dropped by --latency (default 2)")
    p.add_argument("--backlog", type=_counts, help="peak RSS with N[,N...] files waiting in incoming/")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary dir, removed)")
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--plot", type=Path, help="also draw the report as a PNG chart to this file")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated images")


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def check(text: str) -> float:
        value = kind(text)  # a ValueError makes argparse say: invalid int/float value
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value

    check.__name__ = kind.__name__
    return check


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH, e.g. 1920x1080")
    return int(w), int(h)


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated subset of {','.join(MODES)}")
    return modes


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(n) for n in text.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use positive counts, e.g. 1000,10000")
    return counts


def main(args: argparse.Namespace) -> int:
    """Run the requested measurements and print the report: 0, 1 when a run failed, 2 for bad options."""
    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="inferd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "ultralytics"))  # before Ultralytics is imported
    try:
        report = measure(args, workdir, parse(daemon_config(workdir, args), base=workdir))
    except ConfigError as exc:
        sys.stderr.write(f"inferd bench: {exc}\n")
        return 2
    except BenchError as exc:
        sys.stderr.write(f"inferd bench: {exc}\n")
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        from daemon import plot

        plot.chart(report, args.plot)
    return 0


def daemon_config(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The raw config of a daemon run whose data dirs live under `root`."""
    weights = str(Path(args.weights).resolve()) if Path(args.weights).exists() else args.weights
    devices = args.devices if args.devices == "auto" else [d.strip() for d in args.devices.split(",")]
    return {
        "paths": {name: str(root / name) for name in DEFAULTS["paths"]},
        "model": {"weights": weights, "imgsz": args.imgsz, "devices": devices},
        "pipeline": {"max_batch": args.batch, "decode": args.decode},
        "output": {"database": args.database},  # a relative sqlite:/// URL lands under `root`
        "log": {"format": "json"},
    }


def measure(args: argparse.Namespace, workdir: Path, config: Config) -> dict[str, Any]:
    """Every measurement asked for, in one process, on one image set: the report as a dict."""
    from daemon import plot
    from daemon.model import ModelError, resolve_weights
    from daemon.workers import cores, resolve_decode, resolve_devices

    try:
        weights = resolve_weights(config.model.weights)
    except ModelError as exc:
        raise BenchError(str(exc)) from None
    devices = asyncio.run(resolve_devices(config))
    config = resolve_decode(config, devices)
    setup = {
        "size": "x".join(map(str, args.size)),
        "count": args.count,
        "weights": weights,
        "devices": devices,
        "baseline_device": _torch_device(devices[0]),  # the baselines run on one device
        "imgsz": config.model.imgsz,
        "max_batch": config.pipeline.max_batch,
        "database": config.output.database.dialect if config.output.database else "off",
        "decode": config.pipeline.decode.value,
        "cpu_cores": cores(),
        "machine": plot.machine(devices),
        "seed": args.seed,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")},
        "loadavg_1min_start": os.getloadavg()[0],  # other work on the machine skews every number
    }
    report: dict[str, Any] = {"setup": setup, "modes": {}}
    results = report["modes"]
    modes = args.modes or (() if args.latency or args.backlog else MODES)
    images = generate(workdir / "images", args.count, args.size, args.seed) if modes or args.latency else []
    exported = {"naive_export", "bound"} & set(modes) or args.latency
    plans = asyncio.run(export.prepare(config, devices)) if exported else []  # once, for every mode
    for mode in ("naive", "naive_export", "seed002"):
        if mode == "naive_export" and (not plans or plans[0].runtime == "torch"):
            continue
        if mode in modes:
            artefact = plans[0].artefact if mode == "naive_export" else None
            results[mode] = predict_loop(
                images, workdir / mode, config, setup["baseline_device"], queued=mode == "seed002", weights=artefact
            )
            if artefact is not None:
                results[mode]["runtime"] = f"{plans[0].runtime} {plans[0].precision}"
    if "seed000" in modes:
        results["seed000"] = predict_batches(images, workdir / "seed000", config, setup["baseline_device"])
    if "bound" in modes or args.latency:
        bound = measure_runner(images, config, devices)
        report["single_image_ms"] = bound.pop("single_image_ms")
        if "bound" in modes:
            results["bound"] = bound
            others = measure_bounds(images, config, devices, skip=bound["runtime"])
            report["bounds"] = {bound["runtime"]: bound, **others}
    if "inferd" in modes:
        results["inferd"] = run_once(daemon_config(workdir / "inferd", args), images, [p.name for p in images])
    if "inferd" in results:
        rate = results["inferd"]["images_per_s"]
        report["ratios"] = {f"inferd/{m}": rate / r["images_per_s"] for m, r in results.items() if m != "inferd"}
        if report.get("bounds"):
            fastest = max(report["bounds"], key=lambda k: report["bounds"][k]["images_per_s"])
            report["fastest_bound"] = fastest
            report["ratios"]["inferd/fastest_bound"] = rate / report["bounds"][fastest]["images_per_s"]
    if args.latency:
        report["latency"] = latency(images, daemon_config(workdir / "latency", args), args.rate)
        report["latency"]["p50_over_single_image"] = report["latency"]["p50_ms"] / report["single_image_ms"]
    if args.backlog:
        report["backlog"] = backlog(workdir, args)
    setup["loadavg_1min_end"] = os.getloadavg()[0]
    return report


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """An image that compresses like a photo: a smooth colour field, shapes and mild sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        dx, dy = int(rng.integers(width // 20, width // 4 + 1)), int(rng.integers(height // 20, height // 4 + 1))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + dx, y + dy), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image)
    out = np.empty_like(pixels)
    for top in range(0, height, 1024):  # in strips: a 2048x12000 image would need GBs of float noise at once
        strip = pixels[top : top + 1024].astype(np.float32)
        strip += rng.standard_normal(strip.shape, dtype=np.float32) * 6
        out[top : top + 1024] = np.clip(strip, 0, 255)
    return Image.fromarray(out)


def generate(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    """`count` distinct photo-like JPEGs (quality 90), made once and shared by every mode; with
    `--workdir`, a later run of the same size and seed finds them there."""
    from concurrent.futures import ThreadPoolExecutor

    from daemon.workers import cores

    folder = folder / f"{size[0]}x{size[1]}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img-{i:05d}.jpg" for i in range(count)]

    def make(i: int) -> None:
        if not paths[i].exists():  # written under another name, then renamed: it exists whole
            tmp = paths[i].with_suffix(".tmp")
            photo_like(*size, seed=seed * 1_000_003 + i).save(tmp, "JPEG", quality=90)
            tmp.rename(paths[i])

    with ThreadPoolExecutor(cores()) as pool:  # NumPy, resizing and encoding release the GIL
        list(pool.map(make, range(count)))
    return paths


def _rate(images: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, **extra}


def label_lines(result: Any) -> list[str]:
    """YOLO label lines (class cx cy w h conf, normalised) of one Ultralytics result."""
    boxes = result.boxes
    rows = zip(boxes.cls.tolist(), boxes.xywhn.tolist(), boxes.conf.tolist(), strict=True)
    return [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f} {p:.6f}\n" for c, (x, y, w, h), p in rows]


def predict_loop(
    images: list[Path], out: Path, config: Config, device: str, *, queued: bool, weights: str | None = None
) -> dict[str, Any]:
    """Seed 002: Ultralytics predict per image, the .txt written inline or by a writer thread;
    `weights`: an exported artefact instead of the config's .pt."""
    import numpy as np
    import torch
    from ultralytics.models import YOLO

    from daemon.model import resolve_weights

    out.mkdir(parents=True, exist_ok=True)
    m = config.model
    model = YOLO(weights or resolve_weights(m.weights), task="detect")
    kwargs: dict[str, Any] = dict(imgsz=m.imgsz, conf=m.conf, iou=m.iou, device=device, verbose=False)
    model.predict(np.zeros((m.imgsz, m.imgsz, 3), np.uint8), **kwargs)  # load + warm-up, as the daemon's worker
    writes: queue.Queue[tuple[Path, list[str]] | None] = queue.Queue(maxsize=SEED_QUEUE_SIZE)

    def write(path: Path, lines: list[str]) -> None:
        with open(path, "w") as f:
            f.writelines(lines)

    def writer() -> None:
        while (item := writes.get()) is not None:
            write(*item)

    thread = threading.Thread(target=writer, name="seed002-writer")
    started = time.perf_counter()
    if queued:
        thread.start()
    for path in progress.track(images, "seed002" if queued else "naive", len(images)):
        (result,) = model.predict(str(path), **kwargs)
        if queued:
            writes.put((out / f"{path.stem}.txt", label_lines(result)))
        else:
            write(out / f"{path.stem}.txt", label_lines(result))
    if queued:
        writes.put(None)
        thread.join()
    seconds = time.perf_counter() - started
    missing = [p.name for p in images if not (out / f"{p.stem}.txt").is_file()]
    if missing:
        raise BenchError(f"{out.name}: no result file for {missing[:5]}")
    return _rate(len(images), seconds, threads=str(torch.get_num_threads()))  # Ultralytics sets it on CPU


def predict_batches(images: list[Path], out: Path, config: Config, device: str) -> dict[str, Any]:
    """Seed 000: decode each batch in a thread pool (cv2 releases the GIL), then one batched predict."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np
    import torch
    from ultralytics.models import YOLO

    from daemon.model import resolve_weights

    out.mkdir(parents=True, exist_ok=True)
    m, size = config.model, config.pipeline.max_batch
    model = YOLO(resolve_weights(m.weights))
    kwargs: dict[str, Any] = dict(imgsz=m.imgsz, conf=m.conf, iou=m.iou, device=device, verbose=False)
    model.predict([np.zeros((m.imgsz, m.imgsz, 3), np.uint8)] * size, **kwargs)  # load + warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor() as executor:  # the seed's default pool size
        for i in progress.track(range(0, len(images), size), "seed000", -(-len(images) // size), "batch"):
            batch = images[i : i + size]
            decoded = list(executor.map(lambda p: cv2.imread(str(p)), batch))
            for path, result in zip(batch, model.predict(decoded, **kwargs), strict=True):
                with open(out / f"{path.stem}.txt", "w") as f:
                    f.writelines(label_lines(result))
    seconds = time.perf_counter() - started
    missing = [p.name for p in images if not (out / f"{p.stem}.txt").is_file()]
    if missing:
        raise BenchError(f"{out.name}: no result file for {missing[:5]}")
    return _rate(len(images), seconds, threads=str(torch.get_num_threads()))


def measure_runner(images: list[Path], config: Config, devices: list[str]) -> dict[str, Any]:
    """The daemon's own Runner on ready letterboxed tensors, in batches of max_batch: one process
    per device process the daemon runs, with its threads, all at once (on a CPU the daemon runs
    several). Then, alone, the median batch-1 time: the single-image model time."""
    from daemon.workers import torch_threads

    threads = torch_threads(config, devices)
    ctx = multiprocessing.get_context("spawn")
    start, finish = ctx.Barrier(len(devices)), ctx.Barrier(len(devices))
    answers: multiprocessing.SimpleQueue[dict[str, Any]] = ctx.SimpleQueue()
    procs = [
        ctx.Process(
            target=_runner_loop, args=(config, _torch_device(d), threads, images, start, finish, answers, i == 0)
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
    return _rate(
        total,
        max(a["seconds"] for a in loops),  # they started together: the longest is the wall time
        threads=f"{len(devices)}x{threads}",
        input_shape=first["input_shape"],
        single_image_ms=first["single_image_ms"],
        runtime=first["runtime"],
    )


def variants(devices: list[str]) -> list[tuple[Runtime, Precision]]:
    """Every runtime and precision the bench's devices can run here."""
    from daemon import runtimes

    if any(d.startswith("cuda") for d in devices):
        out = [(Runtime.TORCH, Precision.FP32), (Runtime.TORCH, Precision.FP16)]
        return out + [(Runtime.TENSORRT, Precision.FP16)] * runtimes.importable("tensorrt")
    out = [(Runtime.TORCH, Precision.FP32), (Runtime.OPENVINO, Precision.FP32)]
    out += [(Runtime.OPENVINO, Precision.BF16)] * runtimes.has_bf16(runtimes.cpu_flags())
    return out + [(Runtime.ONNXRUNTIME, Precision.FP32)] * runtimes.importable("onnxruntime")


def measure_bounds(images: list[Path], config: Config, devices: list[str], *, skip: str) -> dict[str, dict[str, Any]]:
    """The bound of each runtime and precision but `skip` ("openvino bf16"), each with the device
    processes and threads the daemon would give it."""
    import dataclasses

    from daemon.workers import resolve_devices

    out = {}
    for runtime, precision in variants(devices):
        if f"{runtime.value} {precision.value}" == skip:
            continue
        c = dataclasses.replace(config, model=dataclasses.replace(config.model, runtime=runtime, precision=precision))
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
    import dataclasses

    import numpy as np

    from daemon import model, preprocess
    from daemon.jobs import Job

    m, p = config.model, config.pipeline
    settings = preprocess.Settings(m.imgsz, p.reduced_decode, p.max_pixels)
    ready = [preprocess.prepare(Job(PurePosixPath(x.name), x), settings) for x in images]
    chunks = [ready[i : i + p.max_batch] for i in range(0, len(ready), p.max_batch)]
    slot_bytes = p.max_batch * m.imgsz * m.imgsz * 3
    # Every batch in its own slot, filled before the clock starts, page-locked on a GPU as the daemon's are.
    buffer = mmap.mmap(-1, slot_bytes * len(chunks))
    spec = model.WorkerSpec(
        device, m.weights, m.imgsz, m.precision.value, m.max_det, threads, "", slot_bytes, len(chunks), config.log,
        runtime=m.runtime.value, cache_dir=str(config.paths.work / "models"), max_batch=p.max_batch,
    )  # fmt: skip
    runner = model.Runner(spec, buffer)
    batches = []
    for slot, items in enumerate(chunks):
        h, w = items[0].shape
        view = np.frombuffer(buffer, dtype=np.uint8, count=len(items) * h * w * 3, offset=slot * slot_bytes)
        np.stack([x.image for x in items], out=view.reshape(len(items), h, w, 3))
        metas = [(x.gain[0], x.gain[1], x.pad[0], x.pad[1], x.width, x.height) for x in items]
        batches.append(model.Batch(slot, slot, len(items), h, w, metas, m.conf, m.iou))
    del view

    def timed(todo: list[model.Batch]) -> float:
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
        "runtime": f"{info['runtime']} {info['precision']}",
    }
    if singles:  # the others are done: this one is alone on the device
        one = [dataclasses.replace(b, n=1, metas=b.metas[:1]) for b in batches]
        timed(one[:1])
        runs = sorted(timed([b]) for b in (one * SINGLE_IMAGE_RUNS)[:SINGLE_IMAGE_RUNS])
        answer["single_image_ms"] = runs[len(runs) // 2] * 1000
    answers.put(answer)


def _torch_device(name: str) -> str:
    """cpu:1 names the daemon's second CPU process; to torch (and Ultralytics) it is the CPU."""
    return "cpu" if name.startswith("cpu") else name


class DaemonProcess:
    """`python -m daemon run` as a child; a thread stamps each JSON log line with its arrival time."""

    def __init__(self, raw: dict[str, Any], *, once: bool) -> None:
        self.root = Path(raw["paths"]["work"]).parent
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"  # JSON writes these strings, numbers and string lists as TOML does
        config.write_text(
            "".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items()) for s, t in raw.items())
        )
        # Unbounded on purpose: the reader must never block the daemon's stdout.
        self.lines: queue.SimpleQueue[tuple[float, dict[str, Any]] | None] = queue.SimpleQueue()
        self.peak_rss_kib: int | None = None
        command = [sys.executable, "-m", "daemon", "run", "--config", str(config), *(["--once"] * once)]
        with open(self.root / "daemon.stderr", "w") as stderr:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.reader = threading.Thread(target=self._read, name="bench-log-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.root / "daemon.log", "w") as log:  # kept, to see where the time went
            for line in self.proc.stdout:
                arrived = time.monotonic()
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None  # a stray print by a library, not an event
                if isinstance(record, dict):
                    if record.get("event") == "daemon_stopped":  # still alive: it exits just after this line
                        self.peak_rss_kib = vm_hwm_kib(self.proc.pid)
                    self.lines.put((arrived, record))
                log.write(line)
        self.lines.put(None)

    def records(self) -> Iterator[tuple[float, dict[str, Any]]]:
        """(arrival time, record) as they come; BenchError if the daemon exits, stalls or fails an image."""
        while True:
            try:
                item = self.lines.get(timeout=STALL_TIMEOUT_S)
            except queue.Empty:
                raise BenchError(f"the daemon logged nothing for {STALL_TIMEOUT_S:.0f} s") from None
            if item is None:
                tail = (self.root / "daemon.stderr").read_text()[-2000:]
                raise BenchError(f"the daemon exited with status {self.proc.wait()}:\n{tail}")
            if item[1].get("event") == "image_failed":
                raise BenchError(f"the daemon failed an image: {item[1]}")
            yield item

    def until(self, event: str) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
        """Wait for `event`: its arrival time, its record and the records before it."""
        earlier: list[dict[str, Any]] = []
        for arrived, record in self.records():
            if record.get("event") == event:
                return arrived, record, earlier
            earlier.append(record)
        raise AssertionError("records() ends only by raising")

    def exit_status(self) -> int:
        try:
            return self.proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"the daemon did not exit within {EXIT_TIMEOUT_S:.0f} s") from None

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # its device process sees the pipe close and exits too
            self.proc.wait()
        self.reader.join(STALL_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size of a live process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def run_once(raw: dict[str, Any], sources: list[Path], names: list[str]) -> dict[str, Any]:
    """`inferd run --once` on `sources` (as `names`), timed from daemon_started to the last image_done."""
    incoming = Path(raw["paths"]["incoming"])
    incoming.mkdir(parents=True)
    for source, name in zip(sources, names, strict=True):
        os.link(source, incoming / name)  # the daemon moves the link to done/; the source stays
    with DaemonProcess(raw, once=True) as daemon, progress.bar("inferd", len(names)) as bar:
        started, info, _ = daemon.until("daemon_started")
        done: set[str] = set()
        stages: dict[str, list[float]] = {}
        finished = started  # the last result durable: the daemon's own exit is not throughput
        for arrived, record in daemon.records():
            if record.get("event") == "image_done":
                bar.update(1)
                done.add(record["path"])
                finished = arrived
                for key in ("batch", *(k for k in record if k.endswith("_ms"))):
                    stages.setdefault(key, []).append(record[key])
            elif record.get("event") == "daemon_stopped":
                break
        status = daemon.exit_status()
        peak_rss_kib = daemon.peak_rss_kib
    output = Path(raw["paths"]["output"])
    missing = [n for n in names if n not in done]
    missing += [f"{n}: {s}" for n in names for s in (".txt", ".json") if not (output / (n + s)).is_file()]
    if status != 0 or missing:
        raise BenchError(f"inferd --once: exit status {status}, missing results {missing[:5]}")
    rss_mib = peak_rss_kib / 1024 if peak_rss_kib else None  # None: it exited before /proc was read
    threads = f"{info['torch_threads']}+{info['preprocess_threads']}"
    medians = {k: statistics.median(v) for k, v in stages.items()}  # where an image's time went
    return _rate(len(names), finished - started, threads=threads, rss_mib=rss_mib, medians=medians)


def latency(images: list[Path], raw: dict[str, Any], rate: float) -> dict[str, Any]:
    """Drop files one at a time at `rate`/s into a running daemon; drop -> image_done percentiles."""
    import numpy as np

    incoming = Path(raw["paths"]["incoming"])
    incoming.mkdir(parents=True)
    dropped: dict[str, float] = {}
    arrived: dict[str, float] = {}
    with DaemonProcess(raw, once=False) as daemon:
        daemon.until("daemon_started")
        start = time.monotonic()
        for i, source in enumerate(images):
            name = f"drop-{i:05d}.jpg"
            shutil.copyfile(source, incoming / f".{name}.tmp")  # hidden: the daemon ignores it
            time.sleep(max(0.0, start + i / rate - time.monotonic()))  # the load generator's pace
            dropped[name] = time.monotonic()
            os.rename(incoming / f".{name}.tmp", incoming / name)
        for t, record in daemon.records():
            if record.get("event") == "image_done":
                arrived[record["path"]] = t
            if arrived.keys() >= dropped.keys():
                break
        daemon.proc.send_signal(signal.SIGTERM)
        status = daemon.exit_status()
    if status != 0:
        raise BenchError(f"inferd after SIGTERM: exit status {status}")
    ms = np.array([(arrived[n] - dropped[n]) * 1000 for n in dropped])
    keys = ("p50_ms", "p95_ms", "p99_ms", "max_ms")
    stats = dict(zip(keys, np.percentile(ms, [50, 95, 99, 100]).tolist(), strict=True))
    return {"files": len(ms), "rate_per_s": rate, **stats}


def backlog(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of the daemon's main process while it drains N waiting files, for each N."""
    small = workdir / "backlog.jpg"
    photo_like(*BACKLOG_SIZE, seed=args.seed).save(small, quality=90)
    runs = []
    for n in args.backlog:
        names = [f"b{i:06d}.jpg" for i in range(n)]
        runs.append(run_once(daemon_config(workdir / f"backlog-{n}", args), [small] * n, names))
        if runs[-1]["rss_mib"] is None:
            raise BenchError(f"backlog {n}: the daemon exited before its VmHWM could be read")
    size = "x".join(map(str, BACKLOG_SIZE))
    return {"image_size": size, "runs": runs, "rss_ratio": runs[-1]["rss_mib"] / runs[0]["rss_mib"]}


def render(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    s = report["setup"]
    images = f"{s['count']} images {s['size']}, " if report["modes"] or "latency" in report else ""
    out = [
        f"inferd bench: {images}{s['weights']}, imgsz {s['imgsz']}, batch {s['max_batch']},"
        f" database {s.get('database', 'off')}",
        f"devices {','.join(s['devices'])} (baselines on {s['baseline_device']}), {s['cpu_cores']} cores,"
        f" load average {s['loadavg_1min_start']:.2f} at start, {s['loadavg_1min_end']:.2f} at end",
    ]
    if report["modes"]:
        out.append(f"{'mode':<8} {'images':>6} {'seconds':>8} {'images/s':>9} {'threads':>7}  what")
    for mode, r in report["modes"].items():
        note = NOTES[mode].format(max_batch=s["max_batch"], shape=r.get("input_shape"), runtime=r.get("runtime"))
        out.append(
            f"{mode:<8} {r['images']:>6} {r['seconds']:>8.2f} {r['images_per_s']:>9.2f} {r['threads']:>7}  {note}"
        )
    if len(report.get("bounds", {})) > 1:
        out.append("bound per runtime and precision (images/s, device processes x threads):")
        out += [f"  {k:<18} {b['images_per_s']:>8.2f}  {b['threads']}" for k, b in report["bounds"].items()]
    if report.get("ratios"):
        out.append("ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    if "single_image_ms" in report:
        out.append(f"single-image model time (Runner, batch 1, median): {report['single_image_ms']:.1f} ms")
    if r := report.get("latency", {}):
        out += [
            f"latency: {r['files']} files dropped at {r['rate_per_s']:g}/s into a running daemon, drop -> image_done:",
            "  " + "  ".join(f"{k} {r[f'{k}_ms']:.1f} ms" for k in ("p50", "p95", "p99", "max")),
            f"  p50 / single-image model time: {r['p50_over_single_image']:.2f}; exit status 0 after SIGTERM",
        ]
    if b := report.get("backlog", {}):
        out.append(f"backlog: N {b['image_size']} JPEGs waiting in incoming/, run --once, default max_pending")
        out.append(f"  {'N':>7} {'peak RSS MiB':>13} {'images/s':>9}")
        out += [f"  {r['images']:>7} {r['rss_mib']:>13.1f} {r['images_per_s']:>9.2f}" for r in b["runs"]]
        out.append(f"  peak RSS largest/smallest: {b['rss_ratio']:.2f}")
    return "\n".join(out) + "\n"
