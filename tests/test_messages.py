"""The inter-process messages (daemon/messages.py): each crosses a real pipe (pickled, numpy answers
as they are) and the exporter's records a JSON line as they did before; anything else is refused."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from daemon import messages as m
from daemon.config import LogConfig, LogFormat
from daemon.errors import ProtocolError
from daemon.tasks.detect import Boxes

INFO = m.DeviceInfo(
    device="cuda:0", weights="w.pt", task="detect", names={0: "person", 1: "car"}, half=True, runtime="tensorrt",
    precision="fp16", artefact="w.engine", max_batch=8, fixed_shape=(384, 640), format="engine", pinned=True,
    pipelined=True, pid=4242, node="node-3", node_ip="10.0.0.3",
)  # fmt: skip
SPEC = m.DeviceSpec(
    device="cpu", weights="w.pt", imgsz=640, precision="auto", max_det=300, torch_threads=2,
    log=LogConfig("info", LogFormat.JSON), name="cpu:1", calibration=("a.jpg",), buffer_path="/dev/shm/x",
    slot_bytes=10, slots=2,
)  # fmt: skip
BATCH = m.Batch(7, 1, 2, 384, 640, [(0.5, 0.5, 0, 12, 1280, 720)] * 2, 0.25, 0.7, [(1000, 1), (2000, 6)])
BOXES = Boxes(np.array([[1.0, 2.0, 3.0, 4.0, 0.9, 1.0]], np.float32))

PIPED: list[Any] = [
    SPEC,
    BATCH,
    m.SetLevel("debug"),
    m.Stop(),
    m.Ready(INFO),
    m.LoadFailed("ModelError: no such file", True),
    m.BatchDone(7, [BOXES, "cannot decode: corrupt JPEG data"], 12.5),
    m.BatchRaised(7, "oom", "CUDA out of memory"),
    m.Request(3, m.StartActor("ray:gpu:0#1", SPEC, "/w.pt", {"num_gpus": 1})),
    m.Request(4, m.Infer("ray:gpu:0#1", BATCH, np.arange(12, dtype=np.uint8))),
    m.Request(5, m.StopActor("ray:gpu:0#1")),
    m.Request(6, m.AskResources()),
    m.Request(None, m.SetLevel("warning")),
    m.Reply(3, m.Ready(INFO)),
    m.Reply(5, None),
    m.Reply(6, {"GPU": 2.0, "CPU": 16.0}),
    m.ActorLost("ray:gpu:0#1", "RayActorError: the actor died"),
    m.Connected({"GPU": 0.0, "CPU": 2.0, "nodes": 1.0, "cpu_nodes": 1.0}),
    m.Unreachable("ConnectionError: no head"),
    m.LoadCandidate({"runtime": "openvino", "image": np.zeros((2, 2, 3), np.uint8)}),
    m.Loaded(),
    m.Go(1.5, 4),
    m.Timed(64, 1.52),
]


def same(a: Any, b: Any) -> bool:
    """Equal, numpy arrays (and payloads holding them) compared by value."""
    return pickle.dumps(a) == pickle.dumps(b)


def test_every_message_crosses_a_pipe_whole() -> None:
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    with ours, theirs:
        for message in PIPED:
            ours.send(message)
            back = theirs.recv()
            assert type(back) is type(message)
            assert same(back, message), message


def test_numpy_answers_stay_numpy() -> None:
    """A batch's answers travel pickled as they were: arrays, not msgpack lists."""
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    with ours, theirs:
        ours.send(m.BatchDone(1, [BOXES], 3.0))
        done = theirs.recv()
    assert isinstance(done.answers[0].data, np.ndarray) and done.answers[0].data.dtype == np.float32
    np.testing.assert_array_equal(done.answers[0].data, BOXES.data)


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        m.Stop().x = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        INFO.pid = 1  # type: ignore[misc]


def test_device_info_survives_msgpack() -> None:
    """READY's info is plain data: it round-trips through msgpack too (names' int keys included)."""
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(m.Ready(INFO)), type=m.Ready)
    assert back == m.Ready(INFO) and back.info.names == {0: "person", 1: "car"}


