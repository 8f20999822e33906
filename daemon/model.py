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

import msgspec
import structlog
from PIL import Image

from daemon import logs, runtimes, tasks
from daemon.config import Precision, Runtime
from daemon.errors import ModelError as ModelError  # re-exported: its old home
from daemon.jobs import orient
from daemon.messages import (
    Batch,
    BatchDone,
    BatchRaised,
    DeviceInfo,
    DeviceSpec,
    LoadFailed,
    Ready,
    SetLevel,
    Stop,
    refuse,
)
from daemon.weights import resolve_weights as resolve_weights  # re-exported: its old home

log = structlog.get_logger("daemon.model")


@dataclass(slots=True)
class Launched:
    """A batch whose forward pass is queued on the device; NMS and results come in `finish`."""

    batch: Batch
    preds: Any
    errors: dict[int, str]  # index -> why its JPEG could not be decoded
    started: float


class Runner:
    """The loaded model on one device."""

    def __init__(self, spec: DeviceSpec, buffer: mmap.mmap | None) -> None:
        """`buffer`: the shared slots of a local device process; None for a Ray actor, which is
        handed each batch's bytes (`launch(batch, data)`)."""
        import torch

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.torch = torch
        self.spec = spec
        self.device = torch.device(spec.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        self.weights = resolve_weights(spec.weights)
        self.backend, self.plan = self._load(spec)
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
        self.copies = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]
        # On a CPU a launch is the whole computation: there is nothing to overlap.
        self.pipelined = cuda if spec.pipelined is None else spec.pipelined
        self.pinned = cuda and buffer is not None and self._pin(buffer)
        self._warm_up()

    def _load(self, spec: DeviceSpec) -> tuple[Any, runtimes.Plan]:
        """The runtime's backend for the weights, and the plan it runs (its artefact)."""
        from ultralytics.nn.autobackend import AutoBackend

        runtime, precision = runtimes.choose(
            Runtime(spec.runtime), Precision(spec.precision), device=spec.device, weights=self.weights
        )
        if runtime is not Runtime.TORCH and not spec.cache_dir and runtimes.exported_as(self.weights) is None:
            raise ModelError(f"runtime {runtime.value} needs a cache directory to export {self.weights} into")
        # The daemon exported it before starting this process (export.prepare): this finds it cached.
        plan = runtimes.ensure(
            self.weights,
            imgsz=spec.imgsz,
            max_batch=spec.max_batch,
            runtime=runtime,
            precision=precision,
            device=spec.device,
            cache_dir=Path(spec.cache_dir),
            calibration=tuple(Path(p) for p in spec.calibration),
        )
        fp16 = precision is Precision.FP16
        backend = AutoBackend(model=plan.artefact, device=self.device, fp16=fp16, fuse=True, verbose=False)
        backend.eval()
        if (post_load := runtimes.SPECS[runtime].post_load) is not None:
            post_load(backend, plan.artefact, precision, spec.torch_threads)
        return backend, plan

    def _pin(self, buffer: mmap.mmap) -> bool:
        """Page-lock the shared slots so host->device copies are DMA; False if CUDA refused."""
        view = self.torch.frombuffer(buffer, dtype=self.torch.uint8)
        registered = self.torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
            view.data_ptr(), view.numel(), 0
        )
        return bool(registered == 0)

    def _warm_up(self) -> None:
        """Run a batch through the real path: cuDNN's autotuning, then nvJPEG's handle."""
        imgsz, buffer = self.spec.imgsz, self.buffer
        warm = None if buffer is not None else bytearray(imgsz * imgsz * 3)
        self.run(Batch(-1, 0, 1, imgsz, imgsz, [(1.0, 1.0, 0, 0, imgsz, imgsz)], 0.25, 0.7), warm)
        if self.spec.decode_jpegs:
            jpeg = io.BytesIO()
            Image.new("RGB", (64, 64), (90, 120, 150)).save(jpeg, "JPEG")
            if buffer is not None:
                buffer[: jpeg.tell()] = jpeg.getvalue()  # the parent writes no slot before READY
            warm = None if buffer is not None else bytearray(jpeg.getvalue())
            self.run(Batch(-1, 0, 1, 64, 64, [(1.0, 1.0, 0, 0, 64, 64)], 0.25, 0.7, [(jpeg.tell(), 1)]), warm)

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            device=self.spec.device,
            weights=self.weights,
            task=self.head.task.value,
            names=self.names,
            half=self.half,
            runtime=self.plan.runtime.value,
            precision=self.plan.precision.value,
            artefact=self.plan.artefact,
            max_batch=self.spec.max_batch,
            fixed_shape=self.fixed,
            format=str(getattr(self.backend, "format", "pt")),
            pinned=self.pinned,
            pipelined=self.pipelined,
            pid=os.getpid(),
        )

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
        return x, msgspec.structs.replace(batch, h=fh, w=fw, metas=metas)

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
        image = orient(image.expand(3, -1, -1), orientation, _TensorTurns)  # a grey JPEG is one channel
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


