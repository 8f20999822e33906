"""The runtimes on a Ray cluster's nodes (a real local cluster, the session's `ray_head`): each
node exports, measures ("auto") and calibrates (INT8) for its own hardware, inside the actor's load
(daemon.tuning.node), into the node's own cache.

Named to run before tests/test_cluster.py, whose last test adds a node to the session's head and
kills it (Ray takes a while to mark it dead: an actor placed there meanwhile would die loading)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_cluster import ray_config

pytestmark = pytest.mark.slow


def check_on_the_cluster(config: Path) -> list[dict[str, Any]]:
    """`inferd check` against the cluster: its JSON records."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "daemon", "check", "--config", str(config)], capture_output=True, text=True, timeout=280
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_check_loads_the_model_on_the_cluster(tmp_path: Path, ray_head: Any, tiny_weights: Path) -> None:
    """An exported runtime is exported by the node, for itself, into the node's cache."""
    records = check_on_the_cluster(
        ray_config(tmp_path, ray_head.address, model={"weights": str(tiny_weights), "runtime": "openvino"})
    )
    device = next(r for r in records if r["event"] == "check_device")
    assert device["device"] == "cpu" and device["runtime"] == "openvino" and device["node_ip"]
    assert "inferd-models" in device["artefact"] and device["artefact"].endswith("_openvino_model")
    assert device["tuned"] is None  # an explicit runtime is not measured
    assert next(r for r in records if r["event"] == "check_passed")["devices"] == ["ray:cpu:0"]


def test_auto_on_the_cluster_is_the_nodes_measured_choice(tmp_path: Path, ray_head: Any, tiny_weights: Path) -> None:
    """runtime = "auto": the actor measures runtime x precision x batch size on its node (its
    one layout: 1 process x its threads), reports the table, and runs the winner; the daemon's
    machine measures nothing for it, and the device's batches are capped at the chosen size."""
    config = ray_config(tmp_path, ray_head.address, model={"weights": str(tiny_weights), "runtime": "auto",
                                                            "imgsz": 64}, pipeline={"max_batch": 2})  # fmt: skip
    records = check_on_the_cluster(config)
    device = next(r for r in records if r["event"] == "check_device")
    tuned = device["tuned"]
    print("node's runtime_tuned:", tuned)
    assert (device["runtime"], device["precision"]) == (tuned["runtime"], tuned["precision"])
    assert tuned["layout"] == "1x1" and tuned["batch"] in (1, 2)  # cpus_per_actor 1: one thread
    assert any("(chosen)" in row for row in tuned["table"])
    assert any("onnxruntime fp32 1x1 b1" in row for row in tuned["table"])  # the batch column
    (logged,) = [r for r in records if r["event"] == "runtime_tuned"]  # the node's, as the actor reported it
    assert logged["device"] == "ray:cpu:0" and logged["table"] == tuned["table"]
    assert not [r for r in records if r["event"] == "runtime_tune_started"]  # nothing measured on this machine
    assert "inferd-models" in device["artefact"] or device["runtime"] == "torch"


@pytest.mark.long
def test_int8_on_the_cluster_is_calibrated_on_the_node(tmp_path: Path, ray_head: Any) -> None:
    """precision = "int8": the calibration images travel with the load, the node quantizes and
    gates them (the same set's digest as on this machine), and the actor runs INT8."""
    from test_tuning import folder, photos

    calibration = folder(tmp_path / "calibration", photos())
    config = ray_config(tmp_path, ray_head.address, model={"runtime": "openvino", "precision": "int8", "imgsz": 640,
                        "calibration": str(calibration)}, pipeline={"max_batch": 4})  # fmt: skip
    records = check_on_the_cluster(config)
    device = next(r for r in records if r["event"] == "check_device")
    assert (device["runtime"], device["precision"]) == ("openvino", "int8"), device
    assert "inferd-models" in device["artefact"] and "-int8-" in device["artefact"]
    gate = json.loads((Path(device["artefact"]) / "gate.json").read_text())  # one machine: the node's cache
    assert gate["held_out"] == 2 and gate["matched"] >= 0.95 * gate["reference"] > 0, gate
