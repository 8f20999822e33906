"""Runs inside a device process: load the model once, then serve batches from shared memory.

The parent writes letterboxed uint8 images (or whole JPEGs, with `pipeline.decode = "device"`)
into a slot of a memory-mapped buffer and sends a small `Batch` message; this process decodes
the JPEGs if any (nvJPEG on a GPU), runs the forward pass and Ultralytics' NMS, maps boxes back
to original pixels and answers with the detections. It exits when the parent sends None or the
pipe closes (the parent died), so it can never outlive the daemon.

On a GPU two batches overlap: the next one is copied (on a second stream) and launched before
the current one's NMS waits for its results, so the device never idles between batches.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import mmap
import os
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog
from PIL import Image

from daemon import logs, runtimes, tasks
from daemon.config import LogConfig, Precision, Runtime
from daemon.errors import ModelError as ModelError  # re-exported: its old home
from daemon.weights import resolve_weights as resolve_weights  # re-exported: its old home

log = structlog.get_logger("daemon.model")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a device process needs; pickled to the spawned child."""

    device: str
    weights: str
    imgsz: int
    precision: str  # config.Precision's value; "auto" is made concrete by runtimes.choose
    max_det: int
    torch_threads: int
    buffer_path: str
    slot_bytes: int
    slots: int
    log: LogConfig
    decode_jpegs: bool = False  # the parent sends JPEG bytes (warm the decoder up at start)
    pipelined: bool | None = None  # overlap two batches; None = on CUDA only (a test forces it on a CPU)
    runtime: str = "torch"  # config.Runtime's value
    cache_dir: str = ""  # exported artefacts (work/models); needed unless the runtime is torch
    max_batch: int = 8  # the largest batch the exported artefact must take


@dataclass(frozen=True, slots=True)
class Batch:
    """Parent -> child: `n` images of `h`x`w` in slot `slot`; per image (gain_x, gain_y, pad_x, pad_y, w, h)."""

    batch_id: int
    slot: int
    n: int
    h: int
    w: int
    metas: list[tuple[float, float, int, int, int, int]]
    conf: float
    iou: float
    jpegs: list[tuple[int, int]] | None = None  # the slot holds JPEGs back to back: (bytes, EXIF orientation)


@dataclass(frozen=True, slots=True)
class SetLevel:
    """Parent -> child: log at this level from now on (a config reload)."""

    level: str


@dataclass(slots=True)
class Launched:
    """A batch whose forward pass is queued on the device; NMS and results come in `finish`."""

    batch: Batch
    preds: Any
    errors: dict[int, str]  # index -> why its JPEG could not be decoded
    started: float


