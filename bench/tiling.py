"""`inferd bench --tiling`: inferd's sliced inference against SAHI on the same strips and model.

The strips (bench/strips.py): 2048x12000 photo-like backgrounds with real photos of people pasted
along them. Every mode is scored against the same reference, the model's confident detections on
each photo alone (IoU >= 0.5), and counted for duplicates (a second box on one person, or a
fragment of one cut at a tile border):

- letterboxed: `inferd run --once`, tiling off (what the daemon does without it)
- inferd_tiled: `inferd run --once`, tiling on: 640 tiles, 0.2 overlap, the full-image pass,
  GREEDYNMM/IOS 0.5; the daemon's runtime choice ("auto")
- sahi: SAHI 0.12's `get_sliced_prediction`, the same slices and merge, the `.pt` on the CPU
  through its Ultralytics wrapper, one strip at a time
- bound: the daemon's Runner (forward + NMS) on ready 640x640 tiles, in batches of max_batch,
  with the daemon's runtime and processes: the tiles/s ceiling for inferd_tiled
- backlog: the daemon's peak RSS with N strips waiting in incoming/, stopped (SIGTERM) after its
  first result: decoded tiles wait only as far as the batcher has room, whatever N is
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import BenchError, bound, rate, runs, strips
from daemon.config import Config

PHOTOS_PER_STRIP = 8
TILE = 640
OVERLAP = 0.2


def make(workdir: Path, count: int, seed: int, size: tuple[int, int]) -> tuple[list[Path], list[np.ndarray]]:
    """`count` strips as JPEGs, and per strip its reference detections."""
    from daemon.model import resolve_weights

    folder = workdir / "strips"
    folder.mkdir(parents=True, exist_ok=True)
    paths, refs = [], []
    weights = resolve_weights("default")
    for i in range(count):
        image, pasted = strips.strip(*size, seed=seed * 1000 + i, count=PHOTOS_PER_STRIP)
        path = folder / f"strip-{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
        refs.append(strips.reference(weights, pasted))
    return paths, refs


def scored(found: list[np.ndarray], refs: list[np.ndarray]) -> dict[str, Any]:
    """Recall against the reference and duplicates, over all strips."""
    matched, duplicates = map(sum, zip(*(strips.score(f, r) for f, r in zip(found, refs, strict=True)), strict=True))
    wanted = sum(len(r) for r in refs)
    return {"reference": wanted, "matched": matched, "recall": matched / wanted, "duplicates": duplicates}


def daemon(
    workdir: Path, args: argparse.Namespace, paths: list[Path], mode: str
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """`inferd run --once` on the strips with `[tiling] mode`; its rate and each strip's boxes."""
    raw = runs.new_run(workdir, f"inferd-{mode}", args)
    raw["tiling"] = {"mode": mode, "size": TILE, "overlap": OVERLAP}
    result = runs.run_once(raw, paths, [p.name for p in paths], label=f"tiling {mode}")
    found = []
    for p in paths:
        document = json.loads((Path(raw["paths"]["output"]) / f"{p.name}.json").read_text())
        rows = [d["box_xyxy"] + [d["confidence"], d["class_id"]] for d in document["detections"]]
        found.append(np.array(rows, np.float32).reshape(-1, 6))
    return result, found


def sahi(paths: list[Path], weights: str, conf: float) -> tuple[dict[str, Any], list[np.ndarray]]:
    """SAHI's sliced prediction on each strip, the model loaded (and warmed up) first."""
    from PIL import Image
    from sahi import AutoDetectionModel
    from sahi.predict import get_sliced_prediction

    model = AutoDetectionModel.from_pretrained(
        model_type="ultralytics", model_path=weights, confidence_threshold=conf, device="cpu"
    )
    model.perform_inference(np.zeros((TILE, TILE, 3), np.uint8))
    found = []
    started = time.perf_counter()
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))  # decode included, as the daemon's is
        result = get_sliced_prediction(
            image, model, slice_height=TILE, slice_width=TILE, overlap_height_ratio=OVERLAP,
            overlap_width_ratio=OVERLAP, perform_standard_pred=True, postprocess_type="GREEDYNMM",
            postprocess_match_metric="IOS", postprocess_match_threshold=0.5, verbose=0,
        )  # fmt: skip
        rows = [[*p.bbox.to_xyxy(), p.score.value, p.category.id] for p in result.object_prediction_list]
        found.append(np.array(rows, np.float32).reshape(-1, 6))
    return rate(len(paths), time.perf_counter() - started, threads="torch default"), found


