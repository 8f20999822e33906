"""The Ray driver: a spawned child of the daemon that connects to the cluster and runs the actors.

Why a process of its own: a Ray driver whose cluster goes away (the head stopped, its raylet
killed) is ended by Ray itself. In a child, that is just this process exiting: the daemon sees
its pipe close, keeps every claimed input, and starts a new driver once the cluster is back. It
also keeps `ray` out of the daemon's own process.

The messages are `daemon.messages`': from the daemon (`daemon.cluster.bridge` sends them) a
`Request(req, body)`, each answered by a `Reply(req, ...)`:
    StartActor(key, spec, weights_path, options) -> Ready(info) | LoadFailed(message, permanent)
    Infer(key, batch, data)                      -> BatchDone | BatchRaised | ActorLost: the actor is gone
    StopActor(key)                               -> None
    AskResources()                               -> {"GPU": n, "CPU": n, "nodes": n, "cpu_nodes": n}
    SetLevel(level)                              (req None: no answer)
and Stop() to shut down. Unasked: Connected(resources) or Unreachable(message) once at start,
ActorLost(key, message) when a ping finds an idle actor gone.
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
from daemon.messages import (
    ActorLost,
    AskResources,
    Connected,
    Infer,
    LoadFailed,
    Ready,
    Reply,
    Request,
    SetLevel,
    StartActor,
    Stop,
    StopActor,
    Unreachable,
    refuse,
)

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
        conn.send(Unreachable(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Connected(resources))
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

    def _send(self, message: Reply | ActorLost) -> None:
        with contextlib.suppress(OSError):  # the daemon is gone: the reader ends us
            self.conn.send(message)

    def _dispatch(self, message: object) -> None:
        """On the loop: start the request's task (None: the daemon is gone)."""
        match message:
            case None | Stop():
                self.closed.set()
                return
            case Request(_, SetLevel(level)):
                for actor in self.actors.values():
                    actor.set_level.remote(level)
                return
            case Request(int(req), StartActor() as body):
                task = asyncio.ensure_future(self._start(req, body))
                self.starting[body.key] = task
            case Request(int(req), Infer() as body):
                task = asyncio.ensure_future(self._infer(req, body))
            case Request(int(req), StopActor(key)):
                task = asyncio.ensure_future(self._stop(req, key))
            case Request(int(req), AskResources()):
                task = asyncio.ensure_future(self._answer_resources(req))
            case _:
                refuse(message, "the Ray driver")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _get(self, ref: Any) -> Any:
        return await asyncio.wrap_future(ref.future())

    async def _start(self, req: int, body: StartActor) -> None:
        name, weights = body.key, body.weights_path
        try:
            if weights not in self.weights:
                data = await asyncio.to_thread(Path(weights).read_bytes)
                self.weights[weights] = self.ray.put(data)
            actor = self.remote_class.options(**body.options).remote()
            self.actors[name] = actor
            answer = await self._get(actor.load.remote(body.spec, self.weights[weights], Path(weights).name))
        except asyncio.CancelledError:
            self._kill(name)
            raise
        except Exception as exc:  # noqa: BLE001 - the actor died while loading, or the file is unreadable
            self._kill(name)
            self._send(Reply(req, LoadFailed(f"{type(exc).__name__}: {exc}", False)))
            return
        finally:
            self.starting.pop(name, None)
        if not isinstance(answer, Ready):
            self._kill(name)
        else:
            log.info("actor_ready", device=name, node=answer.info.node, pid=answer.info.pid)
        self._send(Reply(req, answer))

    async def _infer(self, req: int, body: Infer) -> None:
        name = body.key
        actor = self.actors.get(name)
        if actor is None:
            self._send(Reply(req, ActorLost(name, f"{name} has no actor")))
            return
        try:
            answer = await self._get(actor.infer.remote(body.batch, body.data))
        except self.ray.exceptions.RayActorError as exc:
            self.actors.pop(name, None)
            self._send(Reply(req, ActorLost(name, _first_line(exc))))
            return
        self._send(Reply(req, answer))  # BatchDone or BatchRaised

    async def _stop(self, req: int, name: str) -> None:
        task = self.starting.pop(name, None)
        if task is not None:
            task.cancel()
        self._kill(name)
        self._send(Reply(req, None))

    async def _answer_resources(self, req: int) -> None:
        self._send(Reply(req, await asyncio.to_thread(_resources, self.ray, self.cluster)))

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
                        self._send(ActorLost(name, _first_line(exc)))

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
