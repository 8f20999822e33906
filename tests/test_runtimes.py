"""Runtimes, precision and the export cache, with the real default model on real photos.

- every runtime and precision this machine has matches PyTorch fp32 (>= 95 % of detections:
  same class, IoU >= 0.9, |conf difference| <= 0.03);
- every letterboxed shape and batch size up to max_batch runs on one export;
- the cache: a changed key builds a new entry, a corrupt entry is rebuilt, two processes
  exporting at once leave one whole entry, a failed export leaves nothing;
- choosing: auto per device and CPU flags, impossible combinations name the key and the fix.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
from conftest import assets

from daemon import preprocess, runtimes
from daemon.config import ConfigError, LogConfig, LogFormat, Precision, Runtime
from daemon.jobs import Job, Prepared
from daemon.messages import Batch, DeviceSpec
from daemon.model import Runner, resolve_weights
from daemon.tasks.detect import Boxes

CONF, IOU = 0.25, 0.7
MAX_BATCH = 4
BF16 = runtimes.has_bf16(runtimes.cpu_flags())


def photos() -> list[Path]:
    """Real photos shipped by installed packages (none are crops or edits of another)."""
    import matplotlib
    import skimage

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    data = Path(skimage.__file__).parent / "data"
    return [
        assets() / "bus.jpg",  # Ultralytics
        assets() / "zidane.jpg",
        sample / "grace_hopper.jpg",  # matplotlib
        data / "astronaut.png",  # scikit-image
        data / "camera.png",  # greyscale
        data / "coffee.png",
        data / "chelsea.png",
        data / "motorcycle_left.png",
        data / "rocket.jpg",
    ]


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session: each runtime is exported once (a few seconds each)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def prepared() -> list[Prepared]:
    settings = preprocess.PrepSettings(640, True, 10**9)
    return [preprocess.prepare(Job(PurePosixPath(p.name), p), settings) for p in photos()]


def runner(runtime: str, precision: str, cache: Path, weights: str = "default") -> Runner:
    slot = MAX_BATCH * 640 * 640 * 3
    spec = DeviceSpec(
        device="cpu", weights=weights, imgsz=640, precision=precision, max_det=300, torch_threads=2,
        log=LogConfig("warning", LogFormat.JSON), slot_bytes=slot, slots=1, runtime=runtime, cache_dir=str(cache),
        max_batch=MAX_BATCH,
    )  # fmt: skip
    return Runner(spec, mmap.mmap(-1, slot))


def detect(r: Runner, items: list[Prepared]) -> list[np.ndarray]:
    """Detections (x1, y1, x2, y2, conf, cls in source pixels) of images of one shape, as one batch."""
    h, w = items[0].shape
    view = np.frombuffer(r.buffer, dtype=np.uint8, count=len(items) * h * w * 3)
    np.stack([p.image for p in items], out=view.reshape(len(items), h, w, 3))
    del view
    metas = [(p.gain[0], p.gain[1], p.pad[0], p.pad[1], p.width, p.height) for p in items]
    out, _ms = r.run(Batch(0, 0, len(items), h, w, metas, CONF, IOU))
    assert all(isinstance(o, Boxes) for o in out), out  # the default model is a detector
    return [o.data for o in out]  # type: ignore[union-attr]


def each(r: Runner, items: list[Prepared]) -> list[np.ndarray]:
    return [detect(r, [p])[0] for p in items]


@pytest.fixture(scope="session")
def reference(cache: Path, prepared: list[Prepared]) -> list[np.ndarray]:
    """PyTorch fp32, image by image."""
    return each(runner("torch", "fp32", cache), prepared)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def matched(ours: list[np.ndarray], theirs: list[np.ndarray]) -> tuple[int, int, float, float]:
    """(pairs, detections, worst |dconf|, worst IoU of the pairs): pairs are greedy by confidence,
    same class, IoU >= 0.9, |dconf| <= 0.03; detections counts the larger side per image, so a
    missing or an extra box both count against."""
    pairs = total = 0
    worst_conf, worst_iou = 0.0, 1.0
    for a, b in zip(ours, theirs, strict=True):
        total += max(len(a), len(b))
        free = list(range(len(b)))
        for det in a[np.argsort(-a[:, 4])]:
            good = [j for j in free if b[j, 5] == det[5] and abs(b[j, 4] - det[4]) <= 0.03 and iou(det, b[j]) >= 0.9]
            if good:
                best = max(good, key=lambda j: iou(det, b[j]))
                free.remove(best)
                pairs += 1
                worst_conf = max(worst_conf, float(abs(b[best, 4] - det[4])))
                worst_iou = min(worst_iou, iou(det, b[best]))
    return pairs, total, worst_conf, worst_iou


def test_reference_finds_people(reference: list[np.ndarray]) -> None:
    """The bar below means something: the photos hold many detections."""
    assert sum(len(r) for r in reference) >= 12
    assert sum(len(r) > 0 for r in reference) >= 5


CASES = [
    ("openvino", "fp32"),
    pytest.param("openvino", "bf16", marks=pytest.mark.skipif(not BF16, reason="no AMX/AVX512-BF16")),
    pytest.param(
        "onnxruntime",
        "fp32",
        marks=pytest.mark.skipif(not runtimes.importable("onnxruntime"), reason="onnxruntime not installed"),
    ),
]


@pytest.mark.parametrize(("runtime", "precision"), CASES)
def test_accuracy_against_torch_fp32(
    runtime: str, precision: str, cache: Path, prepared: list[Prepared], reference: list[np.ndarray]
) -> None:
    r = runner(runtime, precision, cache)
    assert (r.info().runtime, r.info().precision) == (runtime, precision)
    ours = each(r, prepared)
    pairs, total, dconf, worst_iou = matched(ours, reference)
    rate = f"{pairs}/{total} matched ({pairs / total:.1%})"
    print(f"{runtime} {precision}: {rate}, |dconf| <= {dconf:.4f}, IoU >= {worst_iou:.4f}")
    assert pairs >= 0.95 * total


def test_every_shape_and_batch_runs_on_one_export(cache: Path, prepared: list[Prepared]) -> None:
    """Letterboxed shapes of several sizes, batches of 1..max_batch: one artefact, the same boxes."""
    r = runner("openvino", "fp32", cache)
    shapes = {p.shape for p in prepared}
    assert len(shapes) >= 3
    alone = each(r, prepared)
    for shape in shapes:
        group = [(p, a) for p, a in zip(prepared, alone, strict=True) if p.shape == shape]
        items = [p for p, _ in group] * MAX_BATCH
        batched = detect(r, items[:MAX_BATCH])
        for (_, single), boxes in zip(group * MAX_BATCH, batched, strict=False):
            np.testing.assert_allclose(boxes, single, atol=1e-2)
    assert len([e for e in entries(cache) if "-openvino-fp32-" in e.name]) == 1


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def plan(weights: Path, cache: Path, **changes: Any) -> runtimes.Plan:
    kwargs: dict[str, Any] = dict(
        imgsz=64, max_batch=2, runtime=Runtime.OPENVINO, precision=Precision.FP32, device="cpu", cache_dir=cache
    )
    return runtimes.ensure(str(weights), **{**kwargs, **changes})


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Iterator[tuple[Path, Path]]:
    """A cache with one entry of the random-init model at imgsz 64 (exports in ~2 s)."""
    cache = tmp_path_factory.mktemp("small-cache")
    assert plan(tiny_weights, cache).built
    yield tiny_weights, cache
    shutil.rmtree(cache)


def test_a_changed_key_builds_another_entry(small_cache: tuple[Path, Path], tmp_path: Path) -> None:
    weights, cache = small_cache
    again = plan(weights, cache)
    assert not again.built and Path(again.artefact).is_dir()
    assert plan(weights, cache, imgsz=96).built
    assert plan(weights, cache, max_batch=3).built
    changed = tmp_path / "other.pt"  # same name, other content: the hash decides, not the path
    from ultralytics.models import YOLO

    YOLO("yolov8n.yaml").save(str(changed))
    assert plan(changed, cache).built
    names = [p.name for p in entries(cache)]
    assert len(names) == 4 == len(set(names))
    assert not plan(weights, cache, imgsz=96).built


def test_corrupt_entry_is_rebuilt(small_cache: tuple[Path, Path]) -> None:
    weights, cache = small_cache
    artefact = Path(plan(weights, cache).artefact)
    binary = next(artefact.glob("*.bin"))
    data = bytearray(binary.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    binary.write_bytes(bytes(data))
    rebuilt = plan(weights, cache)
    assert rebuilt.built and next(Path(rebuilt.artefact).glob("*.bin")).read_bytes() != bytes(data)
    (Path(rebuilt.artefact).parent / runtimes.MANIFEST).write_text("{")  # a half-written manifest
    assert plan(weights, cache).built
    assert not plan(weights, cache).built


def _export_in_child(weights: str, cache: str, answers: Any) -> None:
    answers.put(plan(Path(weights), Path(cache)).describe())


def test_concurrent_exporters_build_one_whole_entry(tiny_weights: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    answers = ctx.SimpleQueue()
    procs = [ctx.Process(target=_export_in_child, args=(str(tiny_weights), str(tmp_path), answers)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = [answers.get() for _ in procs]
    assert sum(r["built"] for r in results) == 1  # the others waited on the lock, then found it
    assert len({r["artefact"] for r in results}) == 1
    (entry,) = entries(tmp_path)
    assert runtimes.valid(entry, json.loads((entry / runtimes.MANIFEST).read_text())["key"]) is not None
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_failed_export_leaves_nothing_and_names_the_fix(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(runtimes.ExportError, match=r'model\.runtime = "torch"'):
        plan(broken, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})


@pytest.mark.parametrize(
    ("runtime", "precision", "device", "flags", "tensorrt", "expected"),
    [
        (Runtime.AUTO, Precision.AUTO, "cpu", AMX, False, (Runtime.OPENVINO, Precision.FP32)),  # unmeasured
        (Runtime.AUTO, Precision.AUTO, "cpu", frozenset({"avx2"}), False, (Runtime.OPENVINO, Precision.FP32)),
        (Runtime.AUTO, Precision.AUTO, "cpu", AVX512_BF16, False, (Runtime.OPENVINO, Precision.FP32)),
        (Runtime.OPENVINO, Precision.BF16, "cpu", AVX512_BF16, False, (Runtime.OPENVINO, Precision.BF16)),
        (Runtime.AUTO, Precision.AUTO, "cuda:0", AMX, False, (Runtime.TORCH, Precision.FP16)),
        (Runtime.AUTO, Precision.AUTO, "cuda:1", AMX, True, (Runtime.TENSORRT, Precision.FP16)),
        (Runtime.TORCH, Precision.AUTO, "cpu", AMX, False, (Runtime.TORCH, Precision.FP32)),
    ],
)
def test_auto_choice(
    runtime: Runtime,
    precision: Precision,
    device: str,
    flags: frozenset[str],
    tensorrt: bool,
    expected: tuple[Runtime, Precision],
) -> None:
    chosen = runtimes.choose(runtime, precision, device=device, weights="m.pt", flags=flags, tensorrt=tensorrt)
    assert chosen == expected


@pytest.mark.parametrize(
    ("runtime", "precision", "device", "weights", "key", "fix"),
    [
        (Runtime.OPENVINO, Precision.BF16, "cpu", "m.pt", "model.precision", '"fp32"'),  # flags without bf16
        (Runtime.TORCH, Precision.BF16, "cpu", "m.pt", "model.precision", "['fp32']"),
        (Runtime.OPENVINO, Precision.AUTO, "cuda:0", "m.pt", "model.runtime", '"tensorrt"'),
        (Runtime.TENSORRT, Precision.AUTO, "cpu", "m.pt", "model.runtime", '"openvino"'),
        (Runtime.TORCH, Precision.AUTO, "cpu", "m.onnx", "model.runtime", '"onnxruntime"'),
    ],
)
def test_impossible_choices_name_key_and_fix(
    runtime: Runtime, precision: Precision, device: str, weights: str, key: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as err:
        runtimes.choose(runtime, precision, device=device, weights=weights, flags=frozenset({"avx2"}))
    assert err.value.key == key and fix in str(err.value)


def test_exported_weights_are_used_as_they_are(cache: Path, prepared: list[Prepared]) -> None:
    """An OpenVINO export given as the weights: no new export, runtime auto becomes openvino."""
    exported = runtimes.ensure(
        resolve_weights("default"), imgsz=640, max_batch=MAX_BATCH, runtime=Runtime.OPENVINO,
        precision=Precision.FP32, device="cpu", cache_dir=cache,
    ).artefact  # fmt: skip
    before = entries(cache)
    r = runner("auto", "fp32", cache / "unused", weights=exported)
    assert (r.info().runtime, r.info().artefact) == ("openvino", exported)
    assert len(detect(r, prepared[:1])[0]) > 0
    assert entries(cache) == before and not (cache / "unused").exists()


def test_cpu_flags_come_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert runtimes.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert runtimes.has_bf16(runtimes.cpu_flags(cpuinfo))
    assert runtimes.cpu_flags(tmp_path / "missing") == frozenset()


def test_cpu_layout_per_runtime(tmp_path: Path) -> None:
    """OpenVINO: one CPU process with a thread per core; PyTorch: a process per core (at most 4)."""
    from daemon.config import parse
    from daemon.local import cores, cpu_workers, torch_threads

    def layout(**model: str) -> tuple[int, int]:
        config = parse({"model": {"devices": ["cpu"], **model}}, base=tmp_path)
        processes = cpu_workers(config)
        return processes, torch_threads(config, [f"cpu:{i}" for i in range(processes)])

    assert layout() == layout(runtime="openvino") == (1, cores())
    assert layout(weights="m_openvino_model") == (1, cores())
    assert layout(runtime="torch") == (min(cores(), 4), max(1, cores() // min(cores(), 4)))
    assert layout(weights="m.onnx")[0] == min(cores(), 4)


def test_a_static_export_given_as_weights_takes_every_letterboxed_shape(
    tmp_path: Path, cache: Path, prepared: list[Prepared]
) -> None:
    """An export with one fixed input shape (dynamic=False): smaller inputs are padded to it."""
    from ultralytics.models import YOLO

    shutil.copyfile(resolve_weights("default"), tmp_path / "static.pt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's
        exported = YOLO(str(tmp_path / "static.pt")).export(format="openvino", imgsz=640, dynamic=False, verbose=False)
    r = runner("auto", "fp32", cache, weights=str(exported))
    assert r.info().fixed_shape == (640, 640) and r.info().runtime == "openvino"
    assert len({p.shape for p in prepared}) >= 3  # none of them 640x640
    model = YOLO(str(exported), task="detect")  # Ultralytics letterboxes to 640x640 for it
    theirs = [model.predict(str(p), imgsz=640, conf=CONF, iou=IOU, verbose=False)[0] for p in photos()]
    ours = each(r, prepared)
    pairs, total, _, _ = matched(ours, [t.boxes.data.cpu().numpy() for t in theirs])
    print(f"static openvino: {pairs}/{total} matched against Ultralytics' predict on it")
    assert total >= 12 and pairs >= 0.95 * total