RECORDS: list[m.Record] = [
    m.ExportStarted("openvino", "int8"),
    m.TuneStarted(),
    m.PlanMade("openvino", "fp32", "/cache/x/model.xml", built=True, export_s=3.2),
    m.Tuned("openvino", "int8", 1, 2, 8, [{"runtime": "torch", "img_s": 8.5, "note": ""}], 41.0, ""),
    m.ExportFailed("ExportError", "nncf is not installed"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_exporter_records_round_trip_as_json_lines(record: m.Record) -> None:
    line = m.encode_record(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert m.decode_record(line) == record


def test_exporter_lines_keep_their_event_names() -> None:
    """The wire format of before (an `event` key per line), so a line reads the same in a log."""
    assert msgspec.json.decode(m.encode_record(m.PlanMade("torch", "fp32", "w.pt"))) == {
        "event": "plan", "runtime": "torch", "precision": "fp32", "artefact": "w.pt", "built": False, "export_s": 0.0,
    }  # fmt: skip
    assert m.decode_record('{"event": "export_started", "runtime": "onnxruntime", "precision": "fp32"}') == (
        m.ExportStarted("onnxruntime", "fp32")
    )


@pytest.mark.parametrize(
    "line",
    [b"Ultralytics 8.4 export", b"[1, 2]", b'{"event": "export_done"}', b'{"event": "plan", "runtime": "x"}', b"{}"],
)
def test_a_stray_line_is_not_a_record(line: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        m.decode_record(line)


def test_an_unknown_message_is_refused_clearly() -> None:
    with pytest.raises(ProtocolError, match=r"device process: unexpected message tuple: \('done', 1"):
        m.refuse(("done", 1, [], 2.0), "device process")


def test_the_device_loop_refuses_an_old_tuple() -> None:
    """The device process's loop (model.serve's), fed a message of the old dialect."""
    from daemon import model

    class Idle:
        pipelined = False

    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    with theirs:
        with ours:
            ours.send(m.SetLevel("info"))
            ours.send(None)  # the stop of before: no longer a message
        with pytest.raises(ProtocolError, match="device process: unexpected message NoneType"):
            model._serve_batches(Idle(), theirs)  # type: ignore[arg-type]


def test_the_bridge_refuses_an_old_tuple() -> None:
    """The daemon's side of the Ray driver, handed an answer of the old dialect."""
    from daemon.cluster.bridge import Bridge
    from daemon.config import ClusterConfig

    bridge = Bridge(ClusterConfig(), LogConfig("info", LogFormat.JSON))
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    with ours, theirs:
        bridge._conn = theirs
        ours.send(("ok", 1, None))
        with pytest.raises(ProtocolError, match=r"the Ray bridge: unexpected message tuple: \('ok', 1, None\)"):
            bridge._on_message()


@pytest.mark.parametrize(("precision", "answer", "code"), [("fp32", m.PlanMade, 0), ("int8", m.ExportFailed, 1)])
def test_the_exporter_child_speaks_records(tmp_path: Path, precision: str, answer: type, code: int) -> None:
    """The real child (`python -m daemon.tuning`): PyTorch needs no export (its plan), and INT8 is
    no PyTorch precision (its error)."""
    import json
    import subprocess
    import sys

    request = {"weights": str(tmp_path / "w.pt"), "imgsz": 64, "max_batch": 1, "runtime": "torch",
               "precision": precision, "device": "cpu", "cache_dir": str(tmp_path)}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "daemon.tuning", json.dumps(request)], capture_output=True, timeout=120)
    records = [m.decode_record(line) for line in out.stdout.splitlines()]
    assert out.returncode == code and [type(r) for r in records] == [answer], out


def test_the_ray_driver_refuses_an_old_tuple() -> None:
    """The driver process's dispatch (no Ray needed to refuse), handed a request of the old dialect."""
    from daemon.cluster.driver import Driver
    from daemon.config import ClusterConfig

    class NoRay:
        @staticmethod
        def remote(cls: type) -> type:
            return cls

    driver = Driver(NoRay(), ClusterConfig(), None)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"the Ray driver: unexpected message tuple: \('resources', 1\)"):
        driver._dispatch(("resources", 1))
