"""The exporter's child process: `python -m daemon.tuning [tune] '<json>'`, JSON lines out.

Without `tune`: `ExportStarted` when it builds, then `PlanMade` (or `ExportFailed`). With `tune`:
`TuneStarted` when it measures, then `Tuned` with the choice and its table (or `ExportFailed`):
the records of `daemon.messages`, one JSON object a line, named by their `event` field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from daemon.config import ConfigError, Precision, Runtime
from daemon.errors import ModelError
from daemon.messages import ExportFailed, ExportStarted, PlanMade, Record, Tuned, encode_record
from daemon.runtimes.cache import ExportError, ensure
from daemon.runtimes.specs import choose
from daemon.tuning.int8 import quantize
from daemon.weights import resolve_weights


def say(record: Record) -> None:
    sys.stdout.write(encode_record(record).decode())
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    """The child-process entry: one JSON request in argv (see the module doc)."""
    mode = argv[0] if len(argv) > 1 else "export"
    request = json.loads(argv[-1])
    try:
        weights = resolve_weights(request["weights"])
        if mode == "tune":
            from daemon.tuning import tune

            choice = tune.tune({**request, "weights": weights}, say)
            say(Tuned(**choice.describe()))
            return 0
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
            calibration=tuple(Path(p) for p in request.get("calibration", ())),
            on_build=lambda: say(ExportStarted(runtime.value, precision.value)),
            quantize=quantize,
        )
    except (ConfigError, ModelError, ExportError) as exc:
        say(ExportFailed(type(exc).__name__, str(exc)))
        return 1
    say(PlanMade(**plan.describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
