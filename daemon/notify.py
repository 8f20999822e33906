"""The sd_notify protocol: readiness, status, watchdog and stop notices for systemd, in pure Python.

Each notice is one datagram of newline-separated `KEY=value` lines sent to the unix socket named
by $NOTIFY_SOCKET (a path, or `@name` for an abstract socket). Without that variable, as outside
systemd, every method does nothing. Sending never blocks: the socket is non-blocking, and a
failure (the manager gone, its queue full) is logged once and otherwise ignored, since the
daemon's work matters more than its reports.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("daemon.notify")


class Notifier:
    """Talks to the service manager. `watchdog_usec` is systemd's WatchdogSec in microseconds."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None) -> None:
        if socket_path and not socket_path.startswith(("/", "@")):
            raise ValueError(f"notify socket {socket_path!r} is neither an absolute path nor @abstract")
        # Linux names an abstract socket by a leading NUL byte; systemd writes it as '@'.
        self.address = "\0" + socket_path[1:] if socket_path and socket_path[0] == "@" else socket_path or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as sd_notify(3) and sd_watchdog_enabled(3) do."""
        path = environ.get("NOTIFY_SOCKET") or None
        usec = _positive_int(environ.get("WATCHDOG_USEC"))
        watchdog_pid = environ.get("WATCHDOG_PID")
        if watchdog_pid is not None and _positive_int(watchdog_pid) != os.getpid():
            usec = None  # the watchdog belongs to another process (we were started by it)
        if path and not path.startswith(("/", "@")):
            log.warning("notify_socket_unsupported", notify_socket=path)
            path = None
        return cls(path, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call watchdog(): half the manager's timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def ready(self) -> None:
        """Start-up is complete (also ends a reload)."""
        self.send(READY=1)

    def status(self, text: str) -> None:
        """A one-line state shown by `systemctl status`."""
        self.send(STATUS=text)

    def watchdog(self) -> None:
        """Keep-alive; does nothing unless the manager expects one from this process."""
        if self.watchdog_usec:
            self.send(WATCHDOG=1)

    def reloading(self) -> None:
        """A reload starts; call ready() when it is done. systemd >= 253 wants the monotonic timestamp."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        """Shutdown has begun (the drain)."""
        self.send(STOPPING=1)

    def send(self, **fields: str | int) -> None:
        """Send one notice, e.g. send(STATUS="draining", EXTEND_TIMEOUT_USEC=10_000_000)."""
        address = self.address
        if address is None or not fields:
            return
        # A value cannot span lines: the manager would read the rest as another field.
        message = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("notify_failed", notify_socket=address.replace("\0", "@"), error=str(exc))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text else 0
    except ValueError:
        return None
    return value if value > 0 else None
