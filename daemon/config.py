"""Configuration: frozen dataclasses loaded once from TOML, validated eagerly.

Every error names the key and how to fix it. Relative paths are resolved against the directory
of the config file, so `inferd run --config /etc/inferd/config.toml` and a checkout behave alike.
"""

from __future__ import annotations

import enum
import os
import tomllib
import urllib.parse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_WEIGHTS = "default"  # the embedded person detector (see model.resolve_weights)


class ConfigError(Exception):
    """A configuration problem: `key` is the dotted TOML key, `fix` says what to do."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"config key '{key}': {problem}. Fix: {fix}")
        self.key = key


class OnSuccess(enum.Enum):
    MOVE = "move"  # source goes to paths.done
    DELETE = "delete"  # source is removed once its results are durable


class Decode(enum.Enum):
    HOST = "host"  # PIL in the daemon's thread pool, at reduced size for large JPEGs
    DEVICE = "device"  # JPEGs in the device process: nvJPEG on a GPU (other formats stay on host)
    AUTO = "auto"  # device when every device is a GPU, else host (workers.resolve_decode)


class Runtime(enum.Enum):
    """What runs the model (runtimes.choose makes AUTO concrete per device)."""

    AUTO = "auto"  # OpenVINO on CPUs; TensorRT on CUDA when the tensorrt package imports, else PyTorch
    TORCH = "torch"
    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Precision(enum.Enum):
    """The arithmetic of the forward pass (runtimes.choose makes AUTO concrete per device)."""

    AUTO = "auto"  # fp16 on CUDA; bf16 with OpenVINO on CPUs with AMX; else fp32
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Backend(enum.Enum):
    """Where the device processes run."""

    LOCAL = "local"  # spawned processes on this machine (daemon.workers)
    RAY = "ray"  # actors on a Ray cluster (daemon.cluster); needs pip install 'inferd[ray]'


class LogFormat(enum.Enum):
    JSON = "json"
    CONSOLE = "console"
    AUTO = "auto"  # console when stdout is a TTY, else JSON


class TilingMode(enum.Enum):
    """Sliced inference (daemon.tiling): when an image is cut into tiles of the model's size."""

    OFF = "off"  # never: every image letterboxed whole (Ultralytics predict parity)
    ON = "on"  # always
    AUTO = "auto"  # when letterboxing would shrink the image more than tiling.auto_above times


class MergeRule(enum.Enum):
    GREEDY_NMM = "greedy_nmm"  # SAHI's GREEDYNMM: overlapping results merge into one (union box, max score)
    NMS = "nms"  # overlapping results: only the most confident is kept


class MatchMetric(enum.Enum):
    IOS = "ios"  # intersection over the smaller area (a cut-off half matches its whole)
    IOU = "iou"  # intersection over union


OUTPUT_FORMATS = ("txt", "json", "image")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class PathsConfig:
    incoming: Path
    output: Path
    done: Path
    failed: Path
    work: Path  # holds processing/ (claimed inputs) and Ultralytics' settings dir


@dataclass(frozen=True, slots=True)
class ModelConfig:
    weights: str
    imgsz: int  # 0 = "auto": the checkpoint's training size (tasks.checkpoint.resolve makes it concrete)
    conf: float
    iou: float
    max_det: int
    devices: tuple[str, ...]  # ("auto",) until service resolves it
    runtime: Runtime = Runtime.AUTO
    precision: Precision = Precision.AUTO


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    settle_ms: int
    reconcile_interval_s: float
    debounce_ms: int
    force_polling: bool
    ignore_suffixes: tuple[str, ...]
    claim_by_copy: bool = False  # incoming/ on another filesystem: claim by copy, then delete


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    max_pending: int
    preprocess_threads: int  # 0 = auto
    torch_threads: int  # 0 = auto
    cpu_workers: int  # device processes for "cpu"; 0 = auto
    max_batch: int
    max_wait_ms: int
    reduced_decode: bool
    decode: Decode
    max_pixels: int
    max_attempts: int
    worker_start_timeout_s: float
    drain_timeout_s: float


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


