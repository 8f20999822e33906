"""The results stage in this process, on real files: a batch and one image's retry take the same
path (the same files, the same bytes but for the timings), `on_success = "delete"` on both, and a
failure report written as results are."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from daemon import results
from daemon.config import OnSuccess, OutputConfig, PathsConfig
from daemon.jobs import FailReason, Failure, Inferred, ItemError, Job, ModelInfo, Outcome, Prepared
from daemon.tasks.detect import Boxes


def rig(tmp_path: Path, on_success: OnSuccess) -> tuple[results.Writer, list[tuple[Outcome, bool]]]:
    var = tmp_path / "var"
    paths = PathsConfig(var / "incoming", var / "output", var / "done", var / "failed", var / "work")
    (paths.work / "processing" / "sub").mkdir(parents=True)
    finished: list[tuple[Outcome, bool]] = []
    output = OutputConfig(("txt", "json", "image"), on_success, True, 3)
    return results.Writer(paths, output, lambda o, ok: finished.append((o, ok))), finished


def inferred(writer: results.Writer, rel: str) -> Inferred:
    path = writer.paths.work / "processing" / rel
    Image.new("RGB", (64, 48), (0, 90, 0)).save(path)
    prepared = Prepared(Job(PurePosixPath(rel), path), np.zeros((1, 1, 3), np.uint8), 64, 48, 1, (1.0, 1.0), (0, 0))
    boxes = Boxes(np.array([[4, 5, 30, 40, 0.9, 0]], np.float32))
    return Inferred(prepared, boxes, "cpu", 2, ModelInfo("w.pt", {0: "thing"}, 64, False))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def without_timings(path: Path) -> dict[str, object]:
    document = json.loads(path.read_text())
    return {k: v for k, v in document.items() if k not in ("timings_ms", "processed_at")}


@pytest.mark.parametrize("on_success", [OnSuccess.MOVE, OnSuccess.DELETE])
def test_a_batch_and_one_images_retry_write_the_same_files(tmp_path: Path, on_success: OnSuccess) -> None:
    writer, finished = rig(tmp_path, on_success)
    batch = [inferred(writer, "sub/a.jpg"), inferred(writer, "sub/b.jpg")]
    alone = inferred(writer, "sub/c.jpg")
    junk = writer.paths.work / "processing" / "sub" / "d.jpg"
    junk.write_bytes(b"junk")
    failure = Failure(Job(PurePosixPath("sub/d.jpg"), junk), ItemError(FailReason.NOT_IMAGE, "not an image"))

    async def main() -> None:
        await writer.write_batch([*batch, failure])
        await writer.write(alone)  # the path an image takes when its batch met an error

    asyncio.run(main())
    assert [ok for _, ok in finished] == [True] * 4 and writer.write_errors == 0
    out = writer.paths.output
    assert tree(out) == [f"sub/{n}.jpg.{s}" for n in "abc" for s in ("annotated.jpg", "json", "txt")]
    assert (out / "sub/a.jpg.txt").read_bytes() == (out / "sub/c.jpg.txt").read_bytes()
    a, c = without_timings(out / "sub/a.jpg.json"), without_timings(out / "sub/c.jpg.json")
    assert {**a, "source": "x"} == {**c, "source": "x"} and a["source"] == "sub/a.jpg"
    assert tree(writer.paths.work / "processing") == []
    moved = ["sub/a.jpg", "sub/b.jpg", "sub/c.jpg"] if on_success is OnSuccess.MOVE else []
    assert tree(writer.paths.done) == moved
    assert tree(writer.paths.failed) == ["sub/d.jpg", "sub/d.jpg.error.json"]
    report = json.loads((writer.paths.failed / "sub/d.jpg.error.json").read_text())
    assert (report["source"], report["reason"], report["message"]) == ("sub/d.jpg", "not_an_image", "not an image")
