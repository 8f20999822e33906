"""OpenVINO's own steps: compile with our precision and threads; what its CPU plugin offers.
(INT8 by NNCF is daemon.tuning.int8: it checks its result with the daemon's Runner.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.config import Precision


def compile_model(backend: Any, artefact: str, precision: Precision, threads: int) -> None:
    """Recompile an AutoBackend's OpenVINO model with our precision and thread count: its own
    compile leaves the CPU's default (bf16 on AMX chips) and takes every core. An INT8 model's
    quantized layers run in int8 whatever the hint; the rest in fp32."""
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


def capabilities() -> frozenset[str]:
    """What OpenVINO's CPU plugin says this CPU computes in (FP32, BF16, INT8, ...): asked, not assumed."""
    import openvino as ov

    return frozenset(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