@dataclass(frozen=True, slots=True)
class OutputConfig:
    formats: tuple[str, ...]
    on_success: OnSuccess
    fsync: bool
    write_attempts: int  # 0 = retry a failing write until it succeeds
    database: DatabaseUrl | None = None  # None = no database sink


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str
    format: LogFormat
    stats_interval_s: float = 60.0  # 0 = no periodic stats line


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: tuple[str, int] | None  # None = no HTTP endpoint


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`[cluster]`: the device processes as Ray actors (daemon.cluster) instead of local processes."""

    backend: Backend = Backend.LOCAL
    address: str = ""  # "" = start a local Ray instance; "auto", "host:port" or "ray://host:port"
    actors_per_gpu: int = 1  # actors sharing one GPU (each asks for num_gpus = 1 / actors_per_gpu)
    cpu_actors: int = 1  # actors per node on CPUs when the cluster has no GPU; 0 = refuse to start without one
    cpus_per_actor: float = 1.0  # Ray num_cpus of each actor (a CPU actor's torch threads, rounded up)
    resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources each actor needs, e.g. {"inferd" = 1}
    rescan_interval_s: float = 10.0  # how often the cluster's GPUs are counted: a node added gets an actor
    connect_timeout_s: float = 30.0  # a cluster that does not answer within this is unreachable


@dataclass(frozen=True, slots=True)
class TilingConfig:
    """`[tiling]`: sliced inference for images far larger than the model input (docs/tiling.md)."""

    mode: TilingMode = TilingMode.OFF
    auto_above: float = 8.0  # mode auto: tile when the long side is more than this many times the model input
    size: int = 0  # tile edge in source pixels; 0 = "auto", the model's imgsz
    overlap: float = 0.2  # fraction of a tile shared with its neighbour
    full_image: bool = True  # also the whole image letterboxed, for objects larger than a tile
    merge: MergeRule = MergeRule.GREEDY_NMM
    match: MatchMetric = MatchMetric.IOS
    match_threshold: float = 0.5
    class_agnostic: bool = False  # merge across classes too


@dataclass(frozen=True, slots=True)
class Config:
    source: Path | None  # the file it was read from
    paths: PathsConfig
    model: ModelConfig
    intake: IntakeConfig
    pipeline: PipelineConfig
    output: OutputConfig
    log: LogConfig
    metrics: MetricsConfig
    cluster: ClusterConfig = ClusterConfig()
    tiling: TilingConfig = TilingConfig()


DEFAULTS: dict[str, dict[str, Any]] = {
    "paths": {
        "incoming": "var/incoming",
        "output": "var/output",
        "done": "var/done",
        "failed": "var/failed",
        "work": "var/work",
    },
    "model": {
        "weights": DEFAULT_WEIGHTS,
        "imgsz": "auto",
        "conf": 0.25,
        "iou": 0.7,
        "max_det": 300,
        "devices": "auto",
        "runtime": "auto",
        "precision": "auto",
    },
    "intake": {
        "settle_ms": 1000,
        "reconcile_interval_s": 30.0,
        "debounce_ms": 20,
        "force_polling": False,
        "claim_by_copy": False,
        "ignore_suffixes": [".tmp", ".part", ".partial", ".crdownload", ".swp", "~"],
    },
    "pipeline": {
        "max_pending": 256,
        "preprocess_threads": "auto",
        "torch_threads": "auto",
        "cpu_workers": "auto",
        "max_batch": 8,
        "max_wait_ms": 10,
        "reduced_decode": True,
        "decode": "auto",
        "max_pixels": 100_000_000,
        "max_attempts": 3,
        "worker_start_timeout_s": 120.0,
        "drain_timeout_s": 30.0,
    },
    "output": {
        "formats": ["txt", "json"],
        "on_success": "move",
        "fsync": True,
        "write_attempts": 8,
        "database": "sqlite:///var/results.sqlite3",
    },
    "log": {"level": "info", "format": "auto", "stats_interval_s": 60.0},
    "metrics": {"listen": "", "allow_remote": False},
    "cluster": {
        "backend": "local",
        "address": "",
        "actors_per_gpu": 1,
        "cpu_actors": 1,
        "cpus_per_actor": 1.0,
        "resources": {},
        "rescan_interval_s": 10.0,
        "connect_timeout_s": 30.0,
    },
    "tiling": {
        "mode": "off",
        "auto_above": 8.0,
        "size": "auto",
        "overlap": 0.2,
        "full_image": True,
        "merge": "greedy_nmm",
        "match": "ios",
        "match_threshold": 0.5,
        "class_agnostic": False,
    },
}


def load(path: Path | None) -> Config:
    """Read and validate `path` (None: built-in defaults relative to the working directory)."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"file {path} does not exist", "pass an existing config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML ({exc})", "correct the syntax") from None
        base = path.resolve().parent
    return parse(raw, base=base, source=path)


