"""What a checkpoint is, read in the main process without torch: its task, training imgsz and
model class, so that `model.imgsz = "auto"` is known before the device processes start (the
main process letterboxes, and sizes the shared slots) and unsupported models are refused at once.

A `.pt` is a zip whose `data.pkl` is a pickle; it is read with an unpickler that builds inert
stand-ins for every class and skips the tensors, so nothing of the file is executed and torch
(~500 MiB resident) stays out of the main process. The device process loads the model for real
and checks the same things again (`tasks.head_of`).
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from daemon.config import Config, ConfigError, Decode, TilingMode
from daemon.tasks import TASKS, Task, Unsupported, model_refusal, task_of

DEFAULT_IMGSZ = 640  # Ultralytics' default, what predict uses when a checkpoint names none
HEADS = {spec.head: task.value for task, spec in TASKS.items()}  # a head's class name -> its task


@dataclass(frozen=True, slots=True)
class Checkpoint:
    task: Task | None  # None: not known before the model loads (another format)
    imgsz: int
    model_class: str


class _Stub:
    """An inert stand-in for any pickled class: it keeps its state and nothing else."""

    qualname = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Reader(pickle.Unpickler):
    SAFE: ClassVar[set[tuple[str, str]]] = {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        return type(name, (_Stub,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> None:
        return None  # a tensor's storage: not read


def _read_pt(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        with z.open(name) as f:
            ckpt = _Reader(f).load()
    if not isinstance(ckpt, dict):
        raise ValueError("not an Ultralytics checkpoint (no dict at its top)")
    return ckpt


def _state(obj: Any) -> dict[str, Any]:
    state = getattr(obj, "state", None)
    return state if isinstance(state, dict) else {}


def _imgsz(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        value = max(value)
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_IMGSZ


def read(weights: str) -> Checkpoint:
    """The checkpoint's task, training imgsz (what `predict` uses) and model class.

    Raises Unsupported for a model definition without weights and for models inferd refuses.
    """
    path = Path(weights)
    if path.suffix.lower() in (".yaml", ".yml"):
        raise Unsupported("a .yaml is a model definition with no trained weights: train it, or give a .pt")
    if path.suffix.lower() != ".pt" or not path.is_file():
        return Checkpoint(None, DEFAULT_IMGSZ, "")  # another format, or a name Ultralytics resolves
    try:
        ckpt = _read_pt(path)
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile, pickle.UnpicklingError, EOFError):
        return Checkpoint(None, DEFAULT_IMGSZ, "")  # the device process's load says what is wrong
    model = ckpt.get("ema") or ckpt.get("model")
    model_class = type(model).__name__ if isinstance(model, _Stub) else ""
    if model_class.startswith("SAM") or "sam" in getattr(model, "qualname", "").split("."):
        raise Unsupported("SAM is a promptable segmenter, not a YOLO model")
    why = model_refusal(model_class)
    if why is not None:
        raise Unsupported(why)
    state = _state(model)
    train_args = ckpt.get("train_args")
    args: dict[str, Any] = train_args if isinstance(train_args, dict) else {}
    imgsz = _imgsz(args.get("imgsz", DEFAULT_IMGSZ))
    task = state.get("task") if isinstance(state.get("task"), str) else None
    yaml = state.get("yaml")
    if task is None and isinstance(yaml, dict) and yaml.get("head"):
        task = HEADS.get(str(yaml["head"][-1][2]).split(".")[-1])
    task = task or args.get("task")
    return Checkpoint(task_of(task) if isinstance(task, str) else None, imgsz, model_class)


def resolve(config: Config, weights: str) -> tuple[Config, Checkpoint]:
    """`config` with `model.imgsz = "auto"` (0) made the checkpoint's training size, and
    classification's decode settled (on the host: its crop is not implemented on the device).
    `weights` is the file the config's `model.weights` names. ConfigError for what is refused."""
    try:
        ckpt = read(weights)
    except Unsupported as exc:
        problem = f"{config.model.weights} is refused: {exc}"
        raise ConfigError("model.weights", problem, "give a YOLO .pt of a supported task") from None
    model = config.model
    if not model.imgsz:
        model = dataclasses.replace(model, imgsz=ckpt.imgsz)
    pipeline = config.pipeline
    if ckpt.task is Task.CLASSIFY:
        if pipeline.decode is Decode.DEVICE:
            raise ConfigError(
                "pipeline.decode",
                "is 'device', but classification resizes and crops its input on the host",
                'set it to "host" or "auto" for a classification model',
            )
        pipeline = dataclasses.replace(pipeline, decode=Decode.HOST)
        if config.tiling.mode is not TilingMode.OFF:
            raise ConfigError(
                "tiling.mode",
                f"is {config.tiling.mode.value!r}, but a classification model gives one label per image, "
                "which tiles cannot be merged into",
                'set tiling.mode = "off" for a classification model',
            )
    return dataclasses.replace(config, model=model, pipeline=pipeline), ckpt


def resolve_config(config: Config) -> Config:
    """`resolve` for the weights `config` names (the embedded default found first)."""
    from daemon.errors import ModelError
    from daemon.weights import resolve_weights

    try:
        weights = resolve_weights(config.model.weights)
    except ModelError as exc:
        raise ConfigError("model.weights", str(exc), "install it, or name another model") from None
    return resolve(config, weights)[0]
