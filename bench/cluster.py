"""`--cluster ADDRESS`: the daemon's Ray path against its local one, on the same images and model.

`inferd run --once` twice: local device processes, then `[cluster] backend = "ray"` with actors on
the cluster at ADDRESS ("" = a local Ray instance started by the daemon's driver). Both decode
the JPEGs in the device (the Ray backend's default: bytes cross the network, not pixels), run
PyTorch with the same threads, and as many devices (one CPU process against one CPU actor per
node on a machine without GPU; one per GPU otherwise). The report: images/s of each, their
ratio, and the Ray path's overhead per image, 1000 / ray img/s - 1000 / local img/s. A small
model input (`--imgsz 64 --size 320x240`) makes the model's time small, so the overhead shows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench import runs

BACKENDS = ("local", "ray")


def measure(images: list[Path], workdir: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Both backends on `images`: the report's `cluster` section."""
    report: dict[str, Any] = {"address": args.cluster or "(a local Ray instance)", "torch_threads": threads}
    names = [p.name for p in images]
    for backend in BACKENDS:
        raw = runs.new_run(workdir, f"cluster-{backend}", args)
        raw["model"]["runtime"] = "torch"  # what the actors run
        raw["pipeline"].update(decode="device", torch_threads=threads, cpu_workers=1)
        if backend == "ray":
            raw["model"]["devices"] = "auto"
            raw["cluster"] = {"backend": "ray", "address": args.cluster, "cpu_actors": 1, "cpus_per_actor": threads}
        report[backend] = runs.run_once(raw, images, names, label=f"cluster {backend}")
    local, ray = report["local"]["images_per_s"], report["ray"]["images_per_s"]
    report["ray_over_local"] = ray / local
    report["overhead_ms_per_image"] = 1000 / ray - 1000 / local
    return report


def render(report: dict[str, Any]) -> list[str]:
    """The cluster section of the plain-text report."""
    out = [f"cluster: the Ray path (actors at {report['address']}) against local device processes, decode on device:"]
    for backend in BACKENDS:
        r = report[backend]
        infer = r.get("medians", {}).get("infer_ms")
        model = f", median infer {infer:.1f} ms/batch" if infer is not None else ""
        rate = f"{r['images']:>6} images {r['seconds']:>8.2f} s {r['images_per_s']:>9.2f} img/s"
        out.append(f"  {backend:<6} {rate}{model}")
    out.append(
        f"  ray/local images/s {report['ray_over_local']:.2f}; overhead of the Ray path"
        f" {report['overhead_ms_per_image']:+.2f} ms per image"
    )
    return out
