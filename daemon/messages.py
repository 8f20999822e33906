"""Every message that crosses a process boundary, as typed frozen msgspec Structs.

Three conversations, one vocabulary:

- **a device process** (`daemon.model.serve`) and its parent (`daemon.local.LocalDevice`), over
  a multiprocessing pipe (pickled: answers carry numpy arrays, kept as they are). The parent sends
  the `DeviceSpec` at spawn, then `Batch`, `SetLevel` and `Stop`; the child answers `Ready` or
  `LoadFailed` once, then `BatchDone` or `BatchRaised` per batch, in the order sent.
- **the Ray driver** (`daemon.cluster.driver`) and the daemon's `Bridge`, over a pipe: each request
  is a `Request(req, body)` (`StartActor`, `Infer`, `StopActor`, `AskResources`, `SetLevel`),
  answered by a `Reply(req, body)` whose body is what the actor answered (the same `Ready`,
  `LoadFailed`, `BatchDone`, `BatchRaised` as a local device process), `ActorLost`, the cluster's
  resources or None. Unasked: `Connected` or `Unreachable` once, `ActorLost` for an idle actor.
- **the exporter's child** (`python -m daemon.tuning`) and `daemon.export`, as JSON lines on its
  stdout (`encode_record` / `decode_record`): `ExportStarted`, `TuneStarted`, then `PlanMade`,
  `Tuned` or `ExportFailed`. The timing processes of the measured choice (`daemon.tuning.tune`)
  take `LoadCandidate` and `Go`, and answer `Loaded`, `LoadFailed` or `Timed`.

A receiver matches on the class; anything else is refused with `ProtocolError` (`refuse`).
"""

from __future__ import annotations

from typing import Any, NoReturn

import msgspec

from daemon.config import LogConfig
from daemon.errors import ProtocolError


class Message(msgspec.Struct, frozen=True, tag=True):
    """The base of the pickled messages (tagged by class name, should one be msgpack-encoded)."""


# --- the device process and its parent ----------------------------------------------------


class DeviceSpec(Message, frozen=True, kw_only=True):
    """Everything a device process (or Ray actor) needs to load its model; built once from the
    config (`daemon.devices.device_spec`), pickled to the spawned child or handed to the actor."""

    device: str  # the torch device it opens: "cpu", "cuda:1" ("cuda:0" in a Ray actor)
    weights: str
    imgsz: int
    precision: str  # config.Precision's value; "auto" is made concrete by runtimes.choose
    max_det: int
    torch_threads: int
    log: LogConfig
    name: str = ""  # how logs and metrics call it (cpu:1, ray:gpu:0), if not its torch device
    decode_jpegs: bool = False  # the parent sends JPEG bytes (warm the decoder up at start)
    pipelined: bool | None = None  # overlap two batches; None = on CUDA only (a test forces it on a CPU)
    runtime: str = "torch"  # config.Runtime's value
    cache_dir: str = ""  # exported artefacts (work/models); needed unless the runtime is torch
    max_batch: int = 8  # the largest batch the exported artefact must take
    calibration: tuple[str, ...] = ()  # INT8's calibration images (part of its cache key)
    calibration_files: tuple[tuple[str, bytes], ...] = ()  # a Ray actor's: (name, bytes), written on its node
    buffer_path: str = ""  # the shared batch slots of a local device process ("" for a Ray actor)
    slot_bytes: int = 0
    slots: int = 0


class DeviceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a device loaded, as its READY answer says."""

    device: str
    weights: str
    task: str  # tasks.Task's value
    names: dict[int, str]
    half: bool
    runtime: str
    precision: str
    artefact: str
    max_batch: int  # the largest batch the runtime takes (dynamic shapes up to imgsz)
    fixed_shape: tuple[int, int] | None  # a static export's (h, w), or None
    format: str
    pinned: bool  # the shared slots are page-locked (CUDA)
    pipelined: bool  # two batches overlap: a crash may have started the second
    pid: int | None = None
    node: str = ""  # a Ray actor's host name and address
    node_ip: str = ""
    tuned: dict[str, Any] | None = None  # a Ray node's measured choice (daemon.tuning.node), if it made one


class Batch(Message, frozen=True):
    """Parent -> device: `n` images of `h`x`w` in slot `slot` (or in the data handed with it);
    per image (gain_x, gain_y, pad_x, pad_y, w, h)."""

    batch_id: int
    slot: int
    n: int
    h: int
    w: int
    metas: list[tuple[float, float, int, int, int, int]]
    conf: float
    iou: float
    jpegs: list[tuple[int, int]] | None = None  # the slot holds JPEGs back to back: (bytes, EXIF orientation)


class SetLevel(Message, frozen=True):
    """Parent -> device (or driver): log at this level from now on (a config reload)."""

    level: str


class Stop(Message, frozen=True):
    """Parent -> device: answer what was launched, then exit."""


class Ready(Message, frozen=True):
    """Device -> parent: the model is loaded; takes batches from now on."""

    info: DeviceInfo


class LoadFailed(Message, frozen=True):
    """Device -> parent: the model cannot be loaded; `permanent` if no later start can (exit 78)."""

    message: str
    permanent: bool


class BatchDone(Message, frozen=True):
    """Device -> parent: per image its task payload (or why its JPEG did not decode), model ms."""

    batch_id: int
    answers: list[Any]  # tasks.Payload | str, pickled as they are (numpy arrays inside)
    model_ms: float


class BatchRaised(Message, frozen=True):
    """Device -> parent: the model raised on this batch; `kind` is "oom" or "error"."""

    batch_id: int
    kind: str
    message: str


DeviceAnswer = Ready | LoadFailed | BatchDone | BatchRaised


# --- the Ray driver and the daemon's bridge -----------------------------------------------


class StartActor(Message, frozen=True):
    key: str  # the actor's key at the driver (a reload runs two actors of one device name)
    spec: DeviceSpec
    weights_path: str  # read by the driver, its bytes put in the object store once
    options: dict[str, Any]  # ray.remote options: num_cpus, num_gpus, resources, ...


class Infer(Message, frozen=True):
    key: str
    batch: Batch
    data: Any  # the batch as one numpy array (pixels, or JPEGs back to back)


class StopActor(Message, frozen=True):
    key: str


class AskResources(Message, frozen=True):
    """-> the cluster's resources: {"GPU": n, "CPU": n, "nodes": n, "cpu_nodes": n}."""


class Request(Message, frozen=True):
    """Bridge -> driver: `body`, answered by a Reply of the same `req` (None: no answer)."""

    req: int | None
    body: StartActor | Infer | StopActor | AskResources | SetLevel


class ActorLost(Message, frozen=True):
    """Driver -> bridge: the actor `key` is gone (as a Reply's body: the one asked of)."""

    key: str
    message: str


class Reply(Message, frozen=True):
    req: int
    body: Any  # Ready | LoadFailed | BatchDone | BatchRaised | ActorLost | dict[str, float] | None


class Connected(Message, frozen=True):
    resources: dict[str, float]


class Unreachable(Message, frozen=True):
    message: str


# --- the exporter's child process: JSON lines on its stdout ---------------------------------


class Record(msgspec.Struct, frozen=True, tag_field="event"):
    """A JSON line of the exporter's child; its `event` field names the class."""


class ExportStarted(Record, frozen=True, tag="export_started"):
    runtime: str
    precision: str


class TuneStarted(Record, frozen=True, tag="tune_started"):
    pass


class PlanMade(Record, frozen=True, tag="plan"):
    """What a device type runs (runtimes.cache.Plan)."""

    runtime: str
    precision: str
    artefact: str
    built: bool = False
    export_s: float = 0.0


class Tuned(Record, frozen=True, tag="tuned"):
    """The measured choice (tuning.tune.Choice; its table rows as objects)."""

    runtime: str
    precision: str
    processes: int
    threads: int
    batch: int
    table: list[dict[str, Any]] = []
    tune_s: float = 0.0
    skipped: str = ""


class ExportFailed(Record, frozen=True, tag="error"):
    kind: str  # the exception's class name
    message: str


ExporterRecord = ExportStarted | TuneStarted | PlanMade | Tuned | ExportFailed
_records = msgspec.json.Decoder(ExporterRecord)


def encode_record(record: Record) -> bytes:
    """One JSON line (newline included)."""
    return msgspec.json.encode(record) + b"\n"


def decode_record(line: bytes | str) -> ExporterRecord:
    """A line of the exporter's stdout; msgspec.DecodeError if it is not one of its records
    (a library's stray print)."""
    return _records.decode(line)


# --- the timing processes of the measured choice (daemon.tuning.tune) -----------------------


class LoadCandidate(Message, frozen=True):
    request: dict[str, Any]  # the tune request with runtime, precision, threads and the image


class Loaded(Message, frozen=True):
    pass


class Go(Message, frozen=True):
    seconds: float
    batch: int  # images per batch, at most the loaded candidate's max_batch


class Timed(Message, frozen=True):
    images: int
    seconds: float


def refuse(message: object, where: str) -> NoReturn:
    """A message the receiver does not take: a bug, said clearly."""
    raise ProtocolError(f"{where}: unexpected message {type(message).__name__}: {message!r}"[:500])
