"""Checkpoints of every task that find real things, made offline from the embedded detector.

The default model is a trained yolov8s detector (2 classes). Its weights are copied into a
yolov8s-seg, -pose and -obb model wherever the shapes match (backbone, neck, and the box and
class branches of the head), so these find the people in bus.jpg as the detector does; their
own branches (mask prototypes and coefficients, keypoints, angle) stay random-init, which gives
masks, keypoints and angles that are arbitrary but deterministic: enough to compare inferd with
Ultralytics' predict. The classifier gets the detector's backbone and a random head whose
weights are scaled up, so that its probabilities depend on the image and are far from uniform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Small training sizes: "auto" must find them, and the tests stay quick.
IMGSZ = {"segment": 416, "pose": 384, "obb": 416, "classify": 224}
CLASSIFY_NAMES = {i: f"kind{i}" for i in range(8)}


def build(task: str, path: Path) -> Path:
    import torch
    import ultralytics
    from ultralytics.nn.tasks import ClassificationModel, OBBModel, PoseModel, SegmentationModel

    from daemon.model import resolve_weights

    detector = torch.load(resolve_weights("default"), map_location="cpu", weights_only=False)["model"].float()
    names = dict(detector.names)
    model: Any
    if task == "segment":
        model = SegmentationModel("yolov8s-seg.yaml", nc=len(names), verbose=False)
    elif task == "pose":
        model = PoseModel("yolov8s-pose.yaml", nc=len(names), data_kpt_shape=(17, 3), verbose=False)
    elif task == "obb":
        model = OBBModel("yolov8s-obb.yaml", nc=len(names), verbose=False)
    else:
        names = CLASSIFY_NAMES
        model = ClassificationModel("yolov8s-cls.yaml", nc=len(names), verbose=False)
    theirs, ours = detector.state_dict(), model.state_dict()
    shared = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    if task == "classify":
        with torch.no_grad():
            model.model[-1].linear.weight.mul_(40)
    model.names = names
    model.eval()
    ckpt = {
        "date": "2026-12-01",
        "version": ultralytics.__version__,
        "model": model,
        "train_args": {"task": task, "imgsz": IMGSZ[task], "model": f"yolov8s-{task}.yaml"},
    }
    torch.save(ckpt, path)
    return path
