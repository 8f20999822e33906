"""Prometheus metrics on a private registry, served over HTTP by the daemon's own event loop.

GET /metrics is the text exposition; GET /healthz answers 200 while the daemon serves and 503
while it starts or drains. The endpoint has no authentication, so it listens on loopback unless
the config says `metrics.allow_remote = true`. No thread and no web framework: a scrape is a few
kilobytes rendered in well under a millisecond, so `asyncio.start_server` on the main loop is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from daemon.errors import ListenError as ListenError  # re-exported: its old home

NAMESPACE = "inferd"
STAGES = ("queue", "decode", "batch_wait", "infer", "write", "total")
# 1 ms .. 30 s: decode and infer sit in milliseconds, queue and total reach seconds under a backlog.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
REQUEST_TIMEOUT_S = 5.0  # a client that sends no complete request within this is dropped
MAX_HEADER_LINES = 100


class Metrics:
    """The daemon's metrics; label values named up front are exported at 0 before the first event."""

    def __init__(
        self, *, devices: Iterable[str] = (), failure_reasons: Iterable[str] = (), queues: Iterable[str] = ()
    ) -> None:
        self.registry = CollectorRegistry()
        self.healthy = False  # the service sets it after READY and clears it when the drain starts
        self.failing_sinks: set[str] = set()  # /healthz answers 503 while a sink cannot store results
        self.unavailable: str | None = None  # /healthz answers 503 with this (the Ray cluster is lost)
        self.on_scrape: Callable[[], None] | None = None  # e.g. sample queue depths just before rendering
        self._pipeline_metrics()
        self._device_metrics()
        self._output_metrics()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._zeros(devices, failure_reasons, queues)

    def _pipeline_metrics(self) -> None:
        """Images done and failed, time per stage, batch sizes, queues."""
        ns, reg = NAMESPACE, self.registry
        self.images_done_total = Counter(
            "images_done", "Images whose results are on disk.", ["device"], namespace=ns, registry=reg
        )
        self.images_failed_total = Counter(
            "images_failed", "Inputs filed in failed/, by reason.", ["reason"], namespace=ns, registry=reg
        )
        self.stage_seconds = Histogram(
            "stage_seconds",
            "Time an image spent in each stage; total is from claim to results on disk.",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            namespace=ns,
            registry=reg,
        )
        self.batch_size = Histogram(
            "batch_size",
            "Size of the batch each finished image was inferred in (one observation per image).",
            buckets=BATCH_BUCKETS,
            namespace=ns,
            registry=reg,
        )
        self.queue_depth = Gauge("queue_depth", "Items waiting in each queue.", ["queue"], namespace=ns, registry=reg)
        self.in_flight = Gauge("in_flight", "Inputs claimed and not yet finished.", namespace=ns, registry=reg)

    def _device_metrics(self) -> None:
        """Each device process: up or not, and its restarts."""
        ns, reg = NAMESPACE, self.registry
        self.devices_up = Gauge(
            "workers_up",
            "1 while the device process runs with its model loaded.",
            ["device"],
            namespace=ns,
            registry=reg,
        )
        self.device_restarts_total = Counter(
            "worker_restarts", "Device processes restarted after they died.", ["device"], namespace=ns, registry=reg
        )

    def _output_metrics(self) -> None:
        """What was found, and the sinks' state."""
        ns, reg = NAMESPACE, self.registry
        self.found_total = Counter(
            "found",
            "What the model found in finished images, by task and kind (detections, masks, keypoints; "
            "classify: images by top-1 class).",
            ["task", "kind"],
            namespace=ns,
            registry=reg,
        )
        self.sink_up = Gauge(
            "sink_up", "1 while the sink stores results, 0 while it retries.", ["sink"], namespace=ns, registry=reg
        )
        self.sink_failures_total = Counter(
            "sink_failures", "Failed attempts to store results (retried).", ["sink"], namespace=ns, registry=reg
        )

    def _zeros(self, devices: Iterable[str], failure_reasons: Iterable[str], queues: Iterable[str]) -> None:
        """Export the label values named up front, at 0 before the first event."""
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for device in devices:
            self.images_done_total.labels(device=device)
            self.devices_up.labels(device=device).set(0)
            self.device_restarts_total.labels(device=device)
        for reason in failure_reasons:
            self.images_failed_total.labels(reason=reason)
        for queue in queues:
            self.queue_depth.labels(queue=queue).set(0)

    def image_done(self, device: str, timings_ms: Mapping[str, float], batch: int) -> None:
        """One image finished; `timings_ms` holds any of STAGES (other keys are ignored)."""
        self.images_done_total.labels(device=device).inc()
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage=stage).observe(ms / 1000)
        self.batch_size.observe(batch)

    def found(self, task: str, counts: Mapping[str, object]) -> None:
        """One image's counts, as its image_done log line has them (`tasks.Payload.counts`)."""
        for kind, n in counts.items():
            if kind == "top1" and n is not None:
                self.found_total.labels(task=task, kind=f"top1:{n}").inc()
            elif isinstance(n, int) and not isinstance(n, bool) and kind != "top1_id":
                self.found_total.labels(task=task, kind=kind).inc(n)

    def image_failed(self, reason: str) -> None:
        self.images_failed_total.labels(reason=reason).inc()

    def set_queue_depth(self, name: str, n: int) -> None:
        self.queue_depth.labels(queue=name).set(n)

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n)

    def device_up(self, device: str, up: bool) -> None:
        self.devices_up.labels(device=device).set(1 if up else 0)

    def device_restarted(self, device: str) -> None:
        self.device_restarts_total.labels(device=device).inc()

    def sink_state(self, sink: str, up: bool) -> None:
        self.sink_up.labels(sink=sink).set(1 if up else 0)
        if up:
            self.failing_sinks.discard(sink)
        else:
            self.failing_sinks.add(sink)
            self.sink_failures_total.labels(sink=sink)

    def sink_failed(self, sink: str) -> None:
        self.sink_failures_total.labels(sink=sink).inc()

    def render(self) -> bytes:
        if self.on_scrape is not None:
            self.on_scrape()
        return generate_latest(self.registry)


