"""Runs of the real daemon, `inferd run --once` on the bench's images (its throughput), drops one
at a time into a running daemon (latency) and a backlog in incoming/ (peak RSS)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import BenchError, cpu, rate
from bench.harness import Daemon, DaemonExited, Record, toml
from bench.images import photo_like
from daemon import progress
from daemon.config import DEFAULTS

BACKLOG_SIZE = (320, 240)
STALL_TIMEOUT_S = 600.0  # the daemon must log something this often, or the bench gives up
EXIT_TIMEOUT_S = 120.0


def daemon_config(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The raw config of a daemon run whose data dirs live under `root`."""
    weights = str(Path(args.weights).resolve()) if Path(args.weights).exists() else args.weights
    devices = args.devices if args.devices == "auto" else [d.strip() for d in args.devices.split(",")]
    return {
        "paths": {name: str(root / name) for name in DEFAULTS["paths"]},
        "model": {"weights": weights, "imgsz": args.imgsz, "devices": devices}
        | ({"calibration": str(args.calibration.resolve())} if getattr(args, "calibration", None) else {}),
        "pipeline": {"max_batch": args.batch, "decode": args.decode},
        "output": {"database": args.database},  # a relative sqlite:/// URL lands under `root`
        "log": {"format": "json"},
    }


def new_run(workdir: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The raw config of a daemon run in `workdir/name`, emptied first (a rerun in the same --workdir
    starts clean). The run uses the bench's model cache (`workdir/work/models`): it finds the exports
    and the measured choice there instead of making them again (never timed either way)."""
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    models = workdir / "work" / "models"
    models.mkdir(parents=True, exist_ok=True)
    (root / "work").mkdir(parents=True)
    (root / "work" / "models").symlink_to(models.resolve())
    return daemon_config(root, args)


def share_models(workdir: Path, models: Path) -> None:
    """`--models`: the bench's model cache is `models`, kept across runs (exports and the measured
    choice are made once per machine, not once per --workdir)."""
    link = workdir / "work" / "models"
    models.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != models.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(models.resolve())


def start(raw: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> Daemon:
    """The daemon on the config `raw`, written beside its data dirs."""
    root = Path(raw["paths"]["work"]).parent
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.toml"
    config.write_text(toml(raw))
    return Daemon(config, *args, env=env)


def records(daemon: Daemon) -> Iterator[tuple[float, Record]]:
    """(arrival time, record) as they come; BenchError if the daemon exits, stalls or fails an image."""
    while True:
        try:
            arrived, record = daemon.next_record(STALL_TIMEOUT_S)
        except TimeoutError:
            raise BenchError(f"the daemon logged nothing for {STALL_TIMEOUT_S:.0f} s") from None
        except DaemonExited:
            tail = daemon.stderr()[-2000:]
            raise BenchError(f"the daemon exited with status {daemon.proc.wait()}:\n{tail}") from None
        if record.get("event") == "image_failed":
            raise BenchError(f"the daemon failed an image: {record}")
        yield arrived, record


def until(daemon: Daemon, event: str) -> tuple[float, Record]:
    """Wait for `event`: its arrival time and its record."""
    for arrived, record in records(daemon):
        if record.get("event") == event:
            return arrived, record
    raise AssertionError("records() ends only by raising")


def exit_status(daemon: Daemon) -> int:
    try:
        return daemon.proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the daemon did not exit within {EXIT_TIMEOUT_S:.0f} s") from None


def run_once(
    raw: dict[str, Any],
    sources: list[Path],
    names: list[str],
    *,
    label: str = "inferd",
    env: dict[str, str] | None = None,
    cpu_usage: bool = False,
) -> dict[str, Any]:
    """`inferd run --once` on `sources` (as `names`), timed from daemon_started to the last
    image_done; `cpu_usage`: with the main process's CPU between the two, by stage (bench.cpu)."""
    incoming = Path(raw["paths"]["incoming"])
    incoming.mkdir(parents=True)
    for source, name in zip(sources, names, strict=True):
        os.link(source, incoming / name)  # the daemon moves the link to done/; the source stays
    with start(raw, "--once", env=env) as daemon, progress.bar(label, len(names)) as bar:
        started, info = until(daemon, "daemon_started")
        before = cpu.sample(daemon.proc.pid) if cpu_usage else None
        usage: dict[str, Any] = {}
        done: set[str] = set()
        stages: dict[str, list[float]] = {}
        finished = started  # the last result durable: the daemon's own exit is not throughput
        for arrived, record in records(daemon):
            if record.get("event") == "image_done":
                bar.update(1)
                done.add(record["path"])
                finished = arrived
                if before is not None and len(done) == len(names):  # the last one: the daemon now drains
                    usage = {"cpu": cpu.usage(before, cpu.sample(daemon.proc.pid), len(names))}
                for key in ("batch", *(k for k in record if k.endswith("_ms"))):
                    stages.setdefault(key, []).append(record[key])
            elif record.get("event") == "daemon_stopped":
                break
        status = exit_status(daemon)
        peak_rss_kib = daemon.peak_rss_kib
    output = Path(raw["paths"]["output"])
    missing = [n for n in names if n not in done]
    missing += [f"{n}: {s}" for n in names for s in (".txt", ".json") if not (output / (n + s)).is_file()]
    if status != 0 or missing:
        raise BenchError(f"inferd --once: exit status {status}, missing results {missing[:5]}")
    rss_mib = peak_rss_kib / 1024 if peak_rss_kib else None  # None: it exited before /proc was read
    threads = f"{info['torch_threads']}+{info['preprocess_threads']}"
    medians = {k: statistics.median(v) for k, v in stages.items()}  # where an image's time went
    return rate(len(names), finished - started, threads=threads, rss_mib=rss_mib, medians=medians, **usage)


