"""Stage 4: write results atomically, hand them to every sink, then move the source on.

For `sub/bus.jpg` the results are `output/sub/bus.jpg.txt` (what Ultralytics' `save_txt` writes
for the model's task), `output/sub/bus.jpg.json` and, if asked, `output/sub/bus.jpg.annotated.jpg`
(each task's formats are in `daemon.tasks`; the files of an image are declared once, in
`Writer._files`): the whole source name is kept, so `a.jpg` and `a.png` never overwrite each
other's results. Every file takes one path (`daemon.sinks.files.write_files`): a hidden temporary
file in the same directory, fsynced, renamed into place, the directory fsynced, so a reader never
sees half a file. Only then does the source leave processing/ (to done/, or deleted). A failed
input goes to `failed/sub/bus.jpg` beside `failed/sub/bus.jpg.error.json`, written the same way.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import io
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from PIL import Image, ImageDraw, ImageOps

from daemon import __version__, logs
from daemon.config import OnSuccess, OutputConfig, PathsConfig
from daemon.jobs import FailReason, Failure, Inferred, ItemError, ModelInfo, Outcome
from daemon.sinks import Sink
from daemon.sinks.files import File, move_sources, suffixed, write_files
from daemon.tasks import SCHEMA_VERSION, Payload

log = structlog.get_logger("daemon.results")
WRITE_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)


def annotate(source: Path, payload: Payload, names: dict[int, str]) -> bytes:
    """The source image, oriented as the user sees it, with the task's result drawn; JPEG bytes."""
    with Image.open(source) as im:
        image = ImageOps.exif_transpose(im).convert("RGB")
    payload.draw(ImageDraw.Draw(image), names, max(2, round(max(image.size) / 400)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Writer:
    """Writes outcomes for one configuration; `finished` is called once per input."""

    def __init__(
        self,
        paths: PathsConfig,
        output: OutputConfig,
        finished: Callable[[Outcome, bool], None],
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.paths = paths
        self.output = output
        self.finished = finished
        self.sinks = sinks  # each must hold an outcome durably before its source is released
        self.write_errors = 0  # failed write attempts, retried or not
        self._models: dict[int, tuple[ModelInfo, str]] = {}  # id -> (model, its encoded part of the .json)
        self.swept: set[Path] = set()  # result directories made durable and cleared of dead runs' temp files

    async def write(self, item: Outcome) -> None:
        """Write one outcome. A write that fails (disk full, read-only, permissions) leaves no
        partial file; it is retried with backoff, up to `output.write_attempts`, and then the input
        is failed with reason write_error. If even that cannot be written, the source stays in
        processing/ and is taken up again at the next start. Nothing is lost either way.

        While retries wait, this item keeps its slot, so a full disk also stops the intake.
        """
        job = item.job if isinstance(item, Failure) else item.prepared.job
        error: BaseException | None = None
        for attempt in itertools.count(1):
            try:
                await (self.failed(item) if isinstance(item, Failure) else self.done(item))
                return
            except OSError as exc:
                self.write_errors += 1
                error = exc
                last = attempt == self.output.write_attempts
                delay = WRITE_BACKOFF_S[min(attempt, len(WRITE_BACKOFF_S)) - 1]
                log.error(
                    "write_failed",
                    path=str(job.rel),
                    errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                    error=str(exc),
                    attempt=attempt,
                    retry_in_s=None if last else delay,
                )
                if last:
                    break
                await asyncio.sleep(delay)  # backoff: the disk must get room before a retry helps
            except Exception as exc:
                log.error("internal_error", stage="results", path=str(job.rel), exc_info=exc)
                error = exc
                if isinstance(item, Failure):  # not even its failure can be filed
                    log.error("left_in_processing", path=str(job.rel), error=str(exc))
                    self.finished(item, False)
                    return
                item = Failure(job, ItemError.internal(exc))  # written with the same retries
        message = f"results could not be written after {attempt} attempts: {error}"
        if not isinstance(item, Failure):
            try:
                await self.failed(Failure(job, ItemError(FailReason.WRITE, message)))
                return
            except OSError as exc:
                error = exc
        log.error("left_in_processing", path=str(job.rel), error=str(error), hint="taken up again at the next start")
        self.finished(item, False)

    async def write_batch(self, batch: list[Outcome]) -> None:
        """Write a batch's outcomes: the results of its images all at once (`_done_all`), a
        failure on its own. Every way out has called `finished` once per outcome."""
        inferred = [o for o in batch if isinstance(o, Inferred)]
        steps = [self.write(o) for o in batch if not isinstance(o, Inferred)]
        if inferred:
            steps.append(self._done_all(inferred))
        await asyncio.gather(*steps)

    async def _done_all(self, items: list[Inferred]) -> None:
        """The results of a batch's images, stored together (`_store`), then one log render for
        the batch's image_done records. An image that meets an error on the way takes the
        one-at-a-time path (`write`: retries with backoff, write_error)."""
        try:
            errors = await self._store(items)
        except Exception as exc:  # a bug: each image is tried again on its own, with its last resort
            log.error("internal_error", stage="results", images=len(items), exc_info=exc)
            errors = [exc] * len(items)
        finished = [r for r, e in zip(items, errors, strict=True) if e is None]
        try:
            logs.records(log, "image_done", [self._done_record(r) for r in finished])
        except Exception as exc:  # a bug in rendering a record: the results stand, the slots come back
            log.error("internal_error", stage="results", images=len(finished), exc_info=exc)
        for r in finished:
            self.finished(r, True)
        await asyncio.gather(*(self.write(r) for r, e in zip(items, errors, strict=True) if e is not None))

    async def done(self, result: Inferred) -> None:
        """One image's results alone (`write`'s path): stored as a batch of one; what stopped
        it is raised (an OSError is retried)."""
        (error,) = await self._store([result])
        if error is not None:
            raise error
        log.info("image_done", **self._done_record(result))
        self.finished(result, True)

    async def _store(self, items: list[Inferred]) -> list[BaseException | None]:
        """The one path of results to disk: the files of every image by one thread job (written,
        fsynced, renamed, each directory fsynced once), then every sink, then the sources moved
        by one more job. Per image None, or the error that stopped it."""
        started = time.monotonic()
        annotations = await self._annotations(items)
        files = [f for r, a in zip(items, annotations, strict=True) for f in self._files(r, a, started)]
        errors: dict[int, BaseException] = {}
        for f, error in zip(files, await write_files(files, self.output.fsync, self.swept), strict=True):
            if error is not None:
                errors.setdefault(id(f.owner), error)
        written = [r for r in items if id(r) not in errors]
        for r in written:
            r.prepared.job.timings_ms["write"] = (time.monotonic() - started) * 1000
        stored = await asyncio.gather(*(self._to_sinks(r) for r in written), return_exceptions=True)
        errors.update((id(r), e) for r, e in zip(written, stored, strict=True) if e is not None)
        kept = [r for r in written if id(r) not in errors]
        delete = self.output.on_success is OnSuccess.DELETE
        moved = await move_sources([r.prepared.job for r in kept], self.paths.done, delete)
        errors.update((id(r), e) for r, e in zip(kept, moved, strict=True) if e is not None)
        return [errors.get(id(r)) for r in items]

    async def _annotations(self, items: list[Inferred]) -> list[bytes | str | None]:
        """Per image its annotated JPEG (`output.formats` has "image"), or why it could not be drawn."""
        if "image" not in self.output.formats:
            return [None] * len(items)

        async def one(r: Inferred) -> bytes | str:
            try:
                return await asyncio.to_thread(annotate, r.prepared.job.path, r.payload, r.model.names)
            except Exception as exc:  # noqa: BLE001 - PIL cannot draw this source: its OSErrors are not the disk's
                error = f"{type(exc).__name__}: {exc}"
                log.warning("annotate_failed", path=str(r.prepared.job.rel), error=error)
                return error

        return await asyncio.gather(*(one(r) for r in items))

    def _files(self, result: Inferred, annotation: bytes | str | None, started: float) -> list[File]:
        """The files of one image's results (each output format, declared here only), in the
        order written: the .json last, rendered in the writing thread so that its timings include
        the other files' write."""
        p, job = result.prepared, result.prepared.job
        base = self.paths.output / job.rel
        files = []
        if "txt" in self.output.formats:
            text = result.payload.txt(p.width, p.height, result.model.names)
            files.append(File(suffixed(base, ".txt"), text.encode(), job.recovered, result))
        if isinstance(annotation, bytes):
            files.append(File(suffixed(base, ".annotated.jpg"), annotation, job.recovered, result))
        if "json" in self.output.formats:
            error = annotation if isinstance(annotation, str) else None

            def render() -> bytes:
                job.timings_ms["write"] = (time.monotonic() - started) * 1000
                return self._json(result, error)

            files.append(File(suffixed(base, ".json"), render, job.recovered, result))
        return files

    @staticmethod
    def _done_record(result: Inferred) -> dict[str, Any]:
        p, job = result.prepared, result.prepared.job
        return {
            "path": str(job.rel),
            "device": result.device,
            "batch": result.batch_size,
            "task": result.payload.task.value,
            **result.payload.counts(result.model.names),
            "width": p.width,
            "height": p.height,
            **({"tiles": result.tiles} if result.tiles else {}),
            **{f"{k}_ms": round(v, 2) for k, v in job.timings_ms.items()},
            "total_ms": round((time.monotonic() - job.claimed_at) * 1000, 2),
        }

    def _json(self, result: Inferred, annotation_error: str | None) -> bytes:
        p, job, model = result.prepared, result.prepared.job, result.model
        head = {
            "schema_version": SCHEMA_VERSION,
            "task": result.payload.task.value,
            "source": str(job.rel),
            "image": {
                "width": p.width,
                "height": p.height,
                "exif_orientation": p.orientation,
                "orientation_applied": p.orientation != 1,
            },
        }
        tail: dict[str, Any] = {
            **result.payload.json(model.names),
            "device": result.device,
            "batch_size": result.batch_size,
            **({"tiles": result.tiles} if result.tiles else {}),  # merged from this many tiles (daemon.tiling)
            "timings_ms": {k: round(v, 2) for k, v in job.timings_ms.items()},
            "processed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "inferd_version": __version__,
        }
        if annotation_error is not None:  # the results stand; only the annotated copy is missing
            tail["annotation_error"] = annotation_error
        # One line: json's C encoder (indent falls back to its pure-Python one, ~8x slower). The
        # model and its class names, the same for every image, are encoded once per model.
        text = f"{_dumps(head)[:-1]}, {self._model_json(model)}, {_dumps(tail)[1:]}\n"
        return text.encode(errors="backslashreplace")  # a name not UTF-8 (surrogate-escaped) as \udcXX

    def _model_json(self, model: ModelInfo) -> str:
        """`"model": {...}, "names": {...}` for the .json of `model`'s results."""
        cached = self._models.get(id(model))
        if cached is not None and cached[0] is model:
            return cached[1]
        part = {
            "model": {
                "weights": model.weights,
                "name": Path(model.weights).name,
                "imgsz": model.imgsz,
                "runtime": model.runtime,
                "precision": model.precision,
                "half": model.half,  # precision == "fp16"; kept for readers of schema 1
            },
            "names": {str(k): v for k, v in model.names.items()},
        }
        if len(self._models) > 64:  # devices restarted or reloaded many times: start afresh
            self._models.clear()
        self._models[id(model)] = (model, _dumps(part)[1:-1])
        return self._models[id(model)][1]

    async def _to_sinks(self, outcome: Outcome) -> None:
        """Wait until every sink holds `outcome` (a failing sink retries; this keeps the slot)."""
        for sink in self.sinks:
            await sink.put(outcome)

    async def failed(self, failure: Failure) -> None:
        """File a failed input in failed/ beside its `.error.json`, written as results are."""
        job, error = failure.job, failure.error
        report = {
            "source": str(job.rel),
            "reason": error.reason.value,
            "message": str(error),
            "attempts": job.attempts,
            "failed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "inferd_version": __version__,
        }
        target = suffixed(self.paths.failed / job.rel, ".error.json")
        data = json.dumps(report, indent=1).encode()
        (problem,) = await write_files([File(target, data, job.recovered, failure)], self.output.fsync, self.swept)
        if problem is not None:
            raise problem
        await self._to_sinks(failure)
        (problem,) = await move_sources([job], self.paths.failed, False)
        if problem is not None:
            raise problem
        log.warning("image_failed", path=str(job.rel), reason=error.reason.value, error=str(error))
        self.finished(failure, True)


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False)


async def run(inbox: asyncio.Queue[list[Outcome]], writer: Writer, concurrency: int) -> None:
    """Write batches of outcomes as they come, up to `concurrency` batches at once."""
    slots = asyncio.Semaphore(concurrency)

    async def one(batch: list[Outcome]) -> None:
        try:
            await writer.write_batch(batch)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as group:
        while True:
            batch = await inbox.get()
            await slots.acquire()
            group.create_task(one(batch))
