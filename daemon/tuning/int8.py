"""INT8 by NNCF's post-training quantization of the OpenVINO export, on the user's calibration
images, checked by the accuracy gate before it is cached (cache.ensure's `quantize` hook)."""

from __future__ import annotations

import shutil
from pathlib import Path

from daemon.tuning import gate

# Left in float: the box decoding's arithmetic and the class scores' sigmoid (measured: 33.5-35.5
# img/s with them in float, against 20-21 for bf16, 12/12 detections matched).
FLOAT_OPS = ["Multiply", "Subtract", "Sigmoid"]
MIN_IMAGES = 4  # 3 to calibrate, 1 held out; more make the gate mean more


def quantize(fp32: Path, tmp: Path, images: tuple[Path, ...], imgsz: int, max_batch: int) -> str:
    """The fp32 export at `fp32` quantized to INT8 into `tmp` on 3/4 of `images`, then checked on
    the other 1/4 against fp32: GateFailed (exit 78, with the figures) below the gate. Returns
    the artefact's path relative to `tmp`."""
    import nncf
    import numpy as np
    import openvino as ov

    if len(images) < MIN_IMAGES:
        raise gate.GateFailed(
            "model.calibration", f"holds {len(images)} images; INT8 needs at least {MIN_IMAGES}",
            "add photos like the ones you serve (a few dozen calibrate well)",
        )  # fmt: skip
    calibrate, held = gate.split(images)
    ref = gate.runner(str(fp32), "openvino", "fp32", imgsz=imgsz, max_batch=1, cache_dir=tmp, threads=0)
    classify = ref.head.task.value == "classify"
    samples = [np.ascontiguousarray(p.image.transpose(2, 0, 1)[None], np.float32) / 255
               for p in gate.prepare(calibrate, imgsz, classify=classify)]  # fmt: skip
    model = ov.Core().read_model(str(next(fp32.glob("*.xml"))))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(samples),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(samples),
        ignored_scope=nncf.IgnoredScope(types=FLOAT_OPS),
    )
    out = tmp / "model_int8_openvino_model"
    out.mkdir(parents=True)
    ov.save_model(quantized, str(out / "model.xml"), compress_to_fp16=False)
    shutil.copyfile(fp32 / "metadata.yaml", out / "metadata.yaml")
    check = gate.runner(str(out), "openvino", "int8", imgsz=imgsz, max_batch=1, cache_dir=tmp, threads=0)
    items = gate.prepare(held, imgsz, classify=classify)
    result = gate.score(gate.detections(check, items), gate.detections(ref, items))
    if result.reference == 0:
        raise gate.GateFailed(
            "model.calibration", f"its {len(held)} held-out images (every fourth by name) hold no fp32 "
            "detection: the accuracy gate cannot judge INT8", "add photos with the objects the model finds",
        )  # fmt: skip
    if not result.passed:
        raise gate.GateFailed(
            "model.precision",
            f"int8 matched {result.matched} of fp32's {result.reference} detections ({result.ratio:.1%}) on "
            f"{len(held)} held-out images of model.calibration; the gate is {gate.GATE:.0%} (same class, "
            f"IoU >= {gate.MATCH_IOU})",
            'use precision = "fp32" or "auto", or calibrate on more images like the ones you serve',
        )
    (out / "gate.json").write_text(
        f'{{"matched": {result.matched}, "reference": {result.reference}, "held_out": {len(held)}}}\n'
    )
    return str(out.relative_to(tmp))