async def serve(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """Serve /metrics and /healthz on host:port (port 0: any free port; see server.sockets).

    Stop it with `server.close()` then `await server.wait_closed()`.
    """
    return await asyncio.start_server(functools.partial(_handle, metrics), host, port)


async def _handle(metrics: Metrics, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request per connection (HTTP/1.1 with Connection: close), which is all a scraper needs."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            request = await reader.readline()
            for _ in range(MAX_HEADER_LINES):  # headers are read and ignored
                if await reader.readline() in (b"\r\n", b"\n", b""):
                    break
        if not request.strip():
            return  # connected and closed without asking anything (a port probe)
        status, content_type, body, extra = _respond(metrics, request.decode("latin-1").split())
        head = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Type: {content_type}"]
        head += [f"Content-Length: {len(body)}", "Connection: close", *extra, "", ""]
        writer.write("\r\n".join(head).encode("latin-1"))
        if not request.startswith(b"HEAD "):
            writer.write(body)
        await writer.drain()
    except (TimeoutError, ConnectionError, ValueError):
        pass  # a client that stalled, vanished or sent an over-long line: nothing to answer it
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _respond(metrics: Metrics, request: list[str]) -> tuple[HTTPStatus, str, bytes, list[str]]:
    text = "text/plain; charset=utf-8"
    if len(request) != 3 or not request[2].startswith("HTTP/"):
        return HTTPStatus.BAD_REQUEST, text, b"bad request\n", []
    method, path = request[0], request[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return HTTPStatus.METHOD_NOT_ALLOWED, text, b"method not allowed\n", ["Allow: GET, HEAD"]
    if path == "/metrics":
        return HTTPStatus.OK, CONTENT_TYPE_LATEST, metrics.render(), []
    if path == "/healthz":
        if metrics.healthy and metrics.unavailable:
            return HTTPStatus.SERVICE_UNAVAILABLE, text, f"{metrics.unavailable}\n".encode(), []
        if metrics.healthy and metrics.failing_sinks:
            failing = ", ".join(sorted(metrics.failing_sinks))
            return HTTPStatus.SERVICE_UNAVAILABLE, text, f"results cannot be stored: {failing}\n".encode(), []
        if metrics.healthy:
            return HTTPStatus.OK, text, b"ok\n", []
        return HTTPStatus.SERVICE_UNAVAILABLE, text, b"starting or draining\n", []
    return HTTPStatus.NOT_FOUND, text, b"not found; try /metrics or /healthz\n", []


LISTEN_FORMS = '"127.0.0.1:9108", "[::1]:9108" or "localhost:9108"'


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9108' -> ('127.0.0.1', 9108); '[::1]:9108' -> ('::1', 9108); a host name stays a name."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ListenError(f"{text!r} is not host:port", f"write it as {LISTEN_FORMS}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenError(f"{text!r} has no IPv6 address between the brackets", 'write e.g. "[::1]:9108"') from None
    elif ":" in host or "[" in host or "]" in host:
        raise ListenError(f"{text!r} is ambiguous", 'put an IPv6 address in brackets, e.g. "[::1]:9108"')
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ListenError(f"{text!r} has port {port_text!r}", "use a port number from 1 to 65535, e.g. 9108")
    return host, int(port_text)


def check_listen(text: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """parse_listen, and refuse a host other machines could reach unless `allow_remote`."""
    host, port = parse_listen(text)
    if not allow_remote and not is_loopback(host):
        raise ListenError(
            f"{text!r} would expose the unauthenticated metrics endpoint beyond this machine"
            f" ({host} is not a loopback address)",
            f"listen on 127.0.0.1:{port}, [::1]:{port} or localhost:{port}, or set metrics.allow_remote = true"
            " and restrict access with a firewall",
        )
    return host, port


def is_loopback(host: str) -> bool:
    """True for loopback addresses and 'localhost'; any other name could resolve anywhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
