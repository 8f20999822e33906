"""Outcomes as database rows: one `images` row per source, and the task's `detections` rows.

The sink's part only: the `images` columns (source, status, sizes, model, device, timings). The
`detections` rows are the payload's own (`Payload.rows`, daemon/tasks/), so a new task needs
no edit here.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

from daemon.jobs import Failure, Job, Outcome
from daemon.tasks import Row

TIMINGS = ("queue", "decode", "batch_wait", "infer", "write")


@dataclass(frozen=True, slots=True)
class ImageRow:
    source: str  # path below incoming/
    status: str  # "done" or "failed"
    reason: str | None
    message: str | None
    width: int | None
    height: int | None
    model: str | None
    task: str | None
    device: str | None
    batch_size: int | None
    processed_at: datetime.datetime  # UTC
    timings_ms: tuple[float | None, ...]  # TIMINGS, then total
    detections: tuple[Row, ...]


def image_row(outcome: Outcome) -> ImageRow:
    """The row that records `outcome`: done with its payload's rows, or failed with its reason."""
    now = datetime.datetime.now(datetime.UTC)
    if isinstance(outcome, Failure):
        job = outcome.job
        return ImageRow(
            text(str(job.rel)), "failed", outcome.error.reason.value, text(str(outcome.error)),
            None, None, None, None, None, None, now, _timings(job), (),
        )  # fmt: skip
    p, job = outcome.prepared, outcome.prepared.job
    return ImageRow(
        text(str(job.rel)), "done", None, None, p.width, p.height, text(outcome.model.weights),
        outcome.payload.task.value, outcome.device, outcome.batch_size, now, _timings(job),
        outcome.payload.rows(p.width, p.height, outcome.model.names),
    )  # fmt: skip


def text(value: str) -> str:
    """`value` as valid UTF-8: the bytes of a name that is not UTF-8 (surrogate-escaped by
    Python) become `\\xff` escapes, as a database cannot store lone surrogates."""
    try:
        return os.fsencode(value).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produced
        return value.encode("utf-8", "backslashreplace").decode()


def _timings(job: Job) -> tuple[float | None, ...]:
    ms = job.timings_ms
    total = (time.monotonic() - job.claimed_at) * 1000
    return (*(round(ms[k], 3) if k in ms else None for k in TIMINGS), round(total, 3))
