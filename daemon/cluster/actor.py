"""Runs inside a Ray actor, on any node of the cluster: the same `model.Runner` as a local device
process, handed each batch's bytes instead of reading a shared-memory slot.

The weights arrive as bytes (the node needs no shared storage): they are written to a temporary
file of the actor's own and loaded from there; so do INT8's calibration images. The node exports
and, for `runtime = "auto"`, measures for its own hardware (daemon.tuning.node). A load failure
is an answer (`load` returns it), not an exception, so the driver can tell a model that can
never load from an actor that died. Only the actor's death (its process or node gone) raises on
the caller's side.
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import msgspec

from daemon import logs, model
from daemon.errors import ExportError
from daemon.messages import Batch, BatchDone, BatchRaised, DeviceSpec, LoadFailed, Ready
from daemon.tuning import node


class DeviceActor:
    """The model on one device of a Ray node (ray.remote is applied by the driver)."""

    def __init__(self) -> None:
        self.runner: model.Runner | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="inferd-actor-")

    def load(self, spec: DeviceSpec, weights: bytes, weights_name: str) -> Ready | LoadFailed:
        """Load the model: its READY or ERROR answer, as a local device process sends them."""
        # Idle intra-op threads sleep instead of spinning (as in model.serve).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; the runner's threads are what counts.
        if spec.torch_threads:
            os.environ["OMP_NUM_THREADS"] = str(spec.torch_threads)
        logs.configure(spec.log, process=f"actor:{spec.name}")
        path = Path(self._dir.name) / weights_name
        path.write_bytes(weights)
        # Exports (OpenVINO, ONNX Runtime, INT8) and, for "auto", the measured choice are made on
        # this node, for its hardware, into a cache the node's actors share (the weights' content
        # keys it, whatever temp file holds them).
        cache = Path(tempfile.gettempdir()) / "inferd-models"
        try:
            args, tuned = node.prepare(
                msgspec.structs.asdict(spec) | {"weights": str(path)}, cache, Path(self._dir.name)
            )
        except ExportError as exc:  # the accuracy gate, an export that fails: it never loads
            return LoadFailed(str(exc), True)
        spec = msgspec.structs.replace(
            spec, weights=str(path), cache_dir=str(cache), runtime=args["runtime"], precision=args["precision"],
            calibration=args["calibration"], calibration_files=(),
        )  # fmt: skip
        try:
            self.runner = model.Runner(spec, None)
        except Exception as exc:  # noqa: BLE001 - any load failure is the ERROR half of the handshake
            return LoadFailed(f"{type(exc).__name__}: {exc}", not model.transient(exc))
        # `tuned`: the node's measured choice; RayDevice caps its batches at its batch size.
        info = msgspec.structs.replace(self.runner.info(), node=socket.gethostname(), node_ip=_node_ip(), tuned=tuned)
        return Ready(info)

    def infer(self, batch: Batch, data: Any) -> BatchDone | BatchRaised:
        """The batch's answer: a model error fails the batch, not the actor."""
        runner = self.runner
        assert runner is not None
        with warnings.catch_warnings():
            # Ray hands arguments over read-only (zero-copy from its object store); the model
            # only reads its input.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            answer = model.attempt(runner, batch, functools.partial(runner.run, batch, data))
        assert not isinstance(answer, model.Launched)
        return answer

    def set_level(self, level: str) -> None:
        logs.set_level(level)

    def ping(self) -> int:
        return os.getpid()


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
