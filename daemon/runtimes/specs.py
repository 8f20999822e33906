"""The room: one `RuntimeSpec` per runtime, in one table. Adding a runtime is a row here.

Everything that differs between runtimes is a field of its spec: the package that must import
(and whose version keys the cache), Ultralytics' export format, how weights that are already
such an export are recognised, the devices and precisions it runs, what else it needs after
Ultralytics loads it, and how many CPU processes it wants before a measurement says otherwise.
`choose` makes `model.runtime`/`model.precision` concrete from the table alone; the measured
choice (`daemon.runtimes.tune`) decides "auto" on CPUs before that.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, Precision, Runtime

PostLoad = Callable[[Any, str, Precision, int], None]  # (AutoBackend, artefact, precision, threads)


@dataclass(frozen=True, slots=True)
class RuntimeSpec:
    """What inferd knows about one runtime."""

    runtime: Runtime
    distribution: str  # the package that must import; its version is in the cache key
    export_format: str | None  # Ultralytics' `format=`; None: the .pt runs as it is
    suffixes: tuple[str, ...]  # weights whose name ends so are already this runtime's export
    precisions: Mapping[str, frozenset[Precision]]  # per device type ("cpu", "cuda")
    extra: str | None = None  # pip install 'inferd[extra]' brings it
    per_gpu_model: bool = False  # an artefact is specific to the GPU model, not just "cuda"
    leftovers: tuple[str, ...] = ()  # intermediates the exporter leaves beside the artefact
    post_load: PostLoad | None = None  # after AutoBackend loads the artefact
    cpu_processes: Callable[[int], int] = field(default=lambda cores: min(cores, 4))  # before a measurement

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(self.precisions)

    def installed(self) -> bool:
        return importable(self.distribution)


def _compile_openvino(backend: Any, artefact: str, precision: Precision, threads: int) -> None:
    from daemon.runtimes.openvino import compile_model

    compile_model(backend, artefact, precision, threads)


def _threads_onnxruntime(backend: Any, artefact: str, precision: Precision, threads: int) -> None:
    """A new CPU session with our thread count: Ultralytics' takes every core, and two device
    processes would then fight over them."""
    inner = backend.backend
    if not threads or getattr(inner, "use_io_binding", False):  # a GPU session: its threads do not matter
        return
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    inner.session = onnxruntime.InferenceSession(artefact, options, providers=inner.session.get_providers())


_CPU32 = frozenset({Precision.FP32})
_HALF = frozenset({Precision.FP32, Precision.FP16})
SPECS: dict[Runtime, RuntimeSpec] = {
    s.runtime: s
    for s in (
        RuntimeSpec(Runtime.TORCH, "torch", None, (), {"cpu": _CPU32, "cuda": _HALF}),
        RuntimeSpec(
            Runtime.OPENVINO,
            "openvino",
            "openvino",
            ("_openvino_model", ".xml"),
            {"cpu": frozenset({Precision.FP32, Precision.BF16, Precision.INT8})},
            post_load=_compile_openvino,  # our precision and thread count, not its defaults
            cpu_processes=lambda cores: 1,  # one process with every core's threads (README, measured)
        ),
        RuntimeSpec(
            Runtime.ONNXRUNTIME,
            "onnxruntime",
            "onnx",
            (".onnx",),
            {"cpu": _CPU32, "cuda": _HALF},
            extra="onnxruntime",
            post_load=_threads_onnxruntime,
        ),
        RuntimeSpec(
            Runtime.TENSORRT,
            "tensorrt",
            "engine",
            (".engine",),
            {"cuda": _HALF},
            extra="tensorrt",
            per_gpu_model=True,
            leftovers=("model.onnx",),
        ),
    )
}
# Without a measurement (GPUs; a Runner given "auto"): the first installed of these, per device type.
AUTO_ORDER: dict[str, tuple[Runtime, ...]] = {
    "cpu": (Runtime.OPENVINO, Runtime.TORCH),
    "cuda": (Runtime.TENSORRT, Runtime.TORCH),
}
AUTO_PRECISION = {"cpu": Precision.FP32, "cuda": Precision.FP16}


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def device_type(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def exported_as(weights: str) -> Runtime | None:
    """The runtime of weights that are already an export, or None for a PyTorch checkpoint."""
    path = Path(weights.rstrip("/"))
    for spec in SPECS.values():
        if any(path.name.endswith(s) for s in spec.suffixes):
            return spec.runtime
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (the first processor's `flags` line); empty where unreadable."""
    return frozenset(cpu_field("flags", cpuinfo).split())


def cpu_field(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A field of the first processor in /proc/cpuinfo ("model name", "flags"); "" if unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def has_bf16(flags: frozenset[str]) -> bool:
    """bf16 arithmetic: AMX (Sapphire Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4)."""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def has_amx(flags: frozenset[str]) -> bool:
    return "amx_bf16" in flags


def choose(
    runtime: Runtime,
    precision: Precision,
    *,
    device: str,
    weights: str,
    flags: frozenset[str] | None = None,
    tensorrt: bool | None = None,
) -> tuple[Runtime, Precision]:
    """The concrete (runtime, precision) for `device` ("cpu" or "cuda:N") from the table; a
    ConfigError names the key and the fix when the combination cannot run here. "auto" here is
    the unmeasured fallback: the daemon measures on CPUs first (daemon.runtimes.tune)."""
    kind = device_type(device)
    given = exported_as(weights)
    if given is not None:
        if runtime not in (Runtime.AUTO, given):
            raise ConfigError(
                "model.runtime",
                f"is {runtime.value!r} but {weights} is already a {given.value} export",
                f'write runtime = "auto" or "{given.value}", or give the .pt weights',
            )
        runtime = given

    def installed(r: Runtime) -> bool:
        if r is Runtime.TENSORRT and tensorrt is not None:
            return tensorrt
        return r is Runtime.TORCH or SPECS[r].installed()

    if runtime is Runtime.AUTO:
        runtime = next(r for r in AUTO_ORDER[kind] if installed(r))
    spec = SPECS[runtime]
    if kind not in spec.devices:
        runs = " or ".join(sorted(spec.devices))
        fit = ", ".join(f'"{r.value}"' for r in (Runtime.AUTO, *AUTO_ORDER[kind]))
        raise ConfigError("model.runtime", f"{runtime.value} runs on {runs} devices here, not {device}", f"use {fit}")
    if not installed(runtime):
        extra = f" (pip install 'inferd[{spec.extra}]')" if spec.extra else ""
        raise ConfigError(
            "model.runtime",
            f"is {runtime.value!r} but that package is not installed{extra}",
            'install it or use "torch"',
        )
    if precision is Precision.AUTO:
        precision = AUTO_PRECISION[kind]
    allowed = spec.precisions[kind]
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
