"""Every error of the daemon, with the exit status each one ends `inferd` with.

All derive from `InferdError`. Two families:

- errors that stop the daemon (a bad config, a device that cannot start): `exit_status` is what
  `inferd run` and `inferd check` return (`daemon.cli` reads it from here, nowhere else);
- errors of one item, one batch, one sink write, one reconnect: they never end the process
  (`exit_status` stays EXIT_RUNTIME only as a fallback should one escape, which is a bug).

Exit statuses: 0 success; 1 runtime failure, or a start that may succeed later; 2 usage error;
78 (EX_CONFIG) a bad configuration or a model that can never load. systemd's unit lists 78 in
RestartPreventExitStatus, so only what cannot work is kept from restarting in a loop.

This is a leaf module: it imports nothing of the daemon.
"""

from __future__ import annotations

import enum
from typing import Any

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG: systemd does not restart it (RestartPreventExitStatus=78)


class InferdError(Exception):
    """The base of every error the daemon raises on purpose."""

    exit_status: int = EXIT_RUNTIME


# --- errors that stop the start -------------------------------------------------------------


class ConfigError(InferdError):
    """A configuration problem: `key` is the dotted TOML key, `fix` says what to do."""

    exit_status = EXIT_CONFIG

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"config key '{key}': {problem}. Fix: {fix}")
        self.key = key


class DeviceStartError(InferdError):
    """A device could not start (the message says why).

    `permanent`: it never will as configured (weights missing or not a model, no room for the
    slots): exit 78, which systemd does not restart. Otherwise (a timeout, a process that died
    while loading, out of memory, a cluster not reachable yet) a later start may succeed: exit 1,
    and systemd restarts it.
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.exit_status = EXIT_CONFIG if permanent else EXIT_RUNTIME


class Invalid(InferdError):
    """A config value a check refuses (`daemon.checks`): what is wrong, and how to fix it;
    config.parse adds the key's name to make it a ConfigError."""

    exit_status = EXIT_CONFIG

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem = problem
        self.fix = fix


class ListenError(InferdError, ValueError):
    """A bad listen address: `problem` and `fix` feed ConfigError('metrics.listen', ...)."""

    exit_status = EXIT_CONFIG

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem = problem
        self.fix = fix


class ModelError(InferdError):
    """The model cannot be found or loaded."""

    exit_status = EXIT_CONFIG


class Unsupported(InferdError):
    """A model inferd refuses to run, because it would write the wrong thing."""

    exit_status = EXIT_CONFIG


class ExportError(InferdError):
    """The exporter failed; nothing was left in the cache. The message names runtime and fix."""


class ExportStopped(InferdError):
    """A stop request arrived during the export; nothing was cached (the daemon exits 0)."""

    exit_status = EXIT_OK


# --- errors of one device's batch (they decide what the batcher does with it) ----------------


class DeviceCrashed(InferdError):
    """The device died with batches in flight.

    `started` is False for a batch that cannot have caused the death: it was queued behind the
    one being computed, or sent to a device already gone. It must not count as an attempt.
    """

    def __init__(self, message: str, *, started: bool = True) -> None:
        super().__init__(message)
        self.started = started


class DeviceRetired(DeviceCrashed):
    """The device is being retired (a reload): the batch goes back, to be sent to another."""

    def __init__(self, device: str) -> None:
        super().__init__(f"{device} is retiring", started=False)


class BatchFailed(InferdError):
    """The model raised on a batch; `kind` is "oom" or "error"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- the Ray backend's bridge to its driver process ------------------------------------------


class ClusterLost(InferdError):
    """The driver process is gone: whatever was asked of the cluster has no answer."""


class ProtocolError(InferdError):
    """A process received a message it does not take (`daemon.messages.refuse`): a bug."""


class RemoteError(InferdError):
    """The driver could not do what it was started for: `kind` is "unreachable" (the cluster)."""

    def __init__(self, kind: str, value: Any) -> None:
        super().__init__(f"{kind}: {value}")
        self.kind = kind
        self.value = value


# --- errors of one item: it goes to failed/ (or the sink retries), the stream goes on ---------


class FailReason(enum.Enum):
    """Why an input ended up in failed/ (the `reason` field of its .error.json)."""

    NOT_REGULAR = "not_regular_file"  # FIFO, socket, device
    SYMLINK = "symlink_refused"
    UNREADABLE = "unreadable"  # I/O error reading the bytes
    NOT_IMAGE = "not_an_image"  # empty, truncated or not a format PIL decodes
    TOO_LARGE = "too_many_pixels"  # above pipeline.max_pixels (decompression bomb guard)
    INFERENCE = "inference_error"
    POISON = "worker_crashed_repeatedly"
    WRITE = "write_error"  # results could not be written (disk full, read-only) after output.write_attempts
    INTERNAL = "internal_error"  # a bug met on this item: the traceback is logged once, the stream goes on


class ItemError(InferdError):
    """A per-item failure: the item goes to failed/ with `reason` and this message."""

    def __init__(self, reason: FailReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @classmethod
    def internal(cls, exc: BaseException) -> ItemError:
        """The last-resort failure of one item: an exception no stage expected (a bug). The
        caller logs the traceback once; the item goes to failed/ and the stream goes on."""
        return cls(FailReason.INTERNAL, f"{type(exc).__name__}: {exc}")


class OutsideIncoming(InferdError):
    """The path reaches its file through a symlinked directory: the file is not in incoming/."""


class SinkError(InferdError):
    """This one outcome cannot be stored (its data, not the sink, is at fault)."""


def exit_status(exc: BaseException) -> int:
    """The exit status `exc` ends `inferd` with: its own for an InferdError, else EXIT_RUNTIME."""
    return exc.exit_status if isinstance(exc, InferdError) else EXIT_RUNTIME
