"""How a config value is validated: one small check per kind of value, named in the key's
declaration (config.KEYS). A check turns the TOML value into what the daemon uses, or raises
`Invalid(problem, fix)`; config.parse adds the key's name to make it a ConfigError.

A leaf module: it imports only `daemon.errors`, so any module may declare a key with it.
"""

from __future__ import annotations

import enum
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from daemon.errors import Invalid as Invalid  # re-exported: the checks' vocabulary


class Check(Protocol):
    def __call__(self, value: Any, base: Path) -> Any:
        """`value` as the daemon uses it; `base` is the config file's directory."""


def string(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"must be a non-empty string, got {value!r}", 'quote it: key = "value"')
    return value


def text(value: Any, base: Path) -> str:
    """A string that may be empty."""
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {value!r}", 'quote it: key = "value", or ""')
    return value


def path(value: Any, base: Path) -> Path:
    return (base / string(value, base)).resolve()


def folder(value: Any, base: Path) -> Path | None:
    """An existing folder, relative to the config file; "" = none."""
    if value == "":
        return None
    found = path(value, base)
    if not found.is_dir():
        raise Invalid(f"{found} is not a folder", 'give a folder of images, or ""')
    return found


def boolean(value: Any, base: Path) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {value!r}", "write true or false, unquoted")
    return value


@dataclass(frozen=True, slots=True)
class Integer:
    low: int | None = None
    high: int | None = None
    multiple_of: int = 1
    auto: int | None = None  # the value "auto" stands for, if it is allowed

    def __call__(self, value: Any, base: Path) -> int:
        if self.auto is not None and value == "auto":
            return self.auto
        if isinstance(value, bool) or not isinstance(value, int):
            auto = ', or "auto"' if self.auto is not None else ""
            raise Invalid(f"must be an integer, got {value!r}", f"write a whole number, unquoted{auto}")
        if (
            (self.low is not None and value < self.low)
            or (self.high is not None and value > self.high)
            or (value % self.multiple_of)
        ):
            bounds = f"between {self.low} and {self.high}" if self.high is not None else f"at least {self.low}"
            extra = f" and a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
            raise Invalid(f"is {value}", f"use a value {bounds}{extra}")
        return value


@dataclass(frozen=True, slots=True)
class Number:
    low: float
    high: float | None = None

    def __call__(self, value: Any, base: Path) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"must be a number, got {value!r}", "write a number, unquoted")
        if value < self.low or (self.high is not None and value > self.high):
            bounds = f"between {self.low} and {self.high}" if self.high is not None else f"at least {self.low}"
            raise Invalid(f"is {value}", f"use a value {bounds}")
        return float(value)


@dataclass(frozen=True, slots=True)
class Choice:
    """One of an enum's values (gives the member) or of a tuple of strings (gives the string)."""

    of: type[enum.Enum] | tuple[str, ...]

    def __call__(self, value: Any, base: Path) -> Any:
        names = [e.value for e in self.of] if isinstance(self.of, type) else list(self.of)
        if value not in names:
            raise Invalid(f"is {value!r}", f"use one of {names}")
        return self.of(value) if isinstance(self.of, type) else str(value)


@dataclass(frozen=True, slots=True)
class Strings:
    choices: tuple[str, ...] | None = None
    non_empty: bool = False

    def __call__(self, value: Any, base: Path) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Invalid(f"must be a list of strings, got {value!r}", 'write ["a", "b"]')
        for v in value:
            if self.choices is not None and v not in self.choices:
                raise Invalid(f"has unknown entry {v!r}", f"use entries from {list(self.choices)}")
        if self.non_empty and not value:
            raise Invalid("is empty", f"list at least one of {list(self.choices or ())}")
        return tuple(value)


def devices(value: Any, base: Path) -> tuple[str, ...]:
    if value == "auto":
        return ("auto",)
    if isinstance(value, str):
        value = [value]
    fix = 'write "auto", or a list such as ["cuda:0", "cuda:1"] or ["cpu"]'
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a list of device names, got {value!r}", fix)
    for v in value:
        if not (isinstance(v, str) and (v == "cpu" or (v.startswith("cuda:") and v[5:].isdigit()))):
            raise Invalid(f"has unknown device {v!r}", fix)
    if len(set(value)) != len(value):
        raise Invalid("names a device twice", "list each device once")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """Where results go besides the files: a SQLite file, or a PostgreSQL server (libpq URL)."""

    dialect: str  # "sqlite" or "postgresql"
    path: Path | None  # the SQLite file
    dsn: str  # the PostgreSQL URL as written (libpq parses it); the SQLite path as text

    @property
    def redacted(self) -> str:
        """The URL for logs: a password in it is replaced by ***."""
        if self.path is not None:
            return f"sqlite:///{self.path}"
        parts = urllib.parse.urlsplit(self.dsn)
        if parts.password is None:
            return self.dsn
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")


def database(value: Any, base: Path) -> DatabaseUrl | None:
    """`""`, `sqlite:///relative/or/absolute` (four slashes: absolute), or `postgresql://...`."""
    forms = '"" (off), "sqlite:///var/results.sqlite3", or "postgresql://user@host/db"'
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {value!r}", f"write {forms}")
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in DATABASE_SCHEMES:
        raise Invalid(f"{value!r} is not a database URL inferd knows", f"write {forms}")
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/" or "?" in rest:
            raise Invalid(
                f"{value!r} names no SQLite file",
                'write "sqlite:///relative/path.sqlite3" or "sqlite:////absolute/path.sqlite3"',
            )
        file = (base / rest[1:]).resolve()
        return DatabaseUrl("sqlite", file, str(file))
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        query = urllib.parse.parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise Invalid(f"{value!r} is not a valid URL ({exc})", "write postgresql://user@host:5432/db") from None
    if "port" in query and not all(p.isdigit() for p in query["port"]):
        raise Invalid(f"{value!r} has a port that is not a number", "write ?port=5432")
    return DatabaseUrl("postgresql", None, value)


def ray_address(value: Any, base: Path) -> str:
    forms = '"" (start a local Ray instance), "auto", "host:6379" or "ray://host:10001"'
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {value!r}", f"write {forms}")
    if value not in ("", "auto"):
        host, sep, port = value.removeprefix("ray://").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise Invalid(f"{value!r} is not a Ray address", f"write {forms}")
    return value


def ray_resources(value: Any, base: Path) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        for k, v in value.items()
    ):
        raise Invalid(
            f"must be a table of positive numbers, got {value!r}",
            "write resources = { inferd = 1 } (names of custom resources given to `ray start --resources`)",
        )
    for name in ("CPU", "GPU", "memory", "object_store_memory"):
        if name in value:
            raise Invalid(
                f"names {name}, which Ray counts itself",
                "use cluster.cpus_per_actor and cluster.actors_per_gpu instead",
            )
    return tuple(sorted((str(k), float(v)) for k, v in value.items()))