class Runner:
    """The loaded model on one device."""

    def __init__(self, spec: WorkerSpec, buffer: mmap.mmap | None) -> None:
        """`buffer`: the shared slots of a local device process; None for a Ray actor, which is
        handed each batch's bytes (`launch(batch, data)`)."""
        import torch
        from ultralytics.nn.autobackend import AutoBackend

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.torch = torch
        self.spec = spec
        self.device = torch.device(spec.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        self.weights = resolve_weights(spec.weights)
        runtime, precision = runtimes.choose(
            Runtime(spec.runtime), Precision(spec.precision), device=spec.device, weights=self.weights
        )
        if runtime is not Runtime.TORCH and not spec.cache_dir and runtimes.exported_as(self.weights) is None:
            raise ModelError(f"runtime {runtime.value} needs a cache directory to export {self.weights} into")
        # The daemon exported it before starting this process (export.prepare): this finds it cached.
        self.plan = runtimes.ensure(
            self.weights,
            imgsz=spec.imgsz,
            max_batch=spec.max_batch,
            runtime=runtime,
            precision=precision,
            device=spec.device,
            cache_dir=Path(spec.cache_dir),
        )
        fp16 = precision is Precision.FP16 and runtime is not Runtime.OPENVINO
        self.backend = AutoBackend(model=self.plan.artefact, device=self.device, fp16=fp16, fuse=True, verbose=False)
        self.backend.eval()
        if runtime is Runtime.OPENVINO:
            runtimes.compile_openvino(self.backend, self.plan.artefact, precision, spec.torch_threads)
        try:
            self.head = tasks.head_of(self.backend, spec.max_det)  # the task, from the checkpoint
        except tasks.Unsupported as exc:
            raise ModelError(f"{self.weights} is refused: {exc}") from None
        self.half = bool(self.backend.fp16)
        # A static export given as the weights takes one (h, w): smaller letterboxed inputs are
        # padded to it in launch (_fit).
        meta = getattr(self.backend, "metadata", None) or {}
        static = self.plan.runtime is not Runtime.TORCH and meta.get("dynamic") is False and meta.get("imgsz")
        self.fixed: tuple[int, int] | None = (int(meta["imgsz"][0]), int(meta["imgsz"][1])) if static else None
        self.names = {int(k): str(v) for k, v in self.backend.names.items()}
        self.buffer = buffer
        self.pinned = False
        self.copies = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]
        # On a CPU a launch is the whole computation: there is nothing to overlap.
        self.pipelined = cuda if spec.pipelined is None else spec.pipelined
        if cuda and buffer is not None:  # page-lock the shared slots so host->device copies are DMA
            view = torch.frombuffer(buffer, dtype=torch.uint8)
            self.pinned = (
                torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
                    view.data_ptr(), view.numel(), 0
                )
                == 0
            )
        imgsz = spec.imgsz  # warm-up, through the real path: cuDNN's autotuning, then nvJPEG's handle
        warm = None if buffer is not None else bytearray(imgsz * imgsz * 3)
        self.run(Batch(-1, 0, 1, imgsz, imgsz, [(1.0, 1.0, 0, 0, imgsz, imgsz)], 0.25, 0.7), warm)
        if spec.decode_jpegs:
            jpeg = io.BytesIO()
            Image.new("RGB", (64, 64), (90, 120, 150)).save(jpeg, "JPEG")
            if buffer is not None:
                buffer[: jpeg.tell()] = jpeg.getvalue()  # the parent writes no slot before READY
            warm = None if buffer is not None else bytearray(jpeg.getvalue())
            self.run(Batch(-1, 0, 1, 64, 64, [(1.0, 1.0, 0, 0, 64, 64)], 0.25, 0.7, [(jpeg.tell(), 1)]), warm)

    def info(self) -> dict[str, Any]:
        return {
            "device": self.spec.device,
            "weights": self.weights,
            "task": self.head.task.value,
            "names": self.names,
            "half": self.half,
            "runtime": self.plan.runtime.value,
            "precision": self.plan.precision.value,
            "artefact": self.plan.artefact,
            "max_batch": self.spec.max_batch,  # the largest batch the runtime takes (dynamic shapes up to imgsz)
            "fixed_shape": self.fixed,  # a static export's (h, w), or None
            "format": str(getattr(self.backend, "format", "pt")),
            "pinned": self.pinned,
            "pipelined": self.pipelined,
        }

    def _scale(self, x: Any) -> Any:
        dtype = self.torch.half if self.half else self.torch.float
        return x.to(dtype, memory_format=self.torch.contiguous_format).div_(255)

    def _fit(self, x: Any, batch: Batch) -> tuple[Any, Batch]:
        """A static export's input: `x` (0..1) letterboxed further to its shape, centred as
        Ultralytics letterboxes for such a model, and the batch with its pads moved to match."""
        if self.fixed is None or tuple(x.shape[2:]) == self.fixed:
            return x, batch
        (h, w), (fh, fw) = x.shape[2:], self.fixed
        left, top = (fw - w) // 2, (fh - h) // 2
        x = self.torch.nn.functional.pad(x, (left, fw - w - left, top, fh - h - top), value=114 / 255)
        metas = [(gx, gy, px + left, py + top, ow, oh) for gx, gy, px, py, ow, oh in batch.metas]
        return x, dataclasses.replace(batch, h=fh, w=fw, metas=metas)

    def _host(self, batch: Batch, count: int, data: Any) -> Any:
        """The batch's bytes as a uint8 tensor: from its slot, or from `data` (a Ray actor's)."""
        if data is None:
            offset = batch.slot * self.spec.slot_bytes
            return self.torch.frombuffer(self.buffer, dtype=self.torch.uint8, count=count, offset=offset)
        return self.torch.frombuffer(data, dtype=self.torch.uint8, count=count)

    def _pixels(self, batch: Batch, data: Any) -> Any:
        torch = self.torch
        count = batch.n * batch.h * batch.w * 3
        host = self._host(batch, count, data)
        host = host.view(batch.n, batch.h, batch.w, 3)
        if self.copies is None:
            return self._scale(host.permute(0, 3, 1, 2))
        with torch.cuda.stream(self.copies):
            x = host.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copies)
        x.record_stream(compute)  # allocated on the copy stream, used on this one
        return self._scale(x.permute(0, 3, 1, 2))

    def _jpegs(self, batch: Batch, data: Any) -> tuple[Any, dict[int, str]]:
        assert batch.jpegs is not None
        sizes = [size for size, _ in batch.jpegs]
        data = self._host(batch, sum(sizes), data)
        metas = [(*m, orientation) for m, (_, orientation) in zip(batch.metas, batch.jpegs, strict=True)]
        return decode_batch(list(data.split(sizes)), metas, batch.h, batch.w, self.device, half=self.half)

    def launch(self, batch: Batch, data: Any = None) -> Launched:
        """Queue the batch's inputs and forward pass on the device; the inputs are in the batch's
        slot, or in `data` (a writable buffer: what a Ray actor was handed)."""
        started = time.perf_counter()
        with self.torch.inference_mode():
            errors: dict[int, str] = {}
            if batch.jpegs is None:
                x = self._pixels(batch, data)
            else:
                x, errors = self._jpegs(batch, data)
            x, batch = self._fit(x, batch)
            return Launched(batch, self.backend(x), errors, started)

    def finish(self, launched: Launched) -> tuple[list[tasks.Payload | str], float]:
        """Per image, the task's result in source pixels (`daemon.tasks`), or why its JPEG could
        not be decoded; and the model time in ms."""
        batch = launched.batch
        with self.torch.inference_mode():
            results = tasks.postprocess(
                self.head, launched.preds, batch.conf, batch.iou, (batch.h, batch.w), batch.metas
            )
        out: list[tasks.Payload | str] = [launched.errors.get(i, r) for i, r in enumerate(results)]
        return out, (time.perf_counter() - launched.started) * 1000

    def run(self, batch: Batch, data: Any = None) -> tuple[list[tasks.Payload | str], float]:
        return self.finish(self.launch(batch, data))


