"""sd_notify: real datagrams on a real unix socket, as systemd would receive them."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.notify import Notifier


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A stand-in for systemd's notify socket: bound in tmp_path, read with a timeout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_in_order(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier(path, 30_000_000)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.ready()
    notifier.status("1 device up; 0 in flight")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    notifier.send(STATUS="two\nlines", EXTEND_TIMEOUT_USEC=5_000_000)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert received(sock) == "READY=1"
    assert received(sock) == "STATUS=1 device up; 0 in flight"
    assert received(sock) == "WATCHDOG=1"
    reloading = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", received(sock))
    assert reloading is not None
    assert before <= int(reloading.group(1)) <= after
    assert received(sock) == "STOPPING=1"
    assert received(sock) == "STATUS=two lines\nEXTEND_TIMEOUT_USEC=5000000"
    notifier.close()


def test_abstract_socket() -> None:
    name = f"inferd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.ready()
        assert received(sock) == "READY=1"
        notifier.close()


def test_without_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    notifier.ready()
    notifier.status("x")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    notifier.send(FOO="bar")


def test_watchdog_interval_is_half_the_timeout() -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"})
    assert notifier.watchdog_interval_s == 15.0
    mine = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(mine).watchdog_interval_s == 15.0
    assert Notifier.from_environ({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    assert Notifier.from_environ({"WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


def test_watchdog_of_another_process_is_ignored(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval_s is None
    notifier.watchdog()  # not ours to feed: nothing is sent
    notifier.ready()
    assert received(sock) == "READY=1"
    notifier.close()


def test_a_missing_socket_warns_once_and_carries_on(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"), None)
    with capture_logs() as logs:
        notifier.ready()
        notifier.status("still fine")
    assert [e["event"] for e in logs] == ["notify_failed"]
    assert "No such file" in logs[0]["error"]
    notifier.close()


def test_a_full_queue_does_not_block(manager: tuple[socket.socket, str]) -> None:
    _, path = manager
    notifier = Notifier(path, None)
    started = time.monotonic()
    with capture_logs() as logs:
        for _ in range(100_000):  # nobody reads: the receive queue fills, sendto gets EAGAIN
            notifier.status("x" * 1000)
    assert time.monotonic() - started < 30
    assert [e["event"] for e in logs] == ["notify_failed"]
    notifier.close()


def test_relative_socket_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="absolute path"):
        Notifier("run/notify", None)
    with capture_logs() as logs:
        assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1"}).enabled
    assert logs[0]["event"] == "notify_socket_unsupported"
