"""A task the daemon has never heard of, registered from this file only (its line in
`tasks.TASKS`, this module as its module): its post-processing runs through `tasks.postprocess`,
its tiles through `tiling.merger`, and its results reach the result files and the database
sink's rows through `results.Writer` and the real SQLite sink, with no edit of results.py or
daemon/sinks/. That is docs/extending.md's claim for a task: its module and its line in the table.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image, ImageDraw

from daemon import config, results, tasks, tiling
from daemon.checks import DatabaseUrl
from daemon.config import TilingConfig
from daemon.jobs import Inferred, Job, ModelInfo, Outcome, Prepared
from daemon.sinks.database import open_database
from daemon.tasks import Head, Meta, Payload, Row


class FakeTask(enum.Enum):
    COUNT = "count"  # how many things, and where their crowd is


@dataclass(frozen=True, slots=True)
class Crowd:
    """The fake task's payload: a count of things inside one box (x1, y1, x2, y2)."""

    task: ClassVar[Any] = FakeTask.COUNT
    count: int
    box: tuple[float, float, float, float]

    def __len__(self) -> int:
        return 1

    def txt(self, width: int, height: int, names: dict[int, str]) -> str:
        return f"{self.count}\n"

    def json(self, names: dict[int, str]) -> dict[str, Any]:
        return {"crowd": {"count": self.count, "box_xyxy": list(self.box)}}

    def draw(self, draw: ImageDraw.ImageDraw, names: dict[int, str], line: int) -> None:
        draw.rectangle(self.box, outline=(255, 0, 0), width=line)

    def counts(self, names: dict[int, str]) -> dict[str, Any]:
        return {"count": self.count}

    def shifted(self, dx: float, dy: float) -> Crowd:
        x1, y1, x2, y2 = self.box
        return Crowd(self.count, (x1 + dx, y1 + dy, x2 + dx, y2 + dy))

    def rows(self, width: int, height: int, names: dict[int, str]) -> tuple[Row, ...]:
        return (Row(0, names[0], 1.0, *self.box, {"count": self.count}),)


def postprocess(
    head: Head, preds: Any, conf: float, iou: float, shape: tuple[int, int], metas: list[Meta]
) -> list[Payload]:
    """One crowd per image: `preds` holds each image's count."""
    return [Crowd(int(n), (1.0, 2.0, float(m[4]) - 1, float(m[5]) - 2)) for n, m in zip(preds, metas, strict=True)]


def merge(parts: list[Payload], rule: TilingConfig) -> Payload:
    crowds = [p for p in parts if isinstance(p, Crowd)]
    return Crowd(sum(c.count for c in crowds), crowds[0].box)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tasks.TASKS, FakeTask.COUNT, tasks.Spec(__name__, "Count"))  # type: ignore[index]


def test_a_task_registered_from_a_test_reaches_the_files_and_the_database_rows(
    tmp_path: Path, registered: None
) -> None:
    head = Head(FakeTask.COUNT, 1, None, False, 300)  # type: ignore[arg-type]
    (payload,) = tasks.postprocess(head, [7], 0.25, 0.7, (64, 64), [(1.0, 1.0, 0, 0, 40, 30)])
    assert tiling.merger(payload.task)([payload, payload.shifted(5, 5)], TilingConfig()) == Crowd(14, payload.box)

    cfg = config.parse({"output": {"formats": ["txt", "json", "image"], "fsync": True}}, base=tmp_path)
    source = cfg.paths.work / "processing" / "a.jpg"
    source.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (0, 128, 0)).save(source)
    job = Job(PurePosixPath("a.jpg"), source)
    prepared = Prepared(job, np.zeros((1, 1, 3), np.uint8), 40, 30, 1, (1.0, 1.0), (0, 0))
    result = Inferred(prepared, payload, "cpu:0", 1, ModelInfo("fake.pt", {0: "thing"}, 64, False))
    db_path = tmp_path / "fake.sqlite3"
    sink = open_database(DatabaseUrl("sqlite", db_path, str(db_path)), fsync=False, on_state=lambda up, e: None)
    finished: list[tuple[Outcome, bool]] = []
    writer = results.Writer(cfg.paths, cfg.output, lambda o, ok: finished.append((o, ok)), [sink])

    async def main() -> None:
        runner = asyncio.create_task(sink.run())
        await writer.write_batch([result])
        runner.cancel()
        await sink.close()

    asyncio.run(main())
    assert finished == [(result, True)]
    assert (cfg.paths.output / "a.jpg.txt").read_text() == "7\n"
    document = json.loads((cfg.paths.output / "a.jpg.json").read_text())
    assert (document["task"], document["crowd"]) == ("count", {"count": 7, "box_xyxy": [1.0, 2.0, 39.0, 28.0]})
    assert (cfg.paths.output / "a.jpg.annotated.jpg").stat().st_size > 0
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT source, status, task FROM images").fetchall() == [("a.jpg", "done", "count")]
        found = conn.execute("SELECT class_id, class_name, confidence, x1, y1, x2, y2, payload FROM detections")
        assert found.fetchall() == [(0, "thing", 1.0, 1.0, 2.0, 39.0, 28.0, '{"count": 7}')]
