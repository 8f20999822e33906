"""`--modes pipeline`: the daemon with every stage real except the model, to measure what the main
process costs per image.

`inferd run --once` on the bench's images with the instant detector (bench/fake_model.py: its
forward answers at once with five boxes per image, so the device process still runs NMS and
scaling, and the writes are realistic), on PyTorch, twice: `pipeline.decode = "host"` (the
main process's thread pool decodes) and `"device"` (the device process decodes the JPEG bytes).
Each run reports img/s and the main process's CPU ms per image, total and by stage (bench.cpu),
with the device processes' for context. The issue's workload: `--size 320x240 --count 2000
--imgsz 64`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bench import BenchError, runs

DECODES = ("host", "device")
CHECKOUT = Path(__file__).resolve().parent.parent  # on the daemon's PYTHONPATH: its processes unpickle the model


def measure(images: list[Path], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both decode paths on `images`: the report's `pipeline` section."""
    from bench import fake_model

    weights = fake_model.save(workdir / "instant-yolo11n.pt")
    path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p)
    report: dict[str, Any] = {"weights": str(weights), "boxes_per_image": len(fake_model.BOXES)}
    for decode in DECODES:
        raw = runs.new_run(workdir, f"pipeline-{decode}", args)
        raw["model"].update(weights=str(weights), runtime="torch", precision="fp32")
        raw["pipeline"]["decode"] = decode
        names = [p.name for p in images]
        report[decode] = runs.run_once(
            raw, images, names, label=f"pipeline {decode}", env={"PYTHONPATH": path}, cpu_usage=True
        )
    return report


def compare(now: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """This run against an earlier report's pipeline section, per decode path: images/s now over
    then (higher is better) and main-process CPU per image now over then (lower is better)."""
    then = earlier.get("pipeline")
    if not isinstance(then, dict) or not all(d in then for d in DECODES):
        raise BenchError("--compare: that report has no pipeline section (run it with --modes pipeline)")
    ratios: dict[str, Any] = {}
    for d in DECODES:
        ratios[d] = {
            "images_per_s": now[d]["images_per_s"] / then[d]["images_per_s"],
            "main_ms_per_image": now[d]["cpu"]["main_ms_per_image"] / then[d]["cpu"]["main_ms_per_image"],
        }
    return ratios


def render(report: dict[str, Any]) -> list[str]:
    """The pipeline section of the plain-text report."""
    from bench.cpu import ORDER

    out = [
        f"pipeline: every stage real but the model ({Path(report['weights']).name}: {report['boxes_per_image']}"
        " fixed boxes per image, at once); main process CPU ms/image from daemon_started to the last image_done:",
        f"  {'decode':<7} {'images/s':>9} {'main':>6}  " + " ".join(f"{g:>8}" for g in ORDER) + f"  {'devices':>8}",
    ]
    for decode in DECODES:
        r = report[decode]
        c = r["cpu"]
        stages = " ".join(f"{c['by_stage_ms_per_image'][g]:>8.3f}" for g in ORDER)
        out.append(
            f"  {decode:<7} {r['images_per_s']:>9.1f} {c['main_ms_per_image']:>6.3f}  {stages}"
            f"  {c['device_ms_per_image']:>8.3f}"
        )
    for decode, r in report.get("compared", {}).items():
        out.append(
            f"  {decode} against --compare: images/s x{r['images_per_s']:.2f},"
            f" main CPU/image x{r['main_ms_per_image']:.2f}"
        )
    return out
