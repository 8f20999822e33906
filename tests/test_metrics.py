"""Metrics: a real HTTP server on the loop, scraped over TCP and parsed as Prometheus would."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable

import pytest
import uvloop
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Metrics, check_listen, is_loopback, parse_listen, serve

TIMEOUT_S = 10


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw request, read until the server closes; return status, headers, body."""
    async with asyncio.timeout(TIMEOUT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    if not request.startswith(b"HEAD "):
        assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n".encode())


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def record(metrics: Metrics) -> None:
    metrics.image_done("cuda:0", {"queue": 2.0, "decode": 4.0, "infer": 12.0, "write": 1.5, "total": 20.0}, 4)
    metrics.image_done("cuda:0", {"queue": 3000.0, "total": 3500.0, "unknown": 1.0}, 8)
    metrics.image_done("cuda:1", {"infer": 0.5}, 1)
    metrics.image_failed("not_an_image")
    metrics.set_queue_depth("ready", 3)
    metrics.set_in_flight(7)
    metrics.device_up("cuda:0", True)
    metrics.device_up("cuda:1", False)
    metrics.device_restarted("cuda:1")


def scrape_recorded(loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> tuple[str, str]:
    """Record observations, serve them, scrape once: (Content-Type, exposition)."""

    async def scenario() -> tuple[str, str]:
        metrics = Metrics(devices=["cuda:0", "cuda:1"], failure_reasons=["not_an_image", "symlink_refused"])
        record(metrics)
        metrics.on_scrape = lambda: metrics.set_queue_depth("jobs", 5)
        server = await serve(metrics, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            status, headers, body = await get(port, "/metrics")
            head_status, head_headers, head_body = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert int(head_headers["content-length"]) > 0
        finally:
            server.close()
            await server.wait_closed()
        assert status == 200 and head_status == 200 and head_body == b""
        return headers["content-type"], body.decode()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(scenario())


@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_scrape_reports_what_was_recorded(loop_factory: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
    content_type, text = scrape_recorded(loop_factory)
    assert content_type == CONTENT_TYPE_LATEST
    s = samples(text)
    assert s[("inferd_images_done_total", (("device", "cuda:0"),))] == 2
    assert s[("inferd_images_done_total", (("device", "cuda:1"),))] == 1
    assert s[("inferd_images_failed_total", (("reason", "not_an_image"),))] == 1
    assert s[("inferd_images_failed_total", (("reason", "symlink_refused"),))] == 0  # named up front
    assert s[("inferd_stage_seconds_count", (("stage", "queue"),))] == 2
    assert s[("inferd_stage_seconds_sum", (("stage", "queue"),))] == pytest.approx(3.002)
    assert s[("inferd_stage_seconds_bucket", (("le", "0.0025"), ("stage", "queue")))] == 1
    assert s[("inferd_stage_seconds_bucket", (("le", "2.5"), ("stage", "queue")))] == 1
    assert s[("inferd_stage_seconds_bucket", (("le", "5.0"), ("stage", "queue")))] == 2
    assert s[("inferd_stage_seconds_count", (("stage", "batch_wait"),))] == 0  # every stage exported
    assert s[("inferd_stage_seconds_bucket", (("le", "0.001"), ("stage", "infer")))] == 1
    assert not any(labels == (("stage", "unknown"),) for _, labels in s)
    assert s[("inferd_batch_size_count", ())] == 3
    assert s[("inferd_batch_size_sum", ())] == 13
    assert s[("inferd_batch_size_bucket", (("le", "4.0"),))] == 2
    assert s[("inferd_queue_depth", (("queue", "ready"),))] == 3
    assert s[("inferd_queue_depth", (("queue", "jobs"),))] == 5  # set by on_scrape
    assert s[("inferd_in_flight", ())] == 7
    assert s[("inferd_workers_up", (("device", "cuda:0"),))] == 1
    assert s[("inferd_workers_up", (("device", "cuda:1"),))] == 0
    assert s[("inferd_worker_restarts_total", (("device", "cuda:1"),))] == 1
    assert s[("inferd_worker_restarts_total", (("device", "cuda:0"),))] == 0
    assert not any(name.startswith("python_gc") for name, _ in s)  # a private registry, not the global one


def test_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    _, text = scrape_recorded()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_healthz_follows_healthy_and_other_paths_are_refused() -> None:
    async def scenario() -> list[int]:
        metrics = Metrics()
        server = await serve(metrics, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            codes = [(await get(port, "/healthz"))[0]]
            metrics.healthy = True
            status, _, body = await get(port, "/healthz?verbose=1")
            assert body == b"ok\n"
            codes.append(status)
            metrics.healthy = False  # draining
            codes.append((await get(port, "/healthz"))[0])
            codes.append((await get(port, "/"))[0])
            codes.append((await http(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))[0])
            codes.append((await http(port, b"nonsense\r\n\r\n"))[0])
            # A client that connects and says nothing is dropped, and the server still answers.
            async with asyncio.timeout(TIMEOUT_S):
                _, idle = await asyncio.open_connection("127.0.0.1", port)
                idle.close()
                await idle.wait_closed()
            codes.append((await get(port, "/healthz"))[0])
        finally:
            server.close()
            await server.wait_closed()
        return codes

    assert asyncio.run(scenario()) == [503, 200, 503, 404, 405, 400, 503]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("[::1]:9108", ("::1", 9108)),
        ("localhost:9108", ("localhost", 9108)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("metrics.example.org:9108", ("metrics.example.org", 9108)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["9108", ":9108", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "::1:9108", "[nope]:9108"]
)
def test_parse_listen_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="Fix: "):
        parse_listen(text)


def test_non_loopback_needs_allow_remote() -> None:
    assert check_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert check_listen("[::1]:9108") == ("::1", 9108)
    assert check_listen("localhost:9108") == ("localhost", 9108)
    assert check_listen("127.0.0.2:9108") == ("127.0.0.2", 9108)
    for remote in ("0.0.0.0:9108", "[::]:9108", "10.1.2.3:9108", "metrics.example.org:9108"):
        with pytest.raises(ValueError, match="allow_remote") as info:
            check_listen(remote)
        assert "not a loopback address" in str(info.value)
        assert check_listen(remote, allow_remote=True)[1] == 9108
    assert is_loopback("LOCALHOST") and not is_loopback("example.org")
