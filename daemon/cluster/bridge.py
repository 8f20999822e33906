"""The daemon's side of the Ray driver process (`daemon.cluster.driver`): spawn, handshake, requests.

One bridge per daemon, shared by its RayDevices. Requests are sent from a thread (a batch of
pixels is megabytes), answers arrive through the event loop's reader on the pipe, so nothing
polls. When the driver exits (the cluster was lost, or Ray ended it), every request in flight
fails with ClusterLost and every device is told; the next `connect` starts a new driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import multiprocessing
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

from daemon.config import ClusterConfig, LogConfig
from daemon.devices import DeviceStartError
from daemon.errors import ClusterLost as ClusterLost  # re-exported: its old home
from daemon.errors import RemoteError as RemoteError
from daemon.messages import ActorLost, Connected, Reply, Request, Stop, Unreachable, refuse

log = structlog.get_logger("daemon.cluster")


class ClusterState(enum.Enum):
    DISCONNECTED = "disconnected"  # not connected yet, or shut down
    CONNECTING = "connecting"
    CONNECTED = "connected"
    LOST = "lost"  # was connected; the driver is gone: reconnecting


class Bridge:
    def __init__(
        self,
        cluster: ClusterConfig,
        log_config: LogConfig,
        *,
        on_state: Callable[[bool, str | None], None] | None = None,
    ) -> None:
        """`on_state(up, error)`: called when a connected cluster is lost, and when it is back."""
        self.cluster = cluster
        self.on_state = on_state
        self.log_config = log_config
        self.state = ClusterState.DISCONNECTED
        self.error: str | None = None  # why the cluster cannot be reached now
        self.resources: dict[str, float] = {}
        self.on_lost: list[Callable[[str | None], None]] = []  # devices: called with None (the
        # driver is gone) or an actor's name (it died while idle)
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._connected: asyncio.Future[dict[str, float]] | None = None
        self._connecting: asyncio.Task[dict[str, float]] | None = None

    @property
    def address(self) -> str:
        return self.cluster.address or "a local Ray instance"

    async def connect(self) -> dict[str, float]:
        """Start the driver if none runs and return the cluster's resources; DeviceStartError
        (not permanent: the cluster may come back) naming the address if it cannot be reached."""
        if self.state is ClusterState.CONNECTED:
            return self.resources
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect(self.cluster.connect_timeout_s))
        return await asyncio.shield(self._connecting)

    async def _connect(self, timeout_s: float) -> dict[str, float]:
        await self._reap()
        from daemon.cluster import driver

        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=driver.main, args=(self.cluster, self.log_config, child), name="inferd-ray-driver"
        )
        self._connected = loop.create_future()
        was = self.state
        self.state = ClusterState.CONNECTING if was is not ClusterState.LOST else was
        self._proc.start()
        child.close()
        loop.add_reader(self._conn.fileno(), self._on_message)
        os.set_blocking(self._conn.fileno(), True)  # as in local.LocalDevice: a reply may come in parts
        try:
            self.resources = await asyncio.wait_for(asyncio.shield(self._connected), timeout_s)
        except (TimeoutError, ClusterLost, RemoteError) as exc:
            why = f"no answer within {timeout_s:.0f} s" if isinstance(exc, TimeoutError) else str(exc)
            self.error = f"cannot reach the Ray cluster at {self.address}: {why}"
            await self.close(0)  # a driver still in ray.init reads no pipe
            self.state = ClusterState.LOST if was is ClusterState.LOST else ClusterState.DISCONNECTED
            raise DeviceStartError(self.error, permanent=False) from None
        except BaseException:
            await self.close(0)
            raise
        self.state = ClusterState.CONNECTED
        if was is ClusterState.LOST:
            log.info("cluster_reconnected", address=self.address, **self.resources)
            if self.on_state is not None:
                self.on_state(True, None)
        else:
            log.info("cluster_connected", address=self.address, **self.resources)
        self.error = None
        return self.resources

    async def request(self, body: Any) -> Any:
        """Ask the driver (`body`: a `messages.Request`'s); the body of its Reply, or ClusterLost."""
        if self.state is not ClusterState.CONNECTED or self._conn is None:
            raise ClusterLost(self.error or "not connected")
        req = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        try:
            await asyncio.to_thread(self._send, Request(req, body))
        except OSError:
            self._pending.pop(req, None)
            raise ClusterLost("the Ray driver is gone") from None
        return await future

    def tell(self, body: Any) -> None:
        """A message that has no answer (small: sent from the loop)."""
        if self.state is ClusterState.CONNECTED and self._conn is not None:
            with contextlib.suppress(OSError):
                self._send(Request(None, body))

    def _send(self, message: Request | Stop) -> None:
        assert self._conn is not None
        with self._send_lock:
            self._conn.send(message)

    def _on_message(self) -> None:
        assert self._conn is not None
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._on_exit()
            return
        match message:
            case Connected(resources):
                if self._connected is not None and not self._connected.done():
                    self._connected.set_result(resources)
            case Unreachable(why):
                if self._connected is not None and not self._connected.done():
                    self._connected.set_exception(RemoteError("unreachable", why))
            case ActorLost(key):
                for listener in list(self.on_lost):
                    listener(key)
            case Reply(req, body):
                future = self._pending.pop(req, None)
                if future is not None and not future.done():  # else its caller gave up (a stop that timed out)
                    future.set_result(body)
            case _:
                refuse(message, "the Ray bridge")

    def _on_exit(self) -> None:
        """The pipe closed: the driver is gone. Fail what was asked, tell the devices."""
        assert self._conn is not None
        asyncio.get_running_loop().remove_reader(self._conn.fileno())
        code = self._proc.exitcode if self._proc is not None else None
        was_connected = self.state is ClusterState.CONNECTED
        self.error = f"the Ray driver for {self.address} exited (the cluster was lost?)"
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(ClusterLost(self.error))
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ClusterLost(self.error))
        if was_connected:
            self.state = ClusterState.LOST
            log.error("cluster_lost", address=self.address, exitcode=code, in_flight=len(pending))
            if self.on_state is not None:
                self.on_state(False, self.error)
            for listener in list(self.on_lost):
                listener(None)
        self._conn.close()
        self._conn = None

    async def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join)

    async def close(self, timeout_s: float = 15) -> None:
        """Stop the driver (it kills its actors, and a local Ray instance it started: a few
        seconds); kill it after `timeout_s`."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._send(Stop())
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(ClusterLost("the Ray driver was stopped"))
            self._conn.close()
            self._conn = None
        proc, self._proc = self._proc, None
        if proc is not None:
            await asyncio.to_thread(proc.join, timeout_s)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join)
        self.state = ClusterState.DISCONNECTED