class _TensorTurns:
    """`jobs.orient`'s operations on a (c, h, w) tensor."""

    @staticmethod
    def transpose(image: Any) -> Any:
        return image.transpose(1, 2)

    @staticmethod
    def flip(image: Any, *, rows: bool, cols: bool) -> Any:
        return image.flip(*(d for d, on in ((1, rows), (2, cols)) if on))

    @staticmethod
    def rot90(image: Any, *, clockwise: bool) -> Any:
        import torch

        return torch.rot90(image, -1 if clockwise else 1, (1, 2))


def serve(spec: DeviceSpec, conn: Connection) -> None:
    """Entry point of a device process (spawn context); the messages are `daemon.messages`'."""
    # Ctrl-C reaches the whole process group; only the parent decides when a device process stops.
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
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}", not transient(exc)))
        return
    conn.send(Ready(runner.info()))
    _serve_batches(runner, conn)


def _serve_batches(runner: Runner, conn: Connection) -> None:
    """Answer batches until Stop or the pipe closes (the parent is gone)."""
    launched: Launched | None = None  # launched, not yet answered
    while True:
        if launched is not None and not (runner.pipelined and conn.poll()):
            _answer(conn, runner, launched.batch, functools.partial(runner.finish, launched))  # nothing to overlap
            launched = None
            continue
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        match message:
            case Batch():
                current = launched
                launched = _answer(conn, runner, message, functools.partial(runner.launch, message))
                if current is not None:  # the next batch is queued behind it: now wait for its results
                    _answer(conn, runner, current.batch, functools.partial(runner.finish, current))
            case SetLevel(level):
                logs.set_level(level)
            case Stop():  # what was launched is still answered
                if launched is not None:
                    _answer(conn, runner, launched.batch, functools.partial(runner.finish, launched))
                return
            case _:
                refuse(message, "device process")


def _answer(conn: Connection, runner: Runner, batch: Batch, step: Callable[[], Any]) -> Launched | None:
    """Run one step of a batch; a failure is answered at once, a finished batch with its results."""
    result = attempt(runner, batch, step)
    if isinstance(result, Launched):
        return result
    conn.send(result)
    if isinstance(result, BatchDone):
        log.debug(
            "batch_done", batch_id=batch.batch_id, images=batch.n, shape=[batch.h, batch.w], infer_ms=result.model_ms
        )
    return None


def attempt(runner: Runner, batch: Batch, step: Callable[[], Any]) -> Launched | BatchDone | BatchRaised:
    """Run `step` (launch, finish or run) on `batch`: a model error fails this batch, not the device."""
    torch = runner.torch
    try:
        result = step()
    except torch.OutOfMemoryError as exc:
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        return BatchRaised(batch.batch_id, "oom", str(exc))
    except Exception as exc:  # noqa: BLE001 - a model error fails this batch, not the device
        return BatchRaised(batch.batch_id, "error", f"{type(exc).__name__}: {exc}")
    if isinstance(result, Launched):
        return result
    answers, model_ms = result
    return BatchDone(batch.batch_id, answers, model_ms)


def transient(exc: BaseException) -> bool:
    """A load failure that a later start may not meet (memory was short); anything else (no such
    file, not a model, a model this build cannot run) fails every start alike."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)
