"""Tiling without a daemon: the slice layout against SAHI's, the merge rules per task against
SAHI's and on synthetic per-tile results, the config, and the assembler that joins an image's
tiles again."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import config, tiling
from daemon.config import ConfigError, MatchMetric, MergeRule, TilingConfig, TilingMode
from daemon.jobs import FailReason, Failure, Inferred, ItemError, Job, ModelInfo, Outcome, Part, Prepared, Tiled
from daemon.tasks import Task, checkpoint, detect, obb, pose, segment


@settings(max_examples=400, deadline=None)
@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    size=st.integers(32, 2048),
    overlap=st.floats(0.0, 0.9),
)
def test_slices_are_sahis(width: int, height: int, size: int, overlap: float) -> None:
    from sahi.slicing import get_slice_bboxes

    if (width / size) * (height / size) > 5000:  # SAHI's lists get long; the rule is the same
        width = min(width, size * 50)
    expected = get_slice_bboxes(height, width, size, size, False, overlap, overlap)
    assert tiling.slices(width, height, size, overlap) == [tuple(b) for b in expected]


def test_the_seed_strip_is_96_full_tiles_and_a_small_image_one() -> None:
    boxes = tiling.slices(2048, 12000, 640, 0.2)
    assert len(boxes) == 96 and all(x2 - x1 == 640 and y2 - y1 == 640 for x1, y1, x2, y2 in boxes)
    assert boxes[-1] == (2048 - 640, 12000 - 640, 2048, 12000)  # the last tiles shifted back inside
    assert tiling.slices(500, 300, 640, 0.2) == [(0, 0, 500, 300)]


def test_auto_tiles_a_strip_but_not_a_4k_photo() -> None:
    rule = TilingConfig(mode=TilingMode.AUTO)
    assert tiling.wanted((2048, 12000), 640, rule)
    assert not tiling.wanted((3840, 2160), 640, rule) and not tiling.wanted((1920, 1080), 640, rule)
    assert tiling.wanted((100, 100), 640, TilingConfig(mode=TilingMode.ON))
    assert not tiling.wanted((2048, 12000), 640, TilingConfig())


def sahi_merge(rows: np.ndarray, rule: TilingConfig) -> np.ndarray:
    from sahi.postprocess.combine import GreedyNMMPostprocess, NMSPostprocess
    from sahi.prediction import ObjectPrediction

    kind = GreedyNMMPostprocess if rule.merge is MergeRule.GREEDY_NMM else NMSPostprocess
    post = kind(rule.match_threshold, rule.match.value.upper(), rule.class_agnostic)
    shape = [9000, 9000]  # SAHI clips the boxes to it
    preds = [
        ObjectPrediction([float(v) for v in r[:4]], int(r[5]), str(int(r[5])), score=float(r[4]), full_shape=shape)
        for r in rows
    ]
    merged = [[*p.bbox.to_xyxy(), p.score.value, p.category.id] for p in post(preds)]
    return np.array(merged, np.float64).reshape(-1, 6)


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("merge", list(MergeRule))
@pytest.mark.parametrize("match", list(MatchMetric))
@pytest.mark.parametrize("agnostic", [False, True])
def test_box_merge_is_sahis(merge: MergeRule, match: MatchMetric, agnostic: bool) -> None:
    rng = np.random.default_rng(7)
    rule = TilingConfig(merge=merge, match=match, class_agnostic=agnostic)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        xy = rng.uniform(0, 600, (n, 2))
        wh = rng.uniform(20, 200, (n, 2))
        rows = np.concatenate([xy, xy + wh, rng.uniform(0.25, 1, (n, 1)), rng.integers(0, 3, (n, 1))], 1)
        rows = rows.astype(np.float32)
        ours = detect.merge([detect.Boxes(rows[: n // 2]), detect.Boxes(rows[n // 2 :])], rule)
        assert isinstance(ours, detect.Boxes)
        np.testing.assert_allclose(sorted_rows(ours.data), sorted_rows(sahi_merge(rows, rule)), rtol=1e-5, atol=1e-3)


def test_a_box_cut_at_a_tile_border_is_one_box() -> None:
    """A person from y=500 to 800 across the tiles 0-640 and 512-1152: each tile sees a part."""
    top = detect.Boxes(np.array([[100, 500, 220, 640, 0.8, 0]], np.float32))
    bottom = detect.Boxes(np.array([[102, 0, 221, 288, 0.7, 0]], np.float32)).shifted(0, 512)
    whole = detect.merge([top, bottom], TilingConfig())
    assert isinstance(whole, detect.Boxes)
    np.testing.assert_allclose(whole.data, [[100, 500, 221, 800, 0.8, 0]])


def test_pose_keypoints_follow_the_kept_box() -> None:
    points = np.arange(2 * 17 * 3, dtype=np.float32).reshape(2, 17, 3)
    a = pose.Keypoints(np.array([[100, 500, 220, 640, 0.6, 0]], np.float32), points[:1])
    b = pose.Keypoints(np.array([[102, 0, 221, 288, 0.9, 0]], np.float32), points[1:]).shifted(0, 512)
    whole = pose.merge([a, b], TilingConfig())
    assert isinstance(whole, pose.Keypoints) and len(whole) == 1
    expected = points[1].copy()
    expected[:, 1] += 512
    np.testing.assert_allclose(whole.keypoints[0], expected)  # the most confident one's, moved
    np.testing.assert_allclose(whole.data[0, :4], [100, 500, 221, 800])


def test_oriented_boxes_across_a_border_are_one() -> None:
    angle = np.pi / 6
    # One rotated object seen by two tiles (the part each sees, centres 60 px apart along its length).
    a = obb.Rotated(np.array([[300, 600, 200, 60, angle, 0.9, 0]], np.float32))
    b = obb.Rotated(np.array([[352, 30 + 0, 200, 60, angle, 0.8, 0]], np.float32)).shifted(0, 600)
    elsewhere = obb.Rotated(np.array([[900, 100, 80, 40, 0.3, 0.7, 0]], np.float32))
    whole = obb.merge([a, b, elsewhere], TilingConfig())
    assert isinstance(whole, obb.Rotated) and len(whole) == 2
    merged = whole.data[np.argmax(whole.data[:, 5])]
    assert merged[5] == pytest.approx(0.9)
    assert 0 <= merged[4] < np.pi / 2
    # The enclosing rotated box holds both parts' corners.
    outline = whole.corners()[np.argmax(whole.data[:, 5])].astype(np.float32)
    for part in (a, b.shifted(0, 0)):
        for x, y in part.corners()[0]:
            assert cv2.pointPolygonTest(outline, (float(x), float(y)), True) >= -0.5
    rotated_iou = obb.overlap(a.corners()[0], b.corners(), MatchMetric.IOU)[0]
    assert 0 < rotated_iou < 1
    nms = obb.merge([a, b], TilingConfig(merge=MergeRule.NMS))
    np.testing.assert_allclose(nms.data, a.data)  # type: ignore[attr-defined]


def test_segment_polygons_are_joined_across_a_border() -> None:
    """A 200x300 rectangle at (100, 450): the top tile (0-640) sees y 450-640, the next (512-1152)
    y 512-750; their polygons are joined into the outline of the whole."""
    top = segment.Masks(
        np.array([[100, 450, 300, 640, 0.9, 0]], np.float32),
        [np.array([[100, 450], [300, 450], [300, 639], [100, 639]], np.float32)],
    )
    bottom = segment.Masks(
        np.array([[100, 0, 300, 238, 0.8, 0]], np.float32),
        [np.array([[100, 0], [300, 0], [300, 238], [100, 238]], np.float32)],
    ).shifted(0, 512)
    whole = segment.merge([top, bottom], TilingConfig())
    assert isinstance(whole, segment.Masks) and len(whole) == 1
    polygon = whole.polygons[0]
    assert cv2.contourArea(polygon) == pytest.approx(200 * 300, rel=0.02)
    np.testing.assert_allclose(polygon.min(0), [100, 450], atol=1)
    np.testing.assert_allclose(polygon.max(0), [300, 750], atol=1)
    assert whole.txt(640, 1152, {0: "a"}).count("\n") == 1


def test_classification_with_tiling_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(checkpoint, "read", lambda _: checkpoint.Checkpoint(Task.CLASSIFY, 224, ""))
    raw = {"tiling": {"mode": "auto"}, "pipeline": {"decode": "host"}}
    with pytest.raises(ConfigError) as err:
        checkpoint.resolve(config.parse(raw, base=tmp_path), "x.pt")
    assert err.value.key == "tiling.mode"
    checkpoint.resolve(config.parse({"pipeline": {"decode": "host"}}, base=tmp_path), "x.pt")  # off: fine


@pytest.mark.parametrize(
    ("key", "value"),
    [("mode", "always"), ("overlap", 0.95), ("size", 16), ("merge", "nmm"), ("match", "giou"), ("auto_above", 0)],
)
def test_bad_tiling_keys_are_refused(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse({"tiling": {key: value}}, base=tmp_path)
    assert err.value.key == f"tiling.{key}"


def test_tiling_keys_apply_on_reload(tmp_path: Path) -> None:
    from daemon import reload

    running = config.parse({}, base=tmp_path)
    read = config.parse({"tiling": {"mode": "on", "overlap": 0.3}}, base=tmp_path)
    plan = reload.plan(running, read, ["cpu"])
    assert plan.changed == ["tiling.mode", "tiling.overlap"] and not plan.roll  # live: the next image is cut so


def tile_outcomes(tiled: Tiled, job: Job, model: ModelInfo) -> list[Outcome]:
    out: list[Outcome] = []
    for x1, y1, _x2, _y2 in tiled.boxes:
        part = Job(job.rel, job.path, tile=Part(tiled, (x1, y1)))
        prepared = Prepared(part, tiling.DONE_WITH, 640, 640, 1, (1.0, 1.0), (0, 0))
        box = np.array([[10, 600, 100, 640, 0.9, 0]] if y1 == 0 else [[11, 88, 99, 128, 0.8, 0]], np.float32)
        out.append(Inferred(prepared, detect.Boxes(box), "cpu:0", 2, model))
    return out


def test_the_assembler_passes_an_image_once_its_last_tile_is_in_or_one_failed() -> None:
    model = ModelInfo("w", {0: "person"}, 640, False)
    rule = TilingConfig(full_image=False)

    def image(name: str) -> tuple[Tiled, Job]:
        job = Job(PurePosixPath(name), Path(name))
        boxes = tiling.slices(640, 1152, 640, 0.2)
        whole = Prepared(job, tiling.DONE_WITH, 640, 1152, 1, (1.0, 1.0), (0, 0))
        return Tiled(whole, boxes, len(boxes), rule), job

    async def main() -> list[list[Outcome]]:
        out: asyncio.Queue[list[Outcome]] = asyncio.Queue()
        with ThreadPoolExecutor(1) as pool:
            assembler = tiling.Assembler(out, pool)
            (a, job_a), (b, job_b) = image("a.jpg"), image("b.jpg")
            first_a, second_a = tile_outcomes(a, job_a, model)
            first_b, second_b = tile_outcomes(b, job_b, model)
            assert isinstance(first_b, Inferred)
            await assembler.put([first_a, first_b])  # one batch holds tiles of both images
            assert out.empty()
            failed = Failure(first_b.prepared.job, ItemError(FailReason.INFERENCE, "boom"))
            await assembler.put([failed])
            await assembler.put([second_a, second_b])  # b's other tile, after b failed: dropped
        return [out.get_nowait() for _ in range(out.qsize())]

    batches = asyncio.run(main())
    assert [[type(o).__name__ for o in batch] for batch in batches] == [["Failure"], ["Inferred"]]
    failure, done = batches[0][0], batches[1][0]
    assert isinstance(failure, Failure) and failure.job.rel == PurePosixPath("b.jpg") and failure.job.tile is None
    assert isinstance(done, Inferred) and done.tiles == 2 and done.prepared.job.rel == PurePosixPath("a.jpg")
    assert isinstance(done.payload, detect.Boxes)
    np.testing.assert_allclose(done.payload.data, [[10, 600, 100, 640, 0.9, 0]])  # merged across the border


def test_a_tile_is_a_view_of_the_decoded_image(tmp_path: Path) -> None:
    from daemon import preprocess

    path = tmp_path / "strip.png"
    cv2.imwrite(str(path), np.random.default_rng(1).integers(0, 255, (1500, 700, 3), np.uint8))
    rule = TilingConfig(mode=TilingMode.ON)
    settings = preprocess.PrepSettings(640, True, 10**8, tiling=rule)
    parts = preprocess.prepare_any(Job(PurePosixPath("strip.png"), path), settings)
    assert isinstance(parts, list) and len(parts) == 1 + 2 * 3  # the whole image, then 2 x 3 tiles
    whole, *tiles = parts
    assert whole.job.tile is not None and whole.job.tile.origin is None and whole.shape == (640, 320)
    assert all(t.shape == (640, 640) and t.image.base is not None for t in tiles)  # no copy
    origins = {t.job.tile.origin for t in tiles if t.job.tile}
    assert origins == {(0, 0), (60, 0), (0, 512), (60, 512), (0, 860), (60, 860)}


def test_a_merge_that_meets_a_bug_fails_only_its_image(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ModelInfo("w", {0: "person"}, 640, False)
    job = Job(PurePosixPath("a.jpg"), Path("a.jpg"))
    boxes = tiling.slices(640, 1152, 640, 0.2)
    whole = Prepared(job, tiling.DONE_WITH, 640, 1152, 1, (1.0, 1.0), (0, 0))
    tiled = Tiled(whole, boxes, len(boxes), TilingConfig(full_image=False))

    def broken(task: Task) -> tiling.Merge:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(tiling, "merger", broken)

    async def main() -> list[Outcome]:
        out: asyncio.Queue[list[Outcome]] = asyncio.Queue()
        with ThreadPoolExecutor(1) as pool:
            await tiling.Assembler(out, pool).put(tile_outcomes(tiled, job, model))
        return out.get_nowait()

    (failure,) = asyncio.run(main())
    assert isinstance(failure, Failure) and failure.job is job and failure.error.reason is FailReason.INTERNAL