def decode_batch(
    jpegs: list[Any],
    metas: list[tuple[float, float, int, int, int, int, int]],
    h: int,
    w: int,
    device: Any,
    *,
    half: bool,
) -> tuple[Any, dict[int, str]]:
    """Decode JPEGs (1-D uint8 CPU tensors) on `device`, orient and letterbox each to (h, w) as
    `preprocess.geometry` laid out; `metas` per image: (gain_x, gain_y, pad_x, pad_y, width,
    height as seen, EXIF orientation). Returns the (n, 3, h, w) model input scaled to 0..1 and,
    by index, why an image could not be decoded (its input is left as padding)."""
    import torch
    import torch.nn.functional as F

    images, errors = _decode_jpegs(jpegs, device)
    x = torch.full((len(jpegs), 3, h, w), 114.0, dtype=torch.float32, device=device)
    for i, (image, (gx, gy, px, py, ow, oh, orientation)) in enumerate(zip(images, metas, strict=True)):
        if image is None:
            continue
        image = _orient(image.expand(3, -1, -1), orientation)  # a grey JPEG is one channel
        size = (max(round(oh * gy), 1), max(round(ow * gx), 1))
        if tuple(image.shape[1:]) != size:
            # Plain bilinear, as Ultralytics' own resize; antialiased where the host path would
            # decode at reduced size (DCT scaling averages pixels, it does not drop them).
            antialias = size[0] < image.shape[1] / 2
            image = F.interpolate(image[None].float(), size, mode="bilinear", antialias=antialias, align_corners=False)
            image = image[0]
        x[i, :, py : py + size[0], px : px + size[1]] = image
    x = x.round_().div_(255)  # rounded to uint8 levels, as the host path's pixels are
    return (x.half() if half else x), errors


