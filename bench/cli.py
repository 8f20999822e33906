"""`inferd bench`: inferd against seed 002's designs and the model's own bound, in one run.

Every mode runs on the same generated JPEGs with the same model, model load excluded:

- naive:   Ultralytics `predict` one image at a time, each .txt written inline (seed 002 before)
- naive_export: the same loop on Ultralytics' own export (OpenVINO fp32 on a CPU, the daemon's
           artefact on a GPU), as Ultralytics loads it (OpenVINO: compiled with the CPU's default
           precision and every core); skipped when the daemon's runtime is PyTorch on a GPU
- seed002: the same loop, writes handed to a `Queue(maxsize=200)` and a writer thread (after)
- seed000: seed 000's design: each batch decoded by a `ThreadPoolExecutor().map`, then one
           batched `predict` on the decoded arrays, .txt written inline; batches do not overlap
- bound:   the daemon's `model.Runner` (forward + NMS) on ready letterboxed tensors in batches
           of `max_batch`, one process per device process of the daemon (with its threads), all
           at once: no decode, no I/O, the ceiling. Measured for the daemon's runtime and
           precision, and (`bounds`) for every candidate of the measured choice this machine
           has (INT8 with --calibration); the headline `inferd/fastest_bound` compares with the
           fastest of those that passed the accuracy gate
- inferd:  `inferd run --once` as a subprocess, timed from `daemon_started` to the last `image_done`
- pipeline (only when asked for): the same with a model that answers at once, with host and
           with device decode: the main process's CPU per image, by stage (bench/pipeline.py)

`--cluster ADDRESS` runs the daemon twice, with local device processes and with Ray actors on the
cluster at ADDRESS, and reports the Ray path's overhead per image (bench/cluster.py).
`--latency` drops files one at a time into a running daemon and times drop -> `image_done`;
`--backlog` fills incoming/ with N files and reads the daemon's peak RSS (VmHWM) at its end.
`--tiling` runs sliced inference on strips with people pasted, inferd against SAHI (bench/tiling.py).
The report is a plain-text table; `--json PATH` writes the same numbers, `--plot PATH` a chart.
While it runs, a bar per mode on stderr when that is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import BenchError, baselines, bound, cluster, pipeline, runs, tiling, torch_device
from bench.images import generate
from daemon import export
from daemon.config import DEFAULTS, Config, ConfigError, parse

MODES = ("naive", "naive_export", "seed002", "seed000", "bound", "inferd", "pipeline")
DEFAULT_MODES = MODES[:-1]  # the pipeline mode's model is a stand-in: only when asked for
NOTES = {
    "naive": "Ultralytics predict per image, .txt written inline",
    "naive_export": "the same on the daemon's export ({runtime} artefact; Ultralytics compiles it its way)",
    "seed002": f"Ultralytics predict per image, .txt via Queue({baselines.SEED_QUEUE_SIZE}) + writer thread",
    "seed000": "batches of {max_batch}: ThreadPoolExecutor decode, then batched predict, .txt inline",
    "bound": "Runner forward + NMS on ready tensors, batch {max_batch}, input {shape}, {runtime}, no I/O",
    "inferd": "inferd run --once, daemon_started -> last image_done (threads: torch + decode)",
}


def parser() -> argparse.ArgumentParser:
    """The options of `inferd bench` (cli.py in the package hands it the words after `bench`)."""
    p = argparse.ArgumentParser(prog="inferd bench", description=__doc__.split("\n", 1)[0].partition(": ")[2])
    p.add_argument("--size", type=_size, default=(1920, 1080), help="generated image size WxH (default 1920x1080)")
    p.add_argument("--count", type=_positive(int), default=50, help="images per mode and files dropped by --latency")
    p.add_argument("--weights", default=DEFAULTS["model"]["weights"], help='"default" (embedded), a path or a name')
    p.add_argument("--devices", default="auto", help='"auto", or comma-separated: cpu, cuda:0, ...')
    p.add_argument("--batch", type=int, default=8, help="the daemon's pipeline.max_batch (default 8)")
    p.add_argument("--imgsz", type=int, default=640, help="model input size (default 640)")
    p.add_argument(
        "--calibration", type=Path, help="the daemon's model.calibration: real photos for INT8 and the accuracy gate"
    )
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
    modes = f"comma-separated subset of {','.join(MODES)} (default: all but pipeline)"
    p.add_argument("--modes", type=_modes, help=modes)
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help='the Ray path against local: a Ray address ("host:6379", "auto"), or "" for a local Ray instance',
    )
    p.add_argument("--latency", action="store_true", help="measure drop -> result latency on a running daemon")
    p.add_argument("--rate", type=_positive(float), default=2.0, help="files/s dropped by --latency (default 2)")
    p.add_argument("--backlog", type=_counts, help="peak RSS with N[,N...] files waiting in incoming/")
    p.add_argument("--tiling", action="store_true", help="sliced inference on 2048x12000 strips: inferd vs SAHI")
    p.add_argument("--strips", type=_positive(int), default=3, help="strips for --tiling (default 3; SAHI: ~34 s each)")
    p.add_argument("--strip-size", type=_size, default=(2048, 12000), help="their size WxH (default 2048x12000)")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary dir, removed)")
    p.add_argument("--models", type=Path, help="the model cache, kept across runs (default: in the workdir)")
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--plot", type=Path, help="also draw the report as a PNG chart to this file")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated images")
    p.add_argument(
        "--compare", type=Path, help="with --modes pipeline: an earlier run's --json, to print this run's ratios to it"
    )
    return p


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


def main(argv: list[str]) -> int:
    """Run the requested measurements and print the report: 0, 1 when a run failed, 2 for bad options."""
    args = parser().parse_args(argv)
    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="inferd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "ultralytics"))  # before Ultralytics is imported
    if args.models:
        runs.share_models(workdir, args.models)
    try:
        report = measure(args, workdir, parse(runs.daemon_config(workdir, args), base=workdir))
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
        from bench import plot

        plot.chart(report, args.plot)
    return 0


def measure(args: argparse.Namespace, workdir: Path, config: Config) -> dict[str, Any]:
    """Every measurement asked for, in one process, on one image set: the report as a dict."""
    from bench import plot
    from daemon.local import cores, resolve_decode, resolve_devices
    from daemon.model import ModelError, resolve_weights

    try:
        weights = resolve_weights(config.model.weights)
    except ModelError as exc:
        raise BenchError(str(exc)) from None
    below_gate, tuned, layouts = _tuned(config)
    config = asyncio.run(export.resolve(config))  # the measured choice (cached: measured once per workdir)
    devices = asyncio.run(resolve_devices(config))
    config = resolve_decode(config, devices)
    setup = {
        "size": "x".join(map(str, args.size)),
        "count": args.count,
        "weights": weights,
        "devices": devices,
        "baseline_device": torch_device(devices[0]),  # the baselines run on one device
        "imgsz": config.model.imgsz,
        "max_batch": config.pipeline.max_batch,
        "database": config.output.database.dialect if config.output.database else "off",
        "decode": config.pipeline.decode.value,
        "runtime": f"{config.model.runtime.value} {config.model.precision.value}",
        "layout": f"{config.pipeline.cpu_workers}x{config.pipeline.torch_threads}",
        "cpu_cores": cores(),
        "machine": plot.machine(devices),
        "seed": args.seed,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")},
        "loadavg_1min_start": os.getloadavg()[0],  # other work on the machine skews every number
    }
    report: dict[str, Any] = {"setup": setup, "modes": {}, "tuned": tuned}
    results = report["modes"]
    asked = args.latency or args.backlog or args.tiling or args.cluster is not None
    modes = args.modes or (() if asked else DEFAULT_MODES)
    wanted = modes or args.latency or args.cluster is not None
    images = generate(workdir / "images", args.count, args.size, args.seed) if wanted else []
    exported = {"naive_export", "bound"} & set(modes) or args.latency
    plans = asyncio.run(export.prepare(config, devices)) if exported else []  # once, for every mode
    for mode in ("naive", "naive_export", "seed002"):
        own = _own_export(config, devices, plans) if mode == "naive_export" and mode in modes else None
        if mode == "naive_export" and own is None:
            continue
        if mode in modes:
            artefact = own.artefact if own is not None else None
            results[mode] = baselines.predict_loop(
                images, workdir / mode, config, setup["baseline_device"], queued=mode == "seed002", weights=artefact
            )
            if own is not None:
                results[mode]["runtime"] = f"{own.runtime} {own.precision}"
    if "seed000" in modes:
        results["seed000"] = baselines.predict_batches(images, workdir / "seed000", config, setup["baseline_device"])
    if "bound" in modes or args.latency:
        ceiling = bound.measure_runner(images, config, devices)
        report["single_image_ms"] = ceiling.pop("single_image_ms")
        if "bound" in modes:
            results["bound"] = ceiling
            others = bound.measure_bounds(images, config, devices, skip=ceiling["runtime"], layouts=layouts)
            report["bounds"] = {ceiling["runtime"]: ceiling, **others}
    if "inferd" in modes:
        raw = runs.new_run(workdir, "inferd", args)
        results["inferd"] = runs.run_once(raw, images, [p.name for p in images])
    if "inferd" in results:
        rate = results["inferd"]["images_per_s"]
        report["ratios"] = {f"inferd/{m}": rate / r["images_per_s"] for m, r in results.items() if m != "inferd"}
        gated = {k: b for k, b in report.get("bounds", {}).items() if k not in below_gate}
        if gated:
            fastest = max(gated, key=lambda k: gated[k]["images_per_s"])
            report["fastest_bound"] = fastest
            report["ratios"]["inferd/fastest_bound"] = rate / report["bounds"][fastest]["images_per_s"]
    if args.latency:
        report["latency"] = runs.latency(images, runs.new_run(workdir, "latency", args), args.rate)
        report["latency"]["p50_over_single_image"] = report["latency"]["p50_ms"] / report["single_image_ms"]
    if "pipeline" in modes:
        report["pipeline"] = pipeline.measure(images, workdir, args)
        if args.compare:
            report["pipeline"]["compared"] = pipeline.compare(report["pipeline"], json.loads(args.compare.read_text()))
    if args.backlog:
        report["backlog"] = runs.backlog(workdir, args)
    if args.tiling:
        report["tiling"] = tiling.measure(args, workdir, config, devices)
    if args.cluster is not None:
        report["cluster"] = cluster.measure(images, workdir, args, config.pipeline.torch_threads or cores())
    setup["loadavg_1min_end"] = os.getloadavg()[0]
    return report


def _own_export(config: Config, devices: list[str], plans: list[export.Planned]) -> export.Planned | None:
    """What a user exporting by hand would run: OpenVINO fp32 on a CPU (Ultralytics compiles it
    with the CPU's default precision), the daemon's own export on a GPU; None for PyTorch on a GPU."""
    import dataclasses

    from daemon.config import Precision, Runtime

    if any(d.startswith("cuda") for d in devices):
        return plans[0] if plans and plans[0].runtime != "torch" else None
    model = dataclasses.replace(config.model, runtime=Runtime.OPENVINO, precision=Precision.FP32)
    (plan,) = asyncio.run(export.prepare(dataclasses.replace(config, model=model), ["cpu"]))
    return plan


def _tuned(config: Config) -> tuple[set[str], list[str], dict[str, tuple[int, int, int]]]:
    """The measured choice's table (measured now if not cached), the candidates it found below
    the accuracy gate ("openvino int8"), and each candidate's fastest layout and batch size
    (processes, threads, batch). `config`: before export.resolve."""
    from daemon.model import resolve_weights
    from daemon.tuning import tune

    asyncio.run(export.resolve(config))
    weights = resolve_weights(config.model.weights)
    if not Path(weights).is_file():
        return set(), [], {}  # nothing was measured: the daemon's own start says what is wrong
    choice = tune.cached(export.tune_request(config) | {"weights": weights})
    rows = choice.table if choice is not None else []
    below = {f"{r.runtime} {r.precision}" for r in rows if r.note.startswith("below the accuracy gate")}
    best: dict[str, tuple[int, int, int]] = {}
    for r in sorted((r for r in rows if r.img_s is not None), key=lambda r: r.img_s or 0.0):
        processes, threads = r.layout.split("x")
        best[f"{r.runtime} {r.precision}"] = (int(processes), int(threads), r.batch)  # the fastest last
    return below, [tune.describe(r) for r in rows], best


def render(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    s = report["setup"]
    shown = {"latency", "pipeline", "cluster"} & set(report)  # tiling says its own sizes
    images = f"{s['count']} images {s['size']}, " if report["modes"] or shown else ""
    out = [
        f"inferd bench: {images}{s['weights']}, imgsz {s['imgsz']}, batch {s['max_batch']},"
        f" database {s.get('database', 'off')}",
        f"devices {','.join(s['devices'])} (baselines on {s['baseline_device']}), {s['cpu_cores']} cores,"
        f" load average {s['loadavg_1min_start']:.2f} at start, {s['loadavg_1min_end']:.2f} at end",
    ]
    if report["modes"]:
        out.append(f"{'mode':<8} {'images':>6} {'seconds':>8} {'images/s':>9} {'threads':>7}  what")
    for mode, r in report["modes"].items():
        batch = r.get("batch", s["max_batch"])  # a bound's: the measured batch size
        note = NOTES[mode].format(max_batch=batch, shape=r.get("input_shape"), runtime=r.get("runtime"))
        out.append(
            f"{mode:<8} {r['images']:>6} {r['seconds']:>8.2f} {r['images_per_s']:>9.2f} {r['threads']:>7}  {note}"
        )
    if len(report.get("bounds", {})) > 1:
        out.append("bound per runtime and precision (images/s, device processes x threads, batch):")
        out += [f"  {k:<18} {b['images_per_s']:>8.2f}  {b['threads']} b{b.get('batch', s['max_batch'])}"
                for k, b in report["bounds"].items()]  # fmt: skip
    if report.get("tuned"):
        out.append("measured choice (runtime precision processes x threads, batch: img/s, accuracy gate):")
        out += [f"  {line}" for line in report["tuned"]]
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
    if "pipeline" in report:
        out += pipeline.render(report["pipeline"])
    if "cluster" in report:
        out += cluster.render(report["cluster"])
    if "tiling" in report:
        out += tiling.render(report["tiling"])
    if b := report.get("backlog", {}):
        out.append(f"backlog: N {b['image_size']} JPEGs waiting in incoming/, run --once, default max_pending")
        out.append(f"  {'N':>7} {'peak RSS MiB':>13} {'images/s':>9}")
        out += [f"  {r['images']:>7} {r['rss_mib']:>13.1f} {r['images_per_s']:>9.2f}" for r in b["runs"]]
        out.append(f"  peak RSS largest/smallest: {b['rss_ratio']:.2f}")
    return "\n".join(out) + "\n"
