"""Every Ultralytics task: what the device process does after the forward pass, and how the
results stage writes what comes out of it.

Each task has a module (`detect`, `segment`, `pose`, `obb`, `classify`), named by its line in
`TASKS`, with three parts:
- `postprocess(head, preds, conf, iou, shape, metas)`, run in the device process: the same
  steps as that task's Ultralytics predictor (NMS with the class count, rotated for obb; masks
  from the prototypes, on the device, then their polygons; keypoints; the top 5), mapped to
  source pixels. It returns one small payload per image, which is all that crosses the pipe.
- the payload's `txt` (exactly what `Results.save_txt(save_conf=True)` writes), `json` (source
  pixels), `draw` (the annotated image), `counts` (for the `image_done` log line) and `rows`
  (its `detections` rows of the database: the sinks write them without knowing the task).
- `merge(parts, rule)`: one image's payload from its tiles' (daemon.tiling), on the main process.

Nothing here imports torch at module level: the main process imports the payload types.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

from PIL import ImageDraw

from daemon.config import TilingConfig
from daemon.errors import Unsupported as Unsupported  # re-exported: its old home

SCHEMA_VERSION = 2  # of the .json result: 2 added `task` and the per-task fields
Meta = tuple[float, float, int, int, int, int]  # gain_x, gain_y, pad_x, pad_y, width, height (as seen)


class Task(enum.Enum):
    """Ultralytics' `task` of a checkpoint."""

    DETECT = "detect"
    SEGMENT = "segment"
    POSE = "pose"
    OBB = "obb"
    CLASSIFY = "classify"


# Model classes (as pickled in a checkpoint, or loaded) that need what inferd does not do.
REFUSED_CLASSES = {
    "WorldModel": "YOLO-World is an open-vocabulary model that needs text prompts",
    "YOLOEModel": "YOLOE is an open-vocabulary model that needs text or visual prompts",
    "YOLOESegModel": "YOLOE is an open-vocabulary model that needs text or visual prompts",
    "RTDETRDetectionModel": "RT-DETR has its own post-processing, which inferd does not implement",
    "SAMModel": "SAM is a promptable segmenter, not a YOLO model",
    "SAM2Model": "SAM is a promptable segmenter, not a YOLO model",
}


def model_refusal(class_name: str) -> str | None:
    """Why a model of this class is refused, or None."""
    return REFUSED_CLASSES.get(class_name)


def task_of(name: str | None) -> Task:
    """The Task for Ultralytics' task name; Unsupported for any other (semantic, depth, ...)."""
    try:
        return Task(name)
    except ValueError:
        supported = ", ".join(t.value for t in Task)
        raise Unsupported(f"task {name!r} is not supported (inferd runs {supported})") from None


@dataclass(frozen=True, slots=True)
class Head:
    """What post-processing needs to know about the loaded model (device process)."""

    task: Task
    nc: int  # number of classes
    kpt_shape: tuple[int, int] | None  # pose: (keypoints, 2 or 3)
    end2end: bool  # NMS-free head (YOLOv10, YOLO26): no NMS, only the confidence filter
    max_det: int


class Payload(Protocol):
    """One image's result, in source pixels (the orientation the user sees)."""

    task: ClassVar[Task]

    def __len__(self) -> int: ...

    def txt(self, width: int, height: int, names: dict[int, str]) -> str:
        """The lines `Results.save_txt(save_conf=True)` writes for this image."""
        ...

    def json(self, names: dict[int, str]) -> dict[str, Any]:
        """The task's fields of the .json result."""
        ...

    def draw(self, draw: ImageDraw.ImageDraw, names: dict[int, str], line: int) -> None:
        """Draw this result on the source image."""
        ...

    def counts(self, names: dict[int, str]) -> dict[str, Any]:
        """What the image_done log line reports for it."""
        ...

    def shifted(self, dx: float, dy: float) -> Payload:
        """This result moved by (dx, dy) pixels: a tile's into its whole image's (daemon.tiling)."""
        ...

    def rows(self, width: int, height: int, names: dict[int, str]) -> tuple[Row, ...]:
        """Its rows of the database's `detections` table (daemon/sinks/schema.py)."""
        ...


