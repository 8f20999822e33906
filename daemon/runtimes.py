"""Which runtime runs the model, at which precision, and the exported artefact it loads.

`choose` makes `model.runtime` and `model.precision` concrete for one device: OpenVINO on CPUs,
TensorRT on CUDA when the `tensorrt` package imports (else PyTorch); fp16 on CUDA, bf16 on CPUs
with AMX (detected from /proc/cpuinfo, never assumed), fp32 on other CPUs. bf16 on request needs
AMX or AVX512-BF16.

`ensure` returns the artefact a device process loads: the user's weights when they are already
an export (`.onnx`, `*_openvino_model/`, `.engine`) or the runtime is PyTorch, else an export of
the `.pt` made once with Ultralytics' exporter and cached under `work/models/`. A cache entry is
a directory named after a digest of everything that changes the artefact (the weights' content,
imgsz, max batch, runtime and its version, precision, device kind). It is built in a hidden temp
directory under an exclusive `fcntl` lock, its files hashed into `manifest.json` (written last),
then renamed into place: a reader sees a whole entry or none, concurrent builders wait on the
lock and then find the entry built, and an entry whose files no longer match its manifest (a
half-copied backup, a disk error) is rebuilt. The export is dynamic in batch and image size, so
every letterboxed shape runs without a rebuild; the largest batch is the export's `max_batch`.

`python -m daemon.runtimes '<json>'` runs `ensure` in a child process for the daemon (the main
process never imports torch) and reports on stdout as JSON lines: `export_started` when it
builds, then the result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, Precision, Runtime
from daemon.errors import ExportError as ExportError  # re-exported: its old home

MANIFEST = "manifest.json"
SCHEMA = 1  # bump when the way an entry is built changes
FORMATS = {Runtime.OPENVINO: "openvino", Runtime.ONNXRUNTIME: "onnx", Runtime.TENSORRT: "engine"}
DISTRIBUTIONS = {
    Runtime.TORCH: "torch",
    Runtime.OPENVINO: "openvino",
    Runtime.ONNXRUNTIME: "onnxruntime",
    Runtime.TENSORRT: "tensorrt",
}
# precision = "auto" picks bf16 on CPUs with AMX (OpenVINO only): its detections match fp32's within
# the accuracy bar on real photos. With AVX512-BF16 alone, OpenVINO's bf16 ran at 0.75x its fp32
# (README, "Runtimes and precision"), so auto keeps fp32 there; "bf16" can still be asked for.
AUTO_BF16 = True
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


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (the first processor's `flags` line); empty where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def has_bf16(flags: frozenset[str]) -> bool:
    """bf16 arithmetic: AMX (Sapphire Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4)."""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def has_amx(flags: frozenset[str]) -> bool:
    """bf16 matrix tiles: where bf16 is faster than fp32 (AVX512-BF16 alone measured slower)."""
    return "amx_bf16" in flags


def exported_as(weights: str) -> Runtime | None:
    """The runtime of weights that are already an export, or None for a PyTorch checkpoint."""
    path = Path(weights.rstrip("/"))
    if path.suffix == ".onnx":
        return Runtime.ONNXRUNTIME
    if path.suffix == ".engine":
        return Runtime.TENSORRT
    if path.name.endswith("_openvino_model") or path.suffix == ".xml":
        return Runtime.OPENVINO
    return None


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def choose(
    runtime: Runtime,
    precision: Precision,
    *,
    device: str,
    weights: str,
    flags: frozenset[str] | None = None,
    tensorrt: bool | None = None,
) -> tuple[Runtime, Precision]:
    """The concrete (runtime, precision) for `device` ("cpu" or "cuda:N"); a ConfigError names the
    key and the fix when the combination cannot run here."""
    cuda = device.startswith("cuda")
    given = exported_as(weights)
    if given is not None:
        if runtime not in (Runtime.AUTO, given):
            raise ConfigError(
                "model.runtime",
                f"is {runtime.value!r} but {weights} is already a {given.value} export",
                f'write runtime = "auto" or "{given.value}", or give the .pt weights',
            )
        runtime = given
    elif runtime is Runtime.AUTO:
        if cuda:
            runtime = Runtime.TENSORRT if (importable("tensorrt") if tensorrt is None else tensorrt) else Runtime.TORCH
        else:
            runtime = Runtime.OPENVINO
    if runtime is Runtime.OPENVINO and cuda:
        raise ConfigError(
            "model.runtime", "openvino runs on CPUs here, not on CUDA devices", 'use "auto" or "tensorrt"'
        )
    if runtime is Runtime.TENSORRT and not cuda:
        raise ConfigError("model.runtime", "tensorrt needs a CUDA device", 'use "auto" or "openvino" on a CPU')
    installed = tensorrt if runtime is Runtime.TENSORRT and tensorrt is not None else None
    if runtime is not Runtime.TORCH and not (
        installed if installed is not None else importable(DISTRIBUTIONS[runtime])
    ):
        extra = f" (pip install 'inferd[{runtime.value}]')" if runtime is not Runtime.OPENVINO else ""
        raise ConfigError(
            "model.runtime",
            f"is {runtime.value!r} but that package is not installed{extra}",
            'install it or use "torch"',
        )
    if precision is Precision.AUTO:
        if cuda:
            precision = Precision.FP16
        elif AUTO_BF16 and runtime is Runtime.OPENVINO and has_amx(cpu_flags() if flags is None else flags):
            precision = Precision.BF16
        else:
            precision = Precision.FP32
    allowed = {
        Runtime.TORCH: {Precision.FP32, Precision.FP16} if cuda else {Precision.FP32},
        Runtime.OPENVINO: {Precision.FP32, Precision.BF16},
        Runtime.ONNXRUNTIME: {Precision.FP32, Precision.FP16} if cuda else {Precision.FP32},
        Runtime.TENSORRT: {Precision.FP32, Precision.FP16},
    }[runtime]
    if precision not in allowed:
        names = sorted(p.value for p in allowed)
        raise ConfigError(
            "model.precision", f"{precision.value} is not available with {runtime.value} on {device}", f"use {names}"
        )
    if precision is Precision.BF16 and not has_bf16(cpu_flags() if flags is None else flags):
        raise ConfigError(
            "model.precision", "bf16 needs a CPU with AMX or AVX512-BF16 and this one has neither", 'use "fp32"'
        )
    return runtime, precision


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def device_kind(runtime: Runtime, device: str) -> str:
    """What an artefact is specific to: a TensorRT engine to the GPU model, the others to the device type."""
    if runtime is Runtime.TENSORRT:
        import torch

        return "cuda:" + torch.cuda.get_device_name(torch.device(device))
    return "cuda" if device.startswith("cuda") else "cpu"


def cache_key(
    weights: Path, *, imgsz: int, max_batch: int, runtime: Runtime, precision: Precision, kind: str
) -> dict[str, Any]:
    """Everything that changes the artefact."""
    return {
        "schema": SCHEMA,
        "weights_sha256": file_digest(weights),
        "imgsz": imgsz,
        "max_batch": max_batch,
        "runtime": runtime.value,
        "runtime_version": importlib.metadata.version(DISTRIBUTIONS[runtime]),
        "ultralytics": importlib.metadata.version("ultralytics"),
        "precision": precision.value,
        "device_kind": kind,
    }


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
    on_build: Any = None,
) -> Plan:
    """The artefact for a concrete (runtime, precision) on `device`, exported into the cache if
    it is not there yet. `on_build()` is called when an export starts. ExportError on failure."""
    if runtime is Runtime.TORCH or exported_as(weights) is not None:
        return Plan(runtime, precision, weights)
    source = Path(weights)
    key = cache_key(
        source,
        imgsz=imgsz,
        max_batch=max_batch,
        runtime=runtime,
        precision=precision,
        kind=device_kind(runtime, device),
    )
    name = entry_name(source, key)
    entry = cache_dir / name
    if (artefact := valid(entry, key)) is not None:
        return Plan(runtime, precision, str(artefact))
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
            rel = _export(source, tmp, key, runtime=runtime, precision=precision, device=device)
            _seal(tmp, key, rel)
            os.rename(tmp, entry)
            _fsync_dir(cache_dir)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
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

    tmp.mkdir(parents=True)
    copy = tmp / "model.pt"  # the exporter writes beside its input
    shutil.copyfile(source, copy)
    with warnings.catch_warnings():
        # Tracing warns by design (torch.jit.trace's deprecation, TracerWarning on shape-dependent
        # Python): expected for these models, and noise in the daemon's stderr.
        warnings.simplefilter("ignore")
        out = YOLO(str(copy)).export(
            format=FORMATS[runtime],
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
    if runtime is Runtime.TENSORRT:
        (tmp / "model.onnx").unlink(missing_ok=True)  # its intermediate
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
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compile_openvino(backend: Any, artefact: str, precision: Precision, threads: int) -> None:
    """Recompile an AutoBackend's OpenVINO model with our precision and thread count: its own
    compile leaves the CPU's default (bf16 on AMX chips) and takes every core."""
    import openvino as ov

    inner = backend.backend
    path = Path(artefact)
    xml = path if path.is_file() else next(path.glob("*.xml"))
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": ov.Type.bf16 if precision is Precision.BF16 else ov.Type.f32,
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    inner.ov_compiled_model = inner.compile_model(ov.Core().read_model(str(xml)), config=config)


def main(argv: list[str]) -> int:
    """The child-process entry: one JSON request in argv, JSON lines out (see the module doc)."""
    request = json.loads(argv[0])

    def say(**record: Any) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    from daemon.errors import ModelError
    from daemon.weights import resolve_weights

    try:
        weights = resolve_weights(request["weights"])
        runtime, precision = choose(
            Runtime(request["runtime"]), Precision(request["precision"]), device=request["device"], weights=weights
        )
        plan = ensure(
            weights,
            imgsz=request["imgsz"],
            max_batch=request["max_batch"],
            runtime=runtime,
            precision=precision,
            device=request["device"],
            cache_dir=Path(request["cache_dir"]),
            on_build=lambda: say(event="export_started", runtime=runtime.value, precision=precision.value),
        )
    except (ConfigError, ModelError, ExportError) as exc:
        say(event="error", kind=type(exc).__name__, message=str(exc))
        return 1
    say(event="plan", **plan.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
