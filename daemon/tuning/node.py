"""A Ray node's own export and measured choice: what a device actor does before it loads its model
(daemon.cluster.actor), so that each node runs what is fastest on its own hardware.

The daemon's machine measures nothing for Ray actors (export.resolve skips the Ray backend): each
actor runs the exporter's child process (`python -m daemon.tuning [tune]`, as export.prepare runs
it locally) on its node, into the node's cache. With `runtime = "auto"` and `precision = "auto"`
on a CPU actor it measures runtime x precision x batch size in the actor's one layout (1 process x
its threads); the node's actors take turns on a lock, so the first measures and the others read
the cached choice. INT8 is calibrated on the node from the calibration images sent with the load
(their names and bytes: the cache key is the same set's digest on every node).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, Precision, Runtime
from daemon.errors import ExportError
from daemon.runtimes import cache
from daemon.runtimes.specs import choose
from daemon.tuning import tune

CHILD_TIMEOUT_S = 900.0  # exports and the measurement: far above what they take; the daemon's start timeout rules


def prepare(args: dict[str, Any], cache_dir: Path, root: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`args` (a DeviceSpec's fields, the weights a file of this node) with the calibration images
    (`calibration_files`) written under `root` and, for "auto" on a CPU, the node's measured runtime and precision; its
    artefact exported into `cache_dir`. Also the measured choice as a record (None if none was
    measured). ExportError (the accuracy gate, a failed export: its message) when it cannot run
    here."""
    files = root / "calibration"
    files.mkdir(exist_ok=True)
    for name, data in args.get("calibration_files") or ():
        (files / Path(name).name).write_bytes(data)
    calibration = [str(p) for p in cache.images_in(files)]
    args = {**args, "calibration": tuple(calibration)}
    request = {
        "weights": args["weights"],
        "imgsz": args["imgsz"],
        "max_batch": args["max_batch"],
        "runtime": args["runtime"],
        "precision": args["precision"],
        "device": args["device"],
        "cache_dir": str(cache_dir),
        "calibration": calibration,
    }
    tuned = None
    if args["runtime"] == "auto" and args["precision"] == "auto" and args["device"] == "cpu":
        request.update(cpu_workers=1, torch_threads=args["torch_threads"], devices=["cpu"])
        cache_dir.mkdir(parents=True, exist_ok=True)
        with cache.locked(cache_dir / ".tune.lock"):  # the node's actors take turns: one measures
            choice = tune.cached(request)
            fresh = choice is None
            if choice is None:
                choice = tune.Choice.load(_child(["tune", json.dumps(request)], "tuned"))
        args.update(runtime=choice.runtime, precision=choice.precision)
        tuned = {"runtime": choice.runtime, "precision": choice.precision, "batch": choice.batch,
                 "layout": f"{choice.processes}x{choice.threads}", "measured_now": fresh, "tune_s": choice.tune_s,
                 "table": [tune.describe(r) for r in choice.table]}  # fmt: skip
        request.update(runtime=choice.runtime, precision=choice.precision)
    if args["runtime"] != "torch" and args["device"] == "cpu" and not _cached(request):
        _child([json.dumps(request)], "plan")  # INT8 needs the child's quantize; the rest are made there too
    return args, tuned


def _cached(request: dict[str, Any]) -> bool:
    """Whether the artefact is in the node's cache already (no child process, no torch)."""
    try:
        runtime, precision = choose(Runtime(request["runtime"]), Precision(request["precision"]),
                                    device="cpu", weights=request["weights"])  # fmt: skip
    except ConfigError:
        return False  # the child says why
    plan = cache.lookup(request["weights"], imgsz=request["imgsz"], max_batch=request["max_batch"], runtime=runtime,
                        precision=precision, device="cpu", cache_dir=Path(request["cache_dir"]),
                        calibration=tuple(Path(p) for p in request["calibration"]))  # fmt: skip
    return plan is not None


def _child(argv: list[str], expected: str) -> dict[str, Any]:
    """Run the exporter's child process to its end: its last JSON record, which must be `expected`."""
    done = subprocess.run([sys.executable, "-m", "daemon.tuning", *argv], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, check=False)  # fmt: skip
    answer: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a library's stray print
        if isinstance(record, dict) and record.get("event") not in ("export_started", "tune_started"):
            answer = record
    if answer.pop("event", None) != expected or done.returncode != 0:
        message = answer.get("message") or (
            f"the exporter exited with status {done.returncode}: {done.stderr[-1500:]}. Fix: {cache.FIX}"
        )
        raise ExportError(f"on node {socket.gethostname()}: {message}")
    return answer
