"""The export cache: an artefact per (weights, imgsz, max batch, runtime and version, precision,
device kind, calibration set), built once under a lock and sealed by a manifest.

A cache entry is a directory named after a digest of its key. It is built in a hidden temp
directory under an exclusive `fcntl` lock, its files hashed into `manifest.json` (written last),
then renamed into place: a reader sees a whole entry or none, concurrent builders wait on the
lock and then find the entry built, and an entry whose files no longer match its manifest (a
half-copied backup, a disk error) is rebuilt. The export is dynamic in batch and image size, so
every letterboxed shape runs without a rebuild; the largest batch is the export's `max_batch`.
An INT8 entry is quantized from the fp32 OpenVINO entry on the calibration images, and sealed
only once it passed the accuracy gate (daemon.runtimes.openvino).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon import durable
from daemon.config import Precision, Runtime
from daemon.errors import ExportError as ExportError  # re-exported: raised here
from daemon.runtimes.specs import SPECS, device_type, exported_as

Quantize = Callable[[Path, Path, tuple[Path, ...], int, int], str]  # (fp32 entry, tmp, images, imgsz, batch)
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST = "manifest.json"
SCHEMA = 2  # bump when the way an entry is built changes
FIX = 'set model.runtime = "torch" (PyTorch, slower) or fix the cause above'


@dataclass(frozen=True, slots=True)
class Plan:
    """What one device runs: `artefact` is what AutoBackend loads."""

    runtime: Runtime
    precision: Precision
    artefact: str
    built: bool = False  # exported just now (not found in the cache)
    export_s: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "runtime": self.runtime.value, "precision": self.precision.value}


def images_in(folder: Path) -> tuple[Path, ...]:
    """The image files directly in `folder` (model.calibration), sorted by name."""
    return tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES))


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def set_digest(files: tuple[Path, ...]) -> str:
    """A digest of a set of files' names and contents (the calibration images)."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()


def device_kind(runtime: Runtime, device: str) -> str:
    """What an artefact is specific to: the GPU model for some runtimes, else the device type."""
    if SPECS[runtime].per_gpu_model:
        import torch

        return "cuda:" + torch.cuda.get_device_name(torch.device(device))
    return device_type(device)