def parse(raw: dict[str, Any], *, base: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML document against the schema; relative paths resolve against `base`."""
    for section in raw:
        if section not in DEFAULTS:
            raise ConfigError(section, "unknown section", f"use one of {sorted(DEFAULTS)}")
    model_table = raw.get("model")
    if isinstance(model_table, dict) and "half" in model_table:
        half = model_table["half"]
        write = {True: '"fp16"', False: '"fp32"'}.get(half, '"auto"') if isinstance(half, bool) else '"auto"'
        raise ConfigError(
            "model.half",
            "was replaced by model.precision",
            f"remove half and write precision = {write} (one of {[e.value for e in Precision]})",
        )
    t = _Table(raw, base)
    paths = PathsConfig(**{f.name: t.path("paths", f.name) for f in fields(PathsConfig)})
    model = ModelConfig(
        weights=t.string("model", "weights"),
        imgsz=0 if t.get("model", "imgsz") == "auto" else t.integer("model", "imgsz", low=32, multiple_of=32),
        conf=t.number("model", "conf", low=0.0, high=1.0),
        iou=t.number("model", "iou", low=0.0, high=1.0),
        max_det=t.integer("model", "max_det", low=1),
        devices=t.devices(),
        runtime=Runtime(t.choice("model", "runtime", [e.value for e in Runtime])),
        precision=Precision(t.choice("model", "precision", [e.value for e in Precision])),
    )
    intake = IntakeConfig(
        settle_ms=t.integer("intake", "settle_ms", low=0),
        reconcile_interval_s=t.number("intake", "reconcile_interval_s", low=0.1),
        debounce_ms=t.integer("intake", "debounce_ms", low=1),
        force_polling=t.boolean("intake", "force_polling"),
        claim_by_copy=t.boolean("intake", "claim_by_copy"),
        ignore_suffixes=t.strings("intake", "ignore_suffixes"),
    )
    pipeline = PipelineConfig(
        max_pending=t.integer("pipeline", "max_pending", low=1),
        preprocess_threads=t.auto_int("pipeline", "preprocess_threads"),
        torch_threads=t.auto_int("pipeline", "torch_threads"),
        cpu_workers=t.auto_int("pipeline", "cpu_workers"),
        max_batch=t.integer("pipeline", "max_batch", low=1, high=256),
        max_wait_ms=t.integer("pipeline", "max_wait_ms", low=0),
        reduced_decode=t.boolean("pipeline", "reduced_decode"),
        decode=Decode(t.choice("pipeline", "decode", [e.value for e in Decode])),
        max_pixels=t.integer("pipeline", "max_pixels", low=1),
        max_attempts=t.integer("pipeline", "max_attempts", low=1),
        worker_start_timeout_s=t.number("pipeline", "worker_start_timeout_s", low=1.0),
        drain_timeout_s=t.number("pipeline", "drain_timeout_s", low=0.0),
    )
    formats = t.strings("output", "formats", choices=OUTPUT_FORMATS)
    if not formats:
        raise ConfigError("output.formats", "is empty", f"list at least one of {list(OUTPUT_FORMATS)}")
    output = OutputConfig(
        formats=formats,
        on_success=OnSuccess(t.choice("output", "on_success", [e.value for e in OnSuccess])),
        fsync=t.boolean("output", "fsync"),
        write_attempts=t.integer("output", "write_attempts", low=0),
        database=t.database(),
    )
    log = LogConfig(
        level=t.choice("log", "level", LOG_LEVELS),
        format=LogFormat(t.choice("log", "format", [e.value for e in LogFormat])),
        stats_interval_s=t.number("log", "stats_interval_s", low=0.0),
    )
    metrics = MetricsConfig(listen=t.listen())
    cluster = t.cluster(model)
    tiling = t.tiling()
    t.reject_unknown()
    return Config(source, paths, model, intake, pipeline, output, log, metrics, cluster, tiling)


def prepare_dirs(paths: PathsConfig, *, claim_by_copy: bool = False) -> None:
    """Create every configured directory; a failure names the key and the reason.

    work, done and failed must share incoming's filesystem (a rename is atomic only within one),
    or, with `claim_by_copy`, work's.
    """
    for f in fields(PathsConfig):
        target: Path = getattr(paths, f.name)
        try:
            target.mkdir(parents=True, exist_ok=True)
            if not os.access(target, os.W_OK | os.X_OK):
                raise PermissionError(f"{target} is not writable")
        except OSError as exc:
            raise ConfigError(
                f"paths.{f.name}",
                f"cannot use directory {target} ({exc.strerror or exc})",
                "point it at a directory this user can create and write, or create it with the right owner",
            ) from None
    (paths.work / "processing").mkdir(exist_ok=True)
    base, others = ("work", ("done", "failed")) if claim_by_copy else ("incoming", ("work", "done", "failed"))
    for name in others:
        if getattr(paths, name).stat().st_dev != getattr(paths, base).stat().st_dev:
            raise ConfigError(
                f"paths.{name}",
                f"is on a different filesystem than paths.{base}, so moving a file there is not atomic",
                "put incoming, work, done and failed on one filesystem"
                + ("" if claim_by_copy else ", or set intake.claim_by_copy = true to claim by copying"),
            )


class _Table:
    """Typed access to the raw TOML tables, remembering which keys were read."""

    def __init__(self, raw: dict[str, Any], base: Path) -> None:
        self.raw = raw
        self.base = base
        self.seen: set[tuple[str, str]] = set()

    def get(self, section: str, key: str) -> Any:
        self.seen.add((section, key))
        table = self.raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table", f"write it as [{section}]")
        return table.get(key, DEFAULTS[section][key])

    def fail(self, section: str, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{section}.{key}", problem, fix)

    def string(self, section: str, key: str) -> str:
        value = self.get(section, key)
        if not isinstance(value, str) or not value:
            raise self.fail(section, key, f"must be a non-empty string, got {value!r}", 'quote it: key = "value"')
        return value

    def path(self, section: str, key: str) -> Path:
        return (self.base / self.string(section, key)).resolve()

    def boolean(self, section: str, key: str) -> bool:
        value = self.get(section, key)
        if not isinstance(value, bool):
            raise self.fail(section, key, f"must be true or false, got {value!r}", "write true or false, unquoted")
        return value

    def integer(
        self, section: str, key: str, *, low: int | None = None, high: int | None = None, multiple_of: int = 1
    ) -> int:
        value = self.get(section, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(section, key, f"must be an integer, got {value!r}", "write a whole number, unquoted")
        if (low is not None and value < low) or (high is not None and value > high) or value % multiple_of:
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            extra = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
            raise self.fail(section, key, f"is {value}", f"use a value {bounds}{extra}")
        return value

    def number(self, section: str, key: str, *, low: float, high: float | None = None) -> float:
        value = self.get(section, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(section, key, f"must be a number, got {value!r}", "write a number, unquoted")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(section, key, f"is {value}", f"use a value {bounds}")
        return float(value)

    def auto_int(self, section: str, key: str) -> int:
        if self.get(section, key) == "auto":
            return 0
        return self.integer(section, key, low=1)

    def choice(self, section: str, key: str, choices: tuple[str, ...] | list[str]) -> str:
        value = self.get(section, key)
        if value not in choices:
            raise self.fail(section, key, f"is {value!r}", f"use one of {list(choices)}")
        return str(value)

    def strings(self, section: str, key: str, *, choices: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = self.get(section, key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(section, key, f"must be a list of strings, got {value!r}", 'write ["a", "b"]')
        for v in value:
            if choices is not None and v not in choices:
                raise self.fail(section, key, f"has unknown entry {v!r}", f"use entries from {list(choices)}")
        return tuple(value)

    def devices(self) -> tuple[str, ...]:
        value = self.get("model", "devices")
        if value == "auto":
            return ("auto",)
        if isinstance(value, str):
            value = [value]
        fix = 'write "auto", or a list such as ["cuda:0", "cuda:1"] or ["cpu"]'
        if not isinstance(value, list) or not value:
            raise self.fail("model", "devices", f"must be a list of device names, got {value!r}", fix)
        for v in value:
            ok = isinstance(v, str) and (v == "cpu" or (v.startswith("cuda:") and v[5:].isdigit()))
            if not ok:
                raise self.fail("model", "devices", f"has unknown device {v!r}", fix)
        if len(set(value)) != len(value):
            raise self.fail("model", "devices", "names a device twice", "list each device once")
        return tuple(value)

    def listen(self) -> tuple[str, int] | None:
        from daemon.metrics import ListenError, check_listen

        text = self.get("metrics", "listen")
        allow_remote = self.boolean("metrics", "allow_remote")
        if not isinstance(text, str):
            raise self.fail("metrics", "listen", f"must be a string, got {text!r}", 'write "127.0.0.1:9108", or ""')
        try:
            return check_listen(text, allow_remote=allow_remote) if text else None
        except ListenError as exc:
            raise ConfigError("metrics.listen", exc.problem, exc.fix) from None

    def database(self) -> DatabaseUrl | None:
        """`""`, `sqlite:///relative/or/absolute` (four slashes: absolute), or `postgresql://...`."""
        value = self.get("output", "database")
        forms = '"" (off), "sqlite:///var/results.sqlite3", or "postgresql://user@host/db"'
        if not isinstance(value, str):
            raise self.fail("output", "database", f"must be a string, got {value!r}", f"write {forms}")
        if not value:
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in DATABASE_SCHEMES:
            raise self.fail("output", "database", f"{value!r} is not a database URL inferd knows", f"write {forms}")
        if scheme == "sqlite":
            if not rest.startswith("/") or rest == "/" or "?" in rest:
                raise self.fail(
                    "output",
                    "database",
                    f"{value!r} names no SQLite file",
                    'write "sqlite:///relative/path.sqlite3" or "sqlite:////absolute/path.sqlite3"',
                )
            path = (self.base / rest[1:]).resolve()
            return DatabaseUrl("sqlite", path, str(path))
        try:
            parts = urllib.parse.urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
            query = urllib.parse.parse_qs(parts.query, strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise self.fail(
                "output", "database", f"{value!r} is not a valid URL ({exc})", "write postgresql://user@host:5432/db"
            ) from None
        if "port" in query and not all(p.isdigit() for p in query["port"]):
            raise self.fail("output", "database", f"{value!r} has a port that is not a number", "write ?port=5432")
        return DatabaseUrl("postgresql", None, value)

    def cluster(self, model: ModelConfig) -> ClusterConfig:
        backend = Backend(self.choice("cluster", "backend", [e.value for e in Backend]))
        address = self.get("cluster", "address")
        forms = '"" (start a local Ray instance), "auto", "host:6379" or "ray://host:10001"'
        if not isinstance(address, str):
            raise self.fail("cluster", "address", f"must be a string, got {address!r}", f"write {forms}")
        if address not in ("", "auto"):
            host, sep, port = address.removeprefix("ray://").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise self.fail("cluster", "address", f"{address!r} is not a Ray address", f"write {forms}")
        resources = self.get("cluster", "resources")
        if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for k, v in resources.items()
        ):
            raise self.fail(
                "cluster", "resources", f"must be a table of positive numbers, got {resources!r}",
                'write resources = { inferd = 1 } (names of custom resources given to `ray start --resources`)',
            )
        for name in ("CPU", "GPU", "memory", "object_store_memory"):
            if name in resources:
                raise self.fail(
                    "cluster", "resources", f"names {name}, which Ray counts itself",
                    "use cluster.cpus_per_actor and cluster.actors_per_gpu instead",
                )
        cluster = ClusterConfig(
            backend=backend,
            address=address,
            actors_per_gpu=self.integer("cluster", "actors_per_gpu", low=1, high=16),
            cpu_actors=self.integer("cluster", "cpu_actors", low=0, high=256),
            cpus_per_actor=self.number("cluster", "cpus_per_actor", low=0.0),
            resources=tuple(sorted((str(k), float(v)) for k, v in resources.items())),
            rescan_interval_s=self.number("cluster", "rescan_interval_s", low=1.0),
            connect_timeout_s=self.number("cluster", "connect_timeout_s", low=1.0),
        )
        if backend is Backend.RAY and model.runtime not in (Runtime.AUTO, Runtime.TORCH):
            raise self.fail(
                "model", "runtime", f"is {model.runtime.value!r}, which the Ray backend does not run",
                'use "auto" or "torch" with cluster.backend = "ray" (actors load the PyTorch weights they are sent)',
            )
        if backend is Backend.RAY and model.devices != ("auto",):
            raise self.fail(
                "model", "devices", "lists devices, but with cluster.backend = \"ray\" the cluster's GPUs are used",
                'leave model.devices = "auto" (one actor per GPU of the cluster; see cluster.cpu_actors)',
            )
        return cluster

    def tiling(self) -> TilingConfig:
        size = 0 if self.get("tiling", "size") == "auto" else self.integer("tiling", "size", low=32)
        overlap = self.number("tiling", "overlap", low=0.0, high=0.9)
        return TilingConfig(
            mode=TilingMode(self.choice("tiling", "mode", [e.value for e in TilingMode])),
            auto_above=self.number("tiling", "auto_above", low=1.0),
            size=size,
            overlap=overlap,
            full_image=self.boolean("tiling", "full_image"),
            merge=MergeRule(self.choice("tiling", "merge", [e.value for e in MergeRule])),
            match=MatchMetric(self.choice("tiling", "match", [e.value for e in MatchMetric])),
            match_threshold=self.number("tiling", "match_threshold", low=0.0, high=1.0),
            class_agnostic=self.boolean("tiling", "class_agnostic"),
        )

    def reject_unknown(self) -> None:
        for section, table in self.raw.items():
            for key in table:
                if (section, key) not in self.seen:
                    known = ", ".join(sorted(DEFAULTS[section]))
                    raise ConfigError(f"{section}.{key}", "unknown key", f"remove it or use one of: {known}")


def differences(old: Config, new: Config) -> set[str]:
    """Dotted keys whose values differ between two configs."""
    changed = set()
    for section in DEFAULTS:
        a, b = getattr(old, section), getattr(new, section)
        changed |= {f"{section}.{f.name}" for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)}
    return changed