@dataclass(frozen=True, slots=True)
class Row:
    """One thing found, as a row of the database's `detections` table: the box columns are its
    axis-aligned box in source pixels (as the user sees the image, EXIF orientation applied);
    the task's other geometry (polygon, keypoints, rotated box, rank) goes into `payload`."""

    class_id: int
    class_name: str
    confidence: float
    x1: float
    y1: float
    x2: float
    y2: float
    payload: dict[str, Any] | None = None  # JSON-able; None when there is nothing beyond the box


ROW_FIELDS = ("class_id", "class_name", "confidence", "box_xyxy")  # a .json detection's fields that are columns


def json_rows(
    found: list[dict[str, Any]], box: Callable[[dict[str, Any]], Sequence[float]] = lambda d: d["box_xyxy"]
) -> tuple[Row, ...]:
    """Rows of the .json's detections, so rounded alike (confidence 1e-6, boxes 0.01 px): the
    box columns are `box(detection)`, every field but `ROW_FIELDS` goes into `payload`."""
    out = []
    for d in found:
        extra = {k: v for k, v in d.items() if k not in ROW_FIELDS}
        x1, y1, x2, y2 = box(d)
        out.append(Row(d["class_id"], d["class_name"], d["confidence"], x1, y1, x2, y2, extra or None))
    return tuple(out)


Postprocess = Callable[[Head, Any, float, float, tuple[int, int], list[Meta]], list[Payload]]
Merge = Callable[[list[Payload], TilingConfig], Payload]


class TaskModule(Protocol):
    """What a task's module (`daemon/tasks/<task>.py`) gives beside its payload class."""

    postprocess: Postprocess  # the device process's steps after the forward pass
    merge: Merge  # one image's payload from its tiles' (a task never tiled raises Unsupported)


@dataclass(frozen=True, slots=True)
class Spec:
    """A task's line in `TASKS`."""

    module: str  # its module, imported when first used (it imports this one)
    head: str  # the class name of its head in a model's yaml: the task of a checkpoint that does not say it


# The task table: a new task is its module and its line here (and its member of `Task`).
TASKS: dict[Task, Spec] = {
    Task.DETECT: Spec("daemon.tasks.detect", "Detect"),
    Task.SEGMENT: Spec("daemon.tasks.segment", "Segment"),
    Task.POSE: Spec("daemon.tasks.pose", "Pose"),
    Task.OBB: Spec("daemon.tasks.obb", "OBB"),
    Task.CLASSIFY: Spec("daemon.tasks.classify", "Classify"),
}


def module(task: Task) -> TaskModule:
    """The module of `task` (`TASKS`)."""
    return cast(TaskModule, importlib.import_module(TASKS[task].module))


def postprocess(
    head: Head, preds: Any, conf: float, iou: float, shape: tuple[int, int], metas: list[Meta]
) -> list[Payload]:
    """The task's post-processing of one batch's raw outputs (device process); `shape` is the
    model input's (h, w)."""
    return module(head.task).postprocess(head, preds, conf, iou, shape, metas)


def head_of(backend: Any, max_det: int) -> Head:
    """The task and head shape of a loaded AutoBackend; Unsupported if inferd must not run it."""
    model = getattr(backend, "model", None)
    why = model_refusal(type(model).__name__)
    if why is not None:
        raise Unsupported(why)
    task = task_of(getattr(backend, "task", None) or getattr(model, "task", None) or "detect")
    kpt = getattr(backend, "kpt_shape", None)
    kpt_shape = (int(kpt[0]), int(kpt[1])) if task is Task.POSE and kpt is not None else None
    if task is Task.POSE and kpt_shape is None:
        raise Unsupported("a pose model without kpt_shape")
    end2end = bool(getattr(backend, "end2end", False))
    return Head(task, len(backend.names), kpt_shape, end2end, max_det)


def g(values: tuple[float | int, ...]) -> str:
    """One line as save_txt writes it: every value with %g (6 significant digits)."""
    return " ".join(f"{v:g}" for v in values)