def cache_key(
    weights: Path,
    *,
    imgsz: int,
    max_batch: int,
    runtime: Runtime,
    precision: Precision,
    kind: str,
    calibration: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Everything that changes the artefact."""
    key = {
        "schema": SCHEMA,
        "weights_sha256": file_digest(weights),
        "imgsz": imgsz,
        "max_batch": max_batch,
        "runtime": runtime.value,
        "runtime_version": importlib.metadata.version(SPECS[runtime].distribution),
        "ultralytics": importlib.metadata.version("ultralytics"),
        "precision": precision.value,
        "device_kind": kind,
    }
    if precision is Precision.INT8:
        key["nncf"] = importlib.metadata.version("nncf")
        key["calibration_sha256"] = set_digest(calibration)
    return key


def entry_name(weights: Path, key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"{weights.stem}-{key['runtime']}-{key['precision']}-{digest}"


def valid(entry: Path, key: dict[str, Any]) -> Path | None:
    """The artefact of a whole, unaltered entry built for `key`; None otherwise."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest["key"] != key:
            return None
        for rel, (size, digest) in manifest["files"].items():
            f = entry / rel
            if f.stat().st_size != size or file_digest(f) != digest:
                return None
        return entry / str(manifest["artefact"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lookup(weights: str, *, imgsz: int, max_batch: int, runtime: Runtime, precision: Precision, device: str,
           cache_dir: Path, calibration: tuple[Path, ...] = ()) -> Plan | None:  # fmt: skip
    """The plan without exporting: weights that need no export, or a whole cached entry; None
    when an export is needed (or the weights are not a file: the exporter says why)."""
    if runtime is Runtime.TORCH or exported_as(weights) is not None:
        return Plan(runtime, precision, weights)
    if not Path(weights).is_file():
        return None
    key = cache_key(Path(weights), imgsz=imgsz, max_batch=max_batch, runtime=runtime, precision=precision,
                    kind=device_kind(runtime, device), calibration=calibration)  # fmt: skip
    artefact = valid(cache_dir / entry_name(Path(weights), key), key)
    return None if artefact is None else Plan(runtime, precision, str(artefact))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing); the kernel drops it if the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure(
    weights: str,
    *,
    imgsz: int,
    max_batch: int,
    runtime: Runtime,
    precision: Precision,
    device: str,
    cache_dir: Path,
    on_build: Callable[[], None] | None = None,
    calibration: tuple[Path, ...] = (),
    quantize: Quantize | None = None,
) -> Plan:
    """The artefact for a concrete (runtime, precision) on `device`, exported into the cache if
    it is not there yet. `on_build()` is called when an export starts. ExportError on failure;
    An INT8 entry is made by `quantize` (daemon.tuning.int8.quantize: the exporter's child passes
    it), which raises GateFailed when the quantized model does not match fp32 on held-out images."""
    if runtime is Runtime.TORCH or exported_as(weights) is not None:
        return Plan(runtime, precision, weights)
    source = Path(weights)
    key = cache_key(source, imgsz=imgsz, max_batch=max_batch, runtime=runtime, precision=precision,
                    kind=device_kind(runtime, device), calibration=calibration)  # fmt: skip
    name = entry_name(source, key)
    entry = cache_dir / name
    if (artefact := valid(entry, key)) is not None:
        return Plan(runtime, precision, str(artefact))
    base = None
    if precision is Precision.INT8:  # quantized from the fp32 export, which is cached on its own
        if quantize is None:
            raise ExportError(f"the INT8 entry of {source.name} is not cached: the daemon's exporter makes it first")
        base = ensure(weights, imgsz=imgsz, max_batch=max_batch, runtime=runtime, precision=Precision.FP32,
                      device=device, cache_dir=cache_dir, on_build=on_build)  # fmt: skip
    cache_dir.mkdir(parents=True, exist_ok=True)
    with locked(cache_dir / f".{name}.lock"):
        if (artefact := valid(entry, key)) is not None:  # another process built it while we waited
            return Plan(runtime, precision, str(artefact))
        for stale in [entry, *cache_dir.glob(f".{name}.tmp-*")]:  # corrupt, or left by a builder that died
            shutil.rmtree(stale, ignore_errors=True)
        if on_build is not None:
            on_build()
        started = time.monotonic()
        tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
        try:
            if base is None or quantize is None:
                rel = _export(source, tmp, key, runtime=runtime, precision=precision, device=device)
            else:
                rel = quantize(Path(base.artefact), tmp, calibration, imgsz, max_batch)
            _seal(tmp, key, rel)
            os.rename(tmp, entry)
            durable.fsync_dir(cache_dir)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if type(exc).__name__ == "GateFailed":
                raise
            if isinstance(exc, Exception) and not isinstance(exc, ExportError):
                raise ExportError(
                    f"exporting {source.name} to {runtime.value} ({precision.value}) failed: "
                    f"{type(exc).__name__}: {exc}. Fix: {FIX}"
                ) from exc
            raise
    return Plan(runtime, precision, str(entry / rel), built=True, export_s=time.monotonic() - started)


def _export(
    source: Path, tmp: Path, key: dict[str, Any], *, runtime: Runtime, precision: Precision, device: str
) -> str:
    """Ultralytics' exporter on a copy of the weights in `tmp`; the artefact's path relative to `tmp`."""
    from ultralytics.models import YOLO

    spec = SPECS[runtime]
    tmp.mkdir(parents=True)
    copy = tmp / "model.pt"  # the exporter writes beside its input
    shutil.copyfile(source, copy)
    with warnings.catch_warnings():
        # Tracing warns by design (torch.jit.trace's deprecation, TracerWarning on shape-dependent
        # Python): expected for these models, and noise in the daemon's stderr.
        warnings.simplefilter("ignore")
        out = YOLO(str(copy)).export(
            format=spec.export_format,
            imgsz=key["imgsz"],
            batch=key["max_batch"],
            dynamic=True,  # any letterboxed shape up to imgsz and any batch up to max_batch, no rebuild
            quantize=16 if precision is Precision.FP16 else None,  # OpenVINO's bf16 is a compile hint
            device=device,
            simplify=True,
            verbose=False,
        )
    artefact = Path(str(out))
    if not artefact.exists():
        raise ExportError(f"the {runtime.value} exporter reported {out} but wrote nothing there. Fix: {FIX}")
    copy.unlink()
    for leftover in spec.leftovers:
        (tmp / leftover).unlink(missing_ok=True)
    return str(artefact.relative_to(tmp))


def _seal(tmp: Path, key: dict[str, Any], artefact: str) -> None:
    """Hash and fsync every file, then write the manifest last: it is what makes an entry whole."""
    files: dict[str, tuple[int, str]] = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(f.relative_to(tmp))] = (f.stat().st_size, file_digest(f))
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"key": key, "artefact": artefact, "files": files}, indent=1))
    with open(manifest, "rb") as handle:
        os.fsync(handle.fileno())
    for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
        durable.fsync_dir(d)
