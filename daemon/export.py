"""The parent's side of the model cache: export what the devices will run before they start.

The export runs once per device type, before any device process is spawned, in a child process
of its own (`python -m daemon.tuning`): the main process never imports torch, the export gets
no `worker_start_timeout_s` (that deadline is for loading a ready artefact), and a stop request
during a long export kills that child at once (the lock it held dies with it; its temp dir is
removed by the next builder). While it runs, systemd hears WATCHDOG=1 and EXTEND_TIMEOUT_USEC,
so neither its start timeout nor its watchdog kill a legitimate first export. Several device
processes then load the same cached artefact; two daemons exporting at once wait on its lock.

A CPU artefact that is already cached is found here without a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

from daemon import runtimes
from daemon.config import Backend, Config, Precision, Runtime
from daemon.devices import DeviceName, DeviceStartError, calibration_images
from daemon.errors import ExportStopped as ExportStopped  # re-exported: its old home
from daemon.errors import ModelError
from daemon.messages import ExportFailed, ExportStarted, PlanMade, Record, Tuned, TuneStarted, decode_record
from daemon.notify import Notifier
from daemon.tuning import tune
from daemon.weights import resolve_weights

log = structlog.get_logger("daemon.export")
KEEPALIVE_S = 5.0  # systemd is told this often that a long export is progress
STDERR_TAIL = 4000


@dataclass(frozen=True, slots=True)
class Planned:
    """The plan for one torch device ("cpu", "cuda:0")."""

    device: str
    runtime: str
    precision: str
    artefact: str


def cache_dir(config: Config) -> Path:
    return config.paths.work / "models"


def request(config: Config, device: str) -> dict[str, Any]:
    m = config.model
    return {
        "weights": m.weights,
        "imgsz": m.imgsz,
        "max_batch": config.pipeline.max_batch,
        "runtime": m.runtime.value,
        "precision": m.precision.value,
        "device": device,
        "cache_dir": str(cache_dir(config)),
        "calibration": list(calibration_images(config)),
    }


async def prepare(
    config: Config, devices: list[str], *, stop: asyncio.Event | None = None, notifier: Notifier | None = None
) -> list[Planned]:
    """Make sure every device's artefact is in the cache (exporting it if not); one plan per
    device type. DeviceStartError when the config cannot run or the export fails; ExportStopped
    when `stop` is set meanwhile."""
    # Ray actors (ray:...) run the PyTorch weights they are sent: nothing to export here.
    kinds = sorted({n.torch for n in map(DeviceName.parse, devices) if not n.remote})
    return [await _prepare_one(config, device, stop, notifier) for device in kinds]


def tune_request(config: Config) -> dict[str, Any]:
    m, p = config.model, config.pipeline
    return {
        "weights": m.weights,
        "imgsz": m.imgsz,
        "max_batch": p.max_batch,
        "cpu_workers": p.cpu_workers,
        "torch_threads": p.torch_threads,
        "devices": list(m.devices),
        "runtime": "auto",
        "device": "cpu",
        "cache_dir": str(cache_dir(config)),
        "calibration": list(calibration_images(config)),
    }


async def resolve(config: Config, *, stop: asyncio.Event | None = None, notifier: Notifier | None = None) -> Config:
    """`config` with `model.runtime` and `model.precision` = "auto" made concrete on a CPU by the
    measured choice (daemon.tuning.tune), the layout it measured as `pipeline.cpu_workers`
    and `torch_threads` where those are 0 (auto), and its batch size as `pipeline.tuned_batch`
    (a device's batches are capped at it; the artefact stays exported for `max_batch`). Measured
    once in a child process, then read from the cache. Unchanged when either is given, on CUDA
    devices and with the Ray backend."""
    m = config.model
    if m.runtime is not Runtime.AUTO or m.precision is not Precision.AUTO or config.cluster.backend is Backend.RAY:
        return config
    if runtimes.exported_as(m.weights) is not None:
        return config
    req = tune_request(config)
    try:
        req["weights"] = await asyncio.to_thread(resolve_weights, m.weights)
    except ModelError as exc:
        raise DeviceStartError(f"model: {exc}", permanent=True) from None
    if not await asyncio.to_thread(Path(req["weights"]).is_file):
        return config  # nothing to measure: loading it fails in the device processes, with its own message
    choice = await asyncio.to_thread(tune.cached, req)
    fresh = choice is None
    if choice is None:
        answer, code, tail = await _child(["daemon.tuning", "tune", json.dumps(req)], req, stop, notifier)
        if not isinstance(answer, Tuned) or code != 0:
            message = _failure(answer) or f"measuring the runtimes exited with status {code}: {tail[-1500:]}"
            log.error("runtime_tune_failed", error=message)
            raise DeviceStartError(f"model.runtime = auto: {message}", permanent=True)
        choice = tune.Choice.load(msgspec.structs.asdict(answer))
    if choice.skipped:
        return config
    log.info("runtime_tuned", runtime=choice.runtime, precision=choice.precision, layout=f"{choice.processes}x"
             f"{choice.threads}", batch=choice.batch, measured_now=fresh, tune_s=choice.tune_s,
             table=[tune.describe(r) for r in choice.table])  # fmt: skip
    p = config.pipeline
    model = dataclasses.replace(m, runtime=Runtime(choice.runtime), precision=Precision(choice.precision))
    pipeline = dataclasses.replace(
        p,
        cpu_workers=p.cpu_workers or choice.processes,
        torch_threads=p.torch_threads or choice.threads,
        tuned_batch=choice.batch,  # the devices take batches of at most this (local.local_devices)
    )
    return dataclasses.replace(config, model=model, pipeline=pipeline)


def _cached(req: dict[str, Any]) -> Planned | None:
    """The plan of a CPU device without a child process: torch, an export given as weights, or
    an entry already in the cache. None: the child must look (and maybe export)."""
    from daemon.config import ConfigError, Precision, Runtime
    from daemon.errors import ModelError
    from daemon.weights import resolve_weights

    try:
        weights = resolve_weights(req["weights"])
        runtime, precision = runtimes.choose(
            Runtime(req["runtime"]), Precision(req["precision"]), device=req["device"], weights=weights
        )
    except (ConfigError, ModelError) as exc:
        raise DeviceStartError(f"{req['device']}: {exc}", permanent=True) from None
    plan = runtimes.lookup(
        weights, imgsz=req["imgsz"], max_batch=req["max_batch"], runtime=runtime, precision=precision,
        device=req["device"], cache_dir=Path(req["cache_dir"]), calibration=tuple(Path(p) for p in req["calibration"]),
    )  # fmt: skip
    return None if plan is None else Planned(req["device"], runtime.value, precision.value, plan.artefact)


async def _prepare_one(config: Config, device: str, stop: asyncio.Event | None, notifier: Notifier | None) -> Planned:
    req = request(config, device)
    if not device.startswith("cuda") and (found := await asyncio.to_thread(_cached, req)) is not None:
        return found
    answer, code, tail = await _child(["daemon.tuning", json.dumps(req)], req, stop, notifier)
    if isinstance(answer, PlanMade) and code == 0:
        return Planned(req["device"], answer.runtime, answer.precision, answer.artefact)
    message = _failure(answer) or (
        f"the {req['runtime']} exporter exited with status {code}: {tail.strip()[-1500:]}. Fix: {runtimes.FIX}"
    )
    log.error("model_export_failed", device=req["device"], runtime=req["runtime"], error=message)
    raise DeviceStartError(f"{req['device']}: {message}", permanent=True)  # the policy: exit 78, no fallback


def _failure(answer: Record | None) -> str:
    """What the child said went wrong, if it said so."""
    return answer.message if isinstance(answer, ExportFailed) else ""


async def _child(
    args: list[str], req: dict[str, Any], stop: asyncio.Event | None, notifier: Notifier | None
) -> tuple[Record | None, int, str]:
    """Run `python -m ARGS` to its end: its last JSON record, exit status and stderr's tail.
    ExportStopped (the child killed at once) when `stop` is set meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    work = asyncio.ensure_future(_follow(proc, req, notifier))
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else asyncio.get_running_loop().create_future()
    try:
        await asyncio.wait([work, stopper], return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        log.warning("model_export_stopped", device=req["device"], runtime=req["runtime"])
        raise ExportStopped(req["device"])
    finally:
        stopper.cancel()
        if not work.done():  # stopped or cancelled: the exporter goes now, its temp dir with the next builder
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work


async def _follow(
    proc: asyncio.subprocess.Process, req: dict[str, Any], notifier: Notifier | None
) -> tuple[Record | None, int, str]:
    """Read the child's JSON lines to its end; keep systemd patient while it exports or measures."""
    assert proc.stdout is not None and proc.stderr is not None
    stderr = asyncio.ensure_future(proc.stderr.read())
    keepalive: asyncio.Task[None] | None = None
    answer: Record | None = None
    started = time.monotonic()
    try:
        async for line in proc.stdout:
            try:
                record = decode_record(line)
            except msgspec.DecodeError:
                continue  # a library's stray print
            if not isinstance(record, ExportStarted | TuneStarted):
                answer = record
                continue
            started = time.monotonic()
            if isinstance(record, ExportStarted):
                log.info("model_export_started", device=req["device"], runtime=record.runtime,
                         precision=record.precision, weights=req["weights"], cache=req["cache_dir"])  # fmt: skip
            else:
                log.info("runtime_tune_started", weights=req["weights"], budget_s=tune_budget_s())
            if notifier is not None and keepalive is None:
                what = record.runtime if isinstance(record, ExportStarted) else "the fastest runtime"
                keepalive = asyncio.ensure_future(_keep_alive(notifier, what))
        code = await proc.wait()
        tail = (await stderr).decode(errors="replace")[-STDERR_TAIL:]
    finally:
        if keepalive is not None:
            keepalive.cancel()
        stderr.cancel()
    if isinstance(answer, PlanMade) and code == 0 and answer.built:
        log.info("model_export_done", device=req["device"], runtime=answer.runtime, precision=answer.precision,
                 artefact=answer.artefact, export_s=round(time.monotonic() - started, 2))  # fmt: skip
    return answer, code, tail


def tune_budget_s() -> float:
    return tune.BUDGET_S


async def _keep_alive(notifier: Notifier, runtime: str) -> None:
    notifier.status(f"exporting the model to {runtime} (once; cached for later starts)")
    while True:
        notifier.send(EXTEND_TIMEOUT_USEC=int(KEEPALIVE_S * 4 * 1_000_000))
        notifier.watchdog()
        await asyncio.sleep(KEEPALIVE_S)  # a period, not a wait for something