def latency(images: list[Path], raw: dict[str, Any], per_s: float) -> dict[str, Any]:
    """Drop files one at a time at `per_s` into a running daemon; drop -> image_done percentiles."""
    import numpy as np

    incoming = Path(raw["paths"]["incoming"])
    incoming.mkdir(parents=True)
    dropped: dict[str, float] = {}
    arrived: dict[str, float] = {}
    with start(raw) as daemon:
        until(daemon, "daemon_started")
        begun = time.monotonic()
        for i, source in enumerate(images):
            name = f"drop-{i:05d}.jpg"
            shutil.copyfile(source, incoming / f".{name}.tmp")  # hidden: the daemon ignores it
            time.sleep(max(0.0, begun + i / per_s - time.monotonic()))  # the load generator's pace
            dropped[name] = time.monotonic()
            os.rename(incoming / f".{name}.tmp", incoming / name)
        for t, record in records(daemon):
            if record.get("event") == "image_done":
                arrived[record["path"]] = t
            if arrived.keys() >= dropped.keys():
                break
        daemon.proc.send_signal(signal.SIGTERM)
        status = exit_status(daemon)
    if status != 0:
        raise BenchError(f"inferd after SIGTERM: exit status {status}")
    ms = np.array([(arrived[n] - dropped[n]) * 1000 for n in dropped])
    keys = ("p50_ms", "p95_ms", "p99_ms", "max_ms")
    stats = dict(zip(keys, np.percentile(ms, [50, 95, 99, 100]).tolist(), strict=True))
    return {"files": len(ms), "rate_per_s": per_s, **stats}


def backlog(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of the daemon's main process while it drains N waiting files, for each N."""
    small = workdir / "backlog.jpg"
    photo_like(*BACKLOG_SIZE, seed=args.seed).save(small, quality=90)
    done = []
    for n in args.backlog:
        names = [f"b{i:06d}.jpg" for i in range(n)]
        done.append(run_once(new_run(workdir, f"backlog-{n}", args), [small] * n, names))
        if done[-1]["rss_mib"] is None:
            raise BenchError(f"backlog {n}: the daemon exited before its VmHWM could be read")
    size = "x".join(map(str, BACKLOG_SIZE))
    return {"image_size": size, "runs": done, "rss_ratio": done[-1]["rss_mib"] / done[0]["rss_mib"]}
