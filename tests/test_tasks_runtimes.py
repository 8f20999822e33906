"""Every task on every exported runtime: segment, pose, obb and classify on OpenVINO, ONNX
Runtime and OpenVINO INT8 against PyTorch fp32, through the daemon's own Runner, on real photos.

The comparison is the accuracy gate's (daemon.tuning.gate): >= 95 % of PyTorch's detections
found again, same class, IoU >= 0.5 (oriented boxes by their extent; classification by its
top-1 class); for pose the keypoints of matched people within a few pixels too. OpenVINO fp32
runs in CI; ONNX Runtime and INT8 (longer exports) are `long`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assets

from daemon import runtimes
from daemon.config import Precision, Runtime
from daemon.tuning import gate
from daemon.tuning.int8 import quantize

TASKS = ("segment", "pose", "obb", "classify")
CASES = [
    *[pytest.param(t, "openvino", "fp32", marks=pytest.mark.slow) for t in TASKS[:2]],
    *[pytest.param(t, "openvino", "fp32", marks=pytest.mark.long) for t in TASKS[2:]],  # CI time: 2 of 4
    *[pytest.param(t, "onnxruntime", "fp32", marks=pytest.mark.long) for t in TASKS],
    *[pytest.param(t, "openvino", "int8", marks=pytest.mark.long) for t in TASKS],
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("task-models")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    """Real photos; bus.jpg and zidane.jpg (the people) are the held-out fourth."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    order = [data / "coffee.png", data / "chelsea.png", data / "astronaut.png", assets() / "bus.jpg",
             data / "camera.png", data / "motorcycle_left.png", data / "rocket.jpg",
             assets() / "zidane.jpg"]  # fmt: skip
    root = tmp_path_factory.mktemp("calibration")
    for i, p in enumerate(order):
        shutil.copyfile(p, root / f"{i:02d}-{p.name}")
    return gate.images_in(root)


@pytest.mark.parametrize(("task", "runtime", "precision"), CASES)
def test_task_on_runtime_matches_torch(
    task: str, runtime: str, precision: str, task_weights: dict[str, Path], cache: Path,
    calibration: tuple[Path, ...],
) -> None:  # fmt: skip
    import task_models

    if not runtimes.SPECS[Runtime(runtime)].installed() or (precision == "int8" and not runtimes.importable("nncf")):
        pytest.skip(f"{runtime} {precision} is not installed")
    imgsz, weights = task_models.IMGSZ[task], str(task_weights[task])
    plan = runtimes.ensure(weights, imgsz=imgsz, max_batch=2, runtime=Runtime(runtime), precision=Precision(precision),
                           device="cpu", cache_dir=cache, calibration=calibration, quantize=quantize)  # fmt: skip
    ours = gate.runner(plan.artefact, runtime, precision, imgsz=imgsz, max_batch=2, cache_dir=cache, threads=2)
    torch = gate.runner(weights, "torch", "fp32", imgsz=imgsz, max_batch=2, cache_dir=cache, threads=2)
    assert ours.head.task.value == task == torch.head.task.value
    items = gate.prepare((assets() / "bus.jpg", assets() / "zidane.jpg"), imgsz, classify=task == "classify")
    theirs, mine = gate.detections(torch, items), gate.detections(ours, items)
    score = gate.score(mine, theirs)
    print(f"{task} {runtime} {precision}: {score.matched}/{score.reference}")
    assert score.reference >= (2 if task == "classify" else 4)  # the people are found: the check means something
    assert score.passed
    if task == "pose" and precision == "fp32":
        for p in items:  # keypoints of the same image, as PyTorch places them
            a, b = (_keypoints(r, p) for r in (torch, ours))
            if len(a) == len(b):
                np.testing.assert_allclose(a[..., :2], b[..., :2], atol=3.0)


def _keypoints(r: object, p: object) -> np.ndarray:
    from daemon.messages import Batch

    h, w = p.shape  # type: ignore[attr-defined]
    view = np.frombuffer(r.buffer, dtype=np.uint8, count=h * w * 3)  # type: ignore[attr-defined]
    view[:] = p.image.reshape(-1)  # type: ignore[attr-defined]
    del view
    meta = (p.gain[0], p.gain[1], p.pad[0], p.pad[1], p.width, p.height)  # type: ignore[attr-defined]
    (payload,), _ms = r.run(Batch(0, 0, 1, h, w, [meta], 0.25, 0.7))  # type: ignore[attr-defined]
    order = np.argsort(-payload.data[:, 4])
    return np.asarray(payload.keypoints)[order]