def tiles_bound(
    workdir: Path, strip: Path, size: tuple[int, int], config: Config, devices: list[str]
) -> dict[str, Any]:
    """The Runner on ready 640x640 tiles cut from a strip (written as JPEGs for bound.py)."""
    from PIL import Image

    from daemon.tiling import slices

    folder = workdir / "tiles"
    folder.mkdir(exist_ok=True)
    image = Image.open(strip).convert("RGB")
    tiles = []
    for i, box in enumerate(slices(size[0], size[1], TILE, OVERLAP)[:32]):
        tiles.append(folder / f"tile-{i:03d}.jpg")
        image.crop(box).save(tiles[-1], quality=90)
    return bound.measure_runner(tiles, config, devices)


def backlog(workdir: Path, args: argparse.Namespace, source: Path, counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """Peak RSS of the main process with N strips waiting, stopped after its first result."""
    out = []
    for n in counts:
        raw = runs.new_run(workdir, f"backlog-{n}", args)
        raw["tiling"] = {"mode": "on", "size": TILE, "overlap": OVERLAP}
        raw["pipeline"]["drain_timeout_s"] = 1.0  # what is left waits in processing/ for the next run
        incoming = Path(raw["paths"]["incoming"])
        incoming.mkdir(parents=True)
        for i in range(n):
            os.link(source, incoming / f"s{i:04d}.jpg")
        with runs.start(raw) as d:
            runs.until(d, "daemon_started")
            runs.until(d, "image_done")
            d.proc.send_signal(signal.SIGTERM)
            runs.until(d, "daemon_stopped")
            runs.exit_status(d)
            if d.peak_rss_kib is None:
                raise BenchError(f"backlog {n}: the daemon exited before its VmHWM could be read")
            out.append({"strips": n, "rss_mib": d.peak_rss_kib / 1024})
    return out


def measure(args: argparse.Namespace, workdir: Path, config: Config, devices: list[str]) -> dict[str, Any]:
    """Every tiling measurement, in one run, on one set of strips."""
    import asyncio

    from daemon import export
    from daemon.model import resolve_weights
    from daemon.tiling import slices

    size = args.strip_size
    paths, refs = make(workdir, args.strips, args.seed, size)
    tiles = len(slices(size[0], size[1], TILE, OVERLAP))
    report: dict[str, Any] = {"strips": len(paths), "size": "x".join(map(str, size)), "tiles_per_strip": tiles}
    modes: dict[str, Any] = {}
    for mode, label in (("off", "letterboxed"), ("on", "inferd_tiled")):
        result, found = daemon(workdir, args, paths, mode)
        modes[label] = {**result, **scored(found, refs)}
    result, found = sahi(paths, resolve_weights(config.model.weights), config.model.conf)
    modes["sahi"] = {**result, **scored(found, refs)}
    parts = report["tiles_per_strip"] + 1  # and the full-image pass
    for r in modes.values():
        r["tiles_per_s"] = r["images_per_s"] * parts
    modes["letterboxed"]["tiles_per_s"] = None
    report["modes"] = modes
    asyncio.run(export.prepare(config, devices))  # the daemon's artefact, for the bound's Runner
    report["bound"] = tiles_bound(workdir, paths[0], size, config, devices)
    report["ratios"] = {
        "inferd_tiled/sahi images/s": modes["inferd_tiled"]["images_per_s"] / modes["sahi"]["images_per_s"],
        "inferd_tiled tiles/s / bound": modes["inferd_tiled"]["tiles_per_s"] / report["bound"]["images_per_s"],
        "recall inferd_tiled - sahi": modes["inferd_tiled"]["recall"] - modes["sahi"]["recall"],
    }
    report["backlog"] = backlog(workdir, args, paths[0], (10, 100))
    return report


def render(report: dict[str, Any]) -> list[str]:
    out = [
        f"tiling: {report['strips']} strips {report['size']} ({report['tiles_per_strip']} tiles of {TILE} + the full"
        f" image), people pasted; reference: the model's detections (conf >= {strips.CONFIDENT}) on each photo alone",
        f"  {'mode':<13} {'recall':>6} {'matched':>9} {'dups':>5} {'img/s':>7} {'tiles/s':>8} {'seconds':>8}",
    ]
    for mode, r in report["modes"].items():
        tiles = f"{r['tiles_per_s']:>8.2f}" if r["tiles_per_s"] is not None else f"{'-':>8}"
        out.append(
            f"  {mode:<13} {r['recall']:>6.2f} {r['matched']:>4}/{r['reference']:<4} {r['duplicates']:>5}"
            f" {r['images_per_s']:>7.3f} {tiles} {r['seconds']:>8.1f}"
        )
    b = report["bound"]
    where = f"{b['runtime']}, {b['threads']}"
    out.append(f"  bound (Runner on ready {TILE} tiles, {where}): {b['images_per_s']:.2f} tiles/s")
    out.append("  ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    out.append("  backlog (tiling on, peak RSS of the main process, stopped after its first result): " + "  ".join(
        f"{r['strips']} strips {r['rss_mib']:.0f} MiB" for r in report["backlog"]
    ))  # fmt: skip
    return out
