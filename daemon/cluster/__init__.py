"""Device actors on a Ray cluster (`[cluster] backend = "ray"`): which devices, and their fleet.

The daemon keeps intake, claiming, durability, batching and results as with local devices; only
the devices are actors, one per GPU of the cluster (`num_gpus`), or `cpu_actors` on CPUs where
the cluster has none. `ray` is imported only by the driver process (`cluster.driver`) and the
actors: the daemon's own process never imports it, whichever backend.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import structlog

from daemon.cluster.bridge import Bridge, ClusterLost, ClusterState
from daemon.cluster.device import RayDevice
from daemon.config import Config, ConfigError, Decode, Precision, Runtime
from daemon.devices import (
    JPEG_SLOT_BYTES,
    Device,
    DeviceKind,
    DeviceName,
    DeviceStartError,
    calibration_images,
    device_spec,
)
from daemon.messages import AskResources
from daemon.tuning import tune
from daemon.weights import resolve_weights

__all__ = ["Cluster", "ClusterState", "RayDevice"]
log = structlog.get_logger("daemon.cluster")
# A node's first start with "auto" exports the candidates and measures them inside the actor's
# load (INT8: calibrates): the measurement's budget and the exports come on top of
# pipeline.worker_start_timeout_s.
MEASURE_GRACE_S = tune.BUDGET_S + 120.0


class Cluster:
    """The daemon's Ray cluster: its driver, the devices it has, and growing them."""

    def __init__(self, config: Config, on_state: Callable[[bool, str | None], None] | None = None) -> None:
        """ConfigError (exit 78) if ray is not installed: looked up, not imported."""
        if importlib.util.find_spec("ray") is None:
            raise ConfigError(
                "cluster.backend", 'is "ray", but the ray package is not installed', "pip install 'inferd[ray]'"
            )
        self.config = config
        self.bridge = Bridge(config.cluster, config.log, on_state=on_state)
        self.names: set[str] = set()  # every device name handed out

    @property
    def state(self) -> ClusterState:
        return self.bridge.state

    @property
    def problem(self) -> str | None:
        """Why the cluster cannot be used now; None while it is connected."""
        return None if self.bridge.state is ClusterState.CONNECTED else self.bridge.error

    def device_names(self, resources: dict[str, float]) -> list[str]:
        """One actor per GPU (times `actors_per_gpu`); if the cluster has no GPU, `cpu_actors` per
        node that has the CPUs (and custom resources) an actor asks for."""
        c = self.config.cluster
        gpus = int(resources.get("GPU", 0))
        if gpus:
            return [f"ray:gpu:{i}" for i in range(gpus * c.actors_per_gpu)]
        return [f"ray:cpu:{i}" for i in range(c.cpu_actors * int(resources.get("cpu_nodes", 0)))]

    async def resolve_devices(self) -> list[str]:
        """Connect and list the devices; DeviceStartError naming the address if it is unreachable."""
        resources = await self.bridge.connect()
        names = self.device_names(resources)
        if not names:
            raise DeviceStartError(
                f"the Ray cluster at {self.bridge.address} has no GPU and cluster.cpu_actors = 0: "
                "add a GPU node, or set cluster.cpu_actors",
                permanent=True,
            )
        return names

    def devices(self, config: Config, names: list[str], *, slot_imgsz: int = 0) -> list[Device]:
        """One (not yet started) RayDevice per name."""
        self.names.update(names)
        c, m, p = config.cluster, config.model, config.pipeline
        weights = resolve_weights(m.weights)  # read on this machine; the actors get its bytes
        room = max(slot_imgsz, m.imgsz)
        jpegs = p.decode is Decode.DEVICE
        slot_bytes = max(p.max_batch * room * room * 3, JPEG_SLOT_BYTES if jpegs else 0)
        # Each node measures "auto", and calibrates INT8, in its first load: that time comes on top.
        measures = (m.runtime, m.precision) == (Runtime.AUTO, Precision.AUTO) or m.precision is Precision.INT8
        calibration = tuple((Path(f).name, Path(f).read_bytes()) for f in calibration_images(config))
        made: list[Device] = []
        for name in names:
            gpu = DeviceName.parse(name).kind is DeviceKind.CUDA
            threads = p.torch_threads or (2 if gpu else max(1, math.ceil(c.cpus_per_actor)))
            # Its torch device is "cuda:0" or "cpu": Ray sets CUDA_VISIBLE_DEVICES to the GPU it gives.
            spec = msgspec.structs.replace(
                device_spec(config, name, torch_threads=threads),
                weights=weights,
                # Each node exports and, for "auto", measures for itself, into its own cache (actor.py).
                runtime=m.runtime.value,
                cache_dir="",  # the actor's own (actor.py)
                calibration=(),
                calibration_files=calibration,  # INT8 is calibrated on the node
            )
            options = {
                "num_cpus": c.cpus_per_actor,
                "num_gpus": 1 / c.actors_per_gpu if gpu else 0,
                "resources": dict(c.resources),
                "max_restarts": 0,  # the service's supervisor starts a new actor (it re-queues the batches)
                "max_task_retries": 0,
            }
            made.append(
                RayDevice(
                    self.bridge,
                    name,
                    spec,
                    options,
                    weights_path=weights,
                    max_batch=p.max_batch,
                    slot_bytes=slot_bytes,
                    slot_imgsz=room,
                    start_grace_s=MEASURE_GRACE_S if measures else 0.0,
                )
            )
        return made

    async def grow(self, running: Callable[[], Config], add: Callable[[Device], Awaitable[None]]) -> None:
        """Every `rescan_interval_s`, count the cluster's GPUs; a device for each one that has none
        yet (a node was added) is started, with the `running()` config (a reload may have changed
        the model), and handed to `add`. Runs until cancelled."""
        while True:
            config = running()
            await asyncio.sleep(config.cluster.rescan_interval_s)  # a period, not a wait for something
            if self.bridge.state is not ClusterState.CONNECTED:
                continue
            try:
                resources = await self.bridge.request(AskResources())
            except ClusterLost:
                continue
            new = [n for n in self.device_names(resources) if n not in self.names]
            if not new:
                continue
            log.info("cluster_grew", devices=new, **resources)
            for device in self.devices(config, new):
                try:
                    await device.start(config.pipeline.worker_start_timeout_s)
                except DeviceStartError as exc:
                    log.error("actor_start_failed", device=device.device, error=str(exc))
                    self.names.discard(device.device)  # tried again at the next rescan
                    continue
                await add(device)

    async def close(self) -> None:
        await self.bridge.close()
