"""Which runtime runs the model, at which precision, and the exported artefact it loads.

- `specs`: the room: one `RuntimeSpec` per runtime in one table, and `choose`, which makes
  `model.runtime`/`model.precision` concrete from it;
- `tune`: the measured choice for "auto" on CPUs (timed on this machine, gated on accuracy);
- `cache`: the export cache (`ensure`), one sealed entry per key;
- `openvino`: its compile step and INT8 by NNCF, calibrated on the user's images;
- `gate`: the accuracy gate against fp32.

`python -m daemon.runtimes '<json>'` runs `ensure` (or, with `tune` first, the measured choice)
in a child process for the daemon (the main process never imports torch) and reports on stdout
as JSON lines.
"""

from daemon.runtimes.cache import (
    FIX,
    MANIFEST,
    ExportError,
    Plan,
    cache_key,
    device_kind,
    ensure,
    entry_name,
    file_digest,
    lookup,
    valid,
)
from daemon.runtimes.gate import GateFailed
from daemon.runtimes.specs import (
    SPECS,
    RuntimeSpec,
    choose,
    cpu_flags,
    exported_as,
    has_amx,
    has_bf16,
    importable,
)

__all__ = [
    "FIX",
    "MANIFEST",
    "SPECS",
    "ExportError",
    "GateFailed",
    "Plan",
    "RuntimeSpec",
    "cache_key",
    "choose",
    "cpu_flags",
    "device_kind",
    "ensure",
    "entry_name",
    "exported_as",
    "file_digest",
    "has_amx",
    "has_bf16",
    "importable",
    "lookup",
    "valid",
]
