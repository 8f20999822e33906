"""The pipeline the Service serves with: the stages' queues and objects, and the settings the
config gives them (`prep_settings`, `knobs`: applied again by a reload).

    incoming/ --intake--> jobs --preprocess (threads)--> ready --batching--> devices (fleet)
                                                                              |
    output/, done/, failed/ <--results (aiofiles)-- outcomes <----------------+
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from daemon import batching, intake, preprocess, results, tiling
from daemon.config import Config, Decode, TilingConfig
from daemon.devices import JPEG_SLOT_BYTES, Device
from daemon.jobs import Capacity, Job, Outcome, Prepared
from daemon.local import cores
from daemon.sinks import Sink
from daemon.tasks import Task
from daemon.threads import name_os_thread

QUEUES = ("jobs", "ready", "outcomes", "batching")


def prep_settings(config: Config, task: str = "detect") -> preprocess.PrepSettings:
    """`task`: the model's, from its device processes (classification crops on the host)."""
    p = config.pipeline
    classify = task == Task.CLASSIFY.value
    device_max_bytes = JPEG_SLOT_BYTES if p.decode is Decode.DEVICE and not classify else 0
    # A classifier is never tiled: refused at start for a .pt (checkpoint.resolve); an exported
    # classifier's task is known only from its devices, and its images are then taken whole.
    tiles = TilingConfig() if classify else config.tiling
    imgsz = config.model.imgsz
    return preprocess.PrepSettings(imgsz, p.reduced_decode, p.max_pixels, device_max_bytes, classify, tiles)


def knobs(config: Config) -> batching.Knobs:
    p = config.pipeline
    return batching.Knobs(p.max_batch, p.max_wait_ms, config.model.conf, config.model.iou, p.max_attempts)


@dataclass(slots=True)
class Pipeline:
    """The serve phase's stages and the queues that join them (made once the devices are READY)."""

    queues: dict[str, asyncio.Queue[Any]]  # jobs, ready, outcomes
    batcher: batching.Batcher
    writer: results.Writer
    intake: intake.Intake
    pool: ThreadPoolExecutor
    threads: int

    @classmethod
    def build(
        cls,
        cfg: Config,
        devices: list[Device],
        capacity: Capacity,
        finished: Callable[[Outcome, bool], None],
        sinks: Sequence[Sink],
    ) -> Pipeline:
        """The queues and stages for `cfg`, the batcher picking from `devices` (the fleet's list);
        `finished(outcome, written)` is called as each input leaves the pipeline."""
        size = cfg.pipeline.max_pending
        jobs: asyncio.Queue[Job] = asyncio.Queue(size)
        # Decoded images: only as many as the batcher has room for (Batcher.room); more wait undecoded.
        ready: asyncio.Queue[Prepared] = asyncio.Queue(cfg.pipeline.max_batch * (len(devices) + 1))
        outcomes: asyncio.Queue[list[Outcome]] = asyncio.Queue(size)  # a batch's, or one failure
        intake_settings = intake.IntakeSettings(
            cfg.paths.incoming,
            cfg.paths.work / "processing",
            cfg.intake.settle_ms / 1000,
            cfg.intake.ignore_suffixes,
            cfg.intake.reconcile_interval_s,
            cfg.intake.debounce_ms,
            cfg.intake.force_polling,
            cfg.intake.claim_by_copy,
        )
        threads = cfg.pipeline.preprocess_threads or cores()
        pool = ThreadPoolExecutor(threads, "preprocess", initializer=name_os_thread, initargs=("preprocess",))
        # A tiled image's tiles are merged into its result between the batcher and the results stage.
        assembler = tiling.Assembler(outcomes, pool)
        return cls(
            {"jobs": jobs, "ready": ready, "outcomes": outcomes},
            batching.Batcher(ready, devices, assembler, knobs(cfg)),
            results.Writer(cfg.paths, cfg.output, finished, sinks),
            intake.Intake(intake_settings, capacity, jobs, outcomes),
            pool,
            threads,
        )