def _decode_jpegs(jpegs: list[Any], device: Any) -> tuple[list[Any], dict[int, str]]:
    """The batch in one call (nvJPEG batches it); if that fails, image by image, so that only
    the broken ones fail."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of torchcodec, which would
        # bring FFmpeg with it; these still decode with the same nvJPEG.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.UNCHANGED, device=device)), {}
        except RuntimeError:
            pass
        images: list[Any] = []
        errors: dict[int, str] = {}
        for i, data in enumerate(jpegs):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.UNCHANGED, device=device))
            except RuntimeError as exc:
                images.append(None)
                errors[i] = "cannot decode: " + str(exc).splitlines()[0].rsplit(", ", 1)[-1]  # past the C++ location
        return images, errors


def _orient(image: Any, orientation: int) -> Any:
    """Apply an EXIF orientation to a (c, h, w) tensor, as PIL's `ImageOps.exif_transpose` does."""
    import torch

    if orientation in (5, 7):  # transpose; transverse is a transpose turned half round
        image = image.transpose(1, 2)
    if orientation in (3, 7):
        return image.flip(1, 2)
    if orientation in (2, 4):  # mirror, left-right or top-bottom
        return image.flip(2 if orientation == 2 else 1)
    if orientation in (6, 8):  # a quarter turn, clockwise or counter-clockwise
        return torch.rot90(image, -1 if orientation == 6 else 1, (1, 2))
    return image


def serve(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a device process (spawn context)."""
    # Ctrl-C reaches the whole process group; only the parent decides when a worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Before torch loads OpenMP: idle intra-op threads sleep instead of spinning, so the cores
    # they would burn go to the decode threads (measured on 2 cores: 4.0 vs 0.9 img/s under load).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logs.configure(spec.log, process=f"worker:{spec.device}")
    with open(spec.buffer_path, "r+b") as f:
        buffer = mmap.mmap(f.fileno(), spec.slot_bytes * spec.slots)
    try:
        runner = Runner(spec, buffer)
    except Exception as exc:  # noqa: BLE001 - any load failure is the ERROR half of the handshake
        conn.send(("error", f"{type(exc).__name__}: {exc}", not _transient(exc)))
        return
    conn.send(("ready", runner.info(), os.getpid()))
    launched: Launched | None = None  # launched, not yet answered
    while True:
        if launched is not None and not (runner.pipelined and conn.poll()):
            _answer(conn, runner, launched.batch, functools.partial(runner.finish, launched))  # nothing to overlap
            launched = None
            continue
        try:
            batch = conn.recv()
        except EOFError:  # the parent is gone
            return
        if batch is None:  # asked to stop: what was launched is still answered
            if launched is not None:
                _answer(conn, runner, launched.batch, functools.partial(runner.finish, launched))
            return
        if isinstance(batch, SetLevel):
            logs.set_level(batch.level)
            continue
        current = launched
        launched = _answer(conn, runner, batch, functools.partial(runner.launch, batch))
        if current is not None:  # the next batch is queued behind it: now wait for its results
            _answer(conn, runner, current.batch, functools.partial(runner.finish, current))


def _answer(conn: Connection, runner: Runner, batch: Batch, step: Callable[[], Any]) -> Launched | None:
    """Run one step of a batch; a failure is answered at once, a finished batch with its boxes."""
    torch = runner.torch
    try:
        result = step()
    except torch.OutOfMemoryError as exc:
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        conn.send(("failed", batch.batch_id, "oom", str(exc)))
    except Exception as exc:  # noqa: BLE001 - a model error fails this batch, not the worker
        conn.send(("failed", batch.batch_id, "error", f"{type(exc).__name__}: {exc}"))
    else:
        if isinstance(result, Launched):
            return result
        conn.send(("done", batch.batch_id, *result))
        log.debug("batch_done", batch_id=batch.batch_id, images=batch.n, shape=[batch.h, batch.w], infer_ms=result[1])
    return None


def _transient(exc: BaseException) -> bool:
    """A load failure that a later start may not meet (memory was short); anything else (no such
    file, not a model, a model this build cannot run) fails every start alike."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)
