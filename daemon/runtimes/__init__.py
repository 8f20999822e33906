"""Which runtime runs the model, at which precision, and the exported artefact it loads.

- `specs`: the room: one `RuntimeSpec` per runtime in one table, and `choose`, which makes
  `model.runtime`/`model.precision` concrete from it;
- `cache`: the export cache (`ensure`), one sealed entry per key;
- `openvino`: its compile step and what its CPU plugin offers.

The measured choice, INT8 and the exporter's child process are `daemon.tuning` (they need the
daemon's Runner, which imports this package).
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
