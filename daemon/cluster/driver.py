"""The Ray driver: a spawned child of the daemon that connects to the cluster and runs the actors.

Why a process of its own: a Ray driver whose cluster goes away (the head stopped, its raylet
killed) is ended by Ray itself. In a child, that is just this process exiting: the daemon sees
its pipe close, keeps every claimed input, and starts a new driver once the cluster is back. It
also keeps `ray` out of the daemon's own process.

Messages from the daemon (`daemon.cluster.bridge` sends them), each answered by its `req`:
    ("start", req, key, spec_args, weights_path, options)
                                         -> ("ok", req, info) | ("error", req, "start", (message, permanent))
    ("infer", req, key, batch, data)     -> ("ok", req, (answers, model_ms)) | ("error", req, "failed", (kind, message))
                                         |  ("error", req, "lost", message): the actor is gone
    ("stop", req, key)                   -> ("ok", req, None)
    ("resources", req)                   -> ("ok", req, {"GPU": n, "CPU": n, "nodes": n})
    ("level", None, level)               (no answer)
    None                                 shut down
and unasked: ("connected", resources) or ("unreachable", message) once at start, ("lost", key,
message) when a ping finds an idle actor gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from daemon import logs
from daemon.config import ClusterConfig, LogConfig

log = structlog.get_logger("daemon.cluster")
HEALTH_INTERVAL_S = 2.0  # how often the driver asks the cluster's GCS whether a node is alive
HEALTH_TIMEOUT_S = 5.0  # an answer later than this, or no live node, is a lost cluster
EXIT_LOST = 3  # the driver's exit status when it found the cluster gone


def main(cluster: ClusterConfig, log_config: LogConfig, conn: Connection) -> None:
    """Entry point of the driver process (spawn context)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the daemon decides when this stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(log_config, process="ray-driver")
    import ray

    kwargs: dict[str, Any] = {"log_to_driver": False, "namespace": "inferd", "logging_level": "warning"}
    if not cluster.address:  # start a local instance: no dashboard, no usage stats
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=cluster.address or None, **kwargs)
        resources = _resources(ray, cluster)
    except Exception as exc:  # noqa: BLE001 - whatever ray.init raises, the daemon reports it
        conn.send(("unreachable", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("connected", resources))
    try:
        asyncio.run(Driver(ray, cluster, conn).serve())
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()


def _resources(ray: Any, cluster: ClusterConfig) -> dict[str, float]:
    """The cluster's GPUs and CPUs, its live nodes, and how many of them could host a CPU actor."""
    total = ray.cluster_resources()
    alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": max(cluster.cpus_per_actor, 1e-9), **dict(cluster.resources)}
    cpu_nodes = sum(1 for r in alive if all(r.get(k, 0) >= v for k, v in need.items()))
    return {
        "GPU": float(total.get("GPU", 0)),
        "CPU": float(total.get("CPU", 0)),
        "nodes": float(len(alive)),
        "cpu_nodes": float(cpu_nodes),
    }


class Driver:
    def __init__(self, ray: Any, cluster: ClusterConfig, conn: Connection) -> None:
        from daemon.cluster.actor import DeviceActor

        self.ray = ray
        self.cluster = cluster
        self.conn = conn
        self.remote_class = ray.remote(DeviceActor)
        self.actors: dict[str, Any] = {}
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.weights: dict[str, Any] = {}  # path -> ObjectRef of its bytes, put once
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self.alive = True  # the last health probe found a live node

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = threading.Thread(target=self._read, args=(loop,), daemon=True, name="driver-pipe")
        reader.start()
        watchers = [loop.create_task(self._ping()), loop.create_task(self._watch_cluster())]
        await self.closed.wait()
        for watcher in watchers:
            watcher.cancel()
        for name in list(self.actors):
            self._kill(name)

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pipe, read in a thread: a batch of pixels is megabytes, and recv blocks."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the daemon is gone
                message = None
            loop.call_soon_threadsafe(self._dispatch, message)
            if message is None:
                return

    def _send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the daemon is gone: the reader ends us
            self.conn.send(message)

    def _dispatch(self, message: tuple[Any, ...] | None) -> None:
        if message is None:
            self.closed.set()
            return
        kind, req, *args = message
        if kind == "level":
            for actor in self.actors.values():
                actor.set_level.remote(args[0])
            return
        if kind == "start":
            task = asyncio.ensure_future(self._start(req, *args))
            self.starting[args[0]] = task
        elif kind == "infer":
            task = asyncio.ensure_future(self._infer(req, *args))
        elif kind == "stop":
            task = asyncio.ensure_future(self._stop(req, *args))
        elif kind == "resources":
            task = asyncio.ensure_future(self._answer_resources(req))
        else:
            raise ValueError(f"unknown message {kind!r}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _get(self, ref: Any) -> Any:
        return await asyncio.wrap_future(ref.future())

    async def _start(
        self, req: int, name: str, spec_args: dict[str, Any], weights: str, options: dict[str, Any]
    ) -> None:
        try:
            if weights not in self.weights:
                data = await asyncio.to_thread(Path(weights).read_bytes)
                self.weights[weights] = self.ray.put(data)
            actor = self.remote_class.options(**options).remote()
            self.actors[name] = actor
            kind, value = await self._get(actor.load.remote(spec_args, self.weights[weights], Path(weights).name))
        except asyncio.CancelledError:
            self._kill(name)
            raise
        except Exception as exc:  # noqa: BLE001 - the actor died while loading, or the file is unreadable
            self._kill(name)
            self._send(("error", req, "start", (f"{type(exc).__name__}: {exc}", False)))
            return
        finally:
            self.starting.pop(name, None)
        if kind == "error":
            self._kill(name)
            self._send(("error", req, "start", value))
            return
        log.info("actor_ready", device=name, node=value.get("node"), pid=value.get("pid"))
        self._send(("ok", req, value))

    async def _infer(self, req: int, name: str, batch: Any, data: Any) -> None:
        actor = self.actors.get(name)
        if actor is None:
            self._send(("error", req, "lost", f"{name} has no actor"))
            return
        try:
            kind, value = await self._get(actor.infer.remote(batch, data))
        except self.ray.exceptions.RayActorError as exc:
            self.actors.pop(name, None)
            self._send(("error", req, "lost", _first_line(exc)))
            return
        if kind == "done":
            self._send(("ok", req, value))
        else:
            self._send(("error", req, "failed", value))

    async def _stop(self, req: int, name: str) -> None:
        task = self.starting.pop(name, None)
        if task is not None:
            task.cancel()
        self._kill(name)
        self._send(("ok", req, None))

    async def _answer_resources(self, req: int) -> None:
        self._send(("ok", req, await asyncio.to_thread(_resources, self.ray, self.cluster)))

    def _kill(self, name: str) -> None:
        actor = self.actors.pop(name, None)
        if actor is not None:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor, no_restart=True)

    async def _ping(self) -> None:
        """An actor that dies while idle (its node lost) is found here, not only by the next batch."""
        while True:
            await asyncio.sleep(self.cluster.rescan_interval_s)  # a period, not a wait for something
            for name, actor in list(self.actors.items()):
                if name in self.starting:
                    continue
                try:
                    await self._get(actor.ping.remote())
                except self.ray.exceptions.RayActorError as exc:
                    if self.actors.get(name) is actor:
                        self.actors.pop(name)
                        self._send(("lost", name, _first_line(exc)))


    async def _watch_cluster(self) -> None:
        """Exit when the cluster is gone: a Ray driver whose head stopped does not end by itself,
        and its calls would wait for ever. The daemon sees the exit and reconnects."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)  # a period, not a wait for something
            # A thread, not the loop: once the GCS is gone the call hangs (measured: for minutes).
            probe = threading.Thread(target=self._probe, daemon=True, name="driver-probe")
            self.alive = False
            probe.start()
            await asyncio.to_thread(probe.join, HEALTH_TIMEOUT_S)
            if not self.alive:
                log.error("cluster_unreachable", address=self.cluster.address or "local", after_s=HEALTH_TIMEOUT_S)
                os._exit(EXIT_LOST)  # ray.shutdown would wait for the dead GCS too

    def _probe(self) -> None:
        with contextlib.suppress(Exception):
            self.alive = any(n.get("Alive") for n in self.ray.nodes())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
