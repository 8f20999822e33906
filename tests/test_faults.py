"""Crash safety: kill -9 at random moments, restart, and account for every input."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Daemon, photo_like, write_config

RunDaemon = Callable[..., Daemon]


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir())


@pytest.mark.slow
def test_kill_9_five_times_loses_nothing(tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"], "imgsz": 64},  # the kills are the test, not the model
        pipeline={"max_pending": 16, "max_batch": 4, "cpu_workers": 2},  # two device processes die with it
    )
    var = tmp_path / "var"
    incoming = var / "incoming"
    (incoming / "sub").mkdir(parents=True)
    names = set()
    for i in range(200):
        if i < 8:
            photo_like(320, 240, seed=i).save(tmp_path / f"s{i}.jpg", quality=85)
        name = f"sub/img{i:03d}.jpg" if i % 4 == 0 else f"img{i:03d}.jpg"
        (incoming / name).write_bytes((tmp_path / f"s{i % 8}.jpg").read_bytes())
        names.add(name)
    rng = random.Random(1234)
    done_before = 0
    for _ in range(5):
        daemon = daemon_factory(config)
        needed = rng.randint(1, 25)

        def enough(record: dict[str, object], d: Daemon = daemon, n: int = needed) -> bool:
            return record["event"] == "image_done" and len(d.events("image_done")) >= n

        daemon.wait_for(enough)  # kill at a random moment: after a random number of results
        daemon.kill()  # SIGKILL: no drain, no cleanup
        done_before = len(files(var / "done"))
        assert done_before < 200, "the stream finished before the last kill; kill sooner"
    final = daemon_factory(config, "--once")
    assert final.proc.wait(300) == 0, final.stderr()
    final.stop()

    done = {str(p.relative_to(var / "done")) for p in files(var / "done")}
    assert done == names  # 200/200, nothing lost, nothing failed
    assert files(incoming) == [] and files(var / "work" / "processing") == []
    outputs = files(var / "output")
    assert [p for p in outputs if p.name.startswith(".")] == []  # no temp files left behind
    jsons = {str(p.relative_to(var / "output")).removesuffix(".json") for p in outputs if p.suffix == ".json"}
    assert jsons == names
    for p in outputs:  # every result is complete
        if p.suffix == ".json":
            assert json.loads(p.read_text())["source"] == str(p.relative_to(var / "output")).removesuffix(".json")
    assert files(var / "failed") == []


@pytest.mark.slow
def test_second_signal_exits_at_once_and_loses_nothing(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    config = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"]},
        pipeline={"drain_timeout_s": 120.0, "max_pending": 32},
    )
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    for i in range(60):
        photo_like(640, 480, seed=i).save(incoming / f"{i:02d}.jpg", quality=85)
    daemon = daemon_factory(config)
    daemon.wait_event("image_done")
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_event("draining")
    assert daemon.stop(signal.SIGTERM, timeout_s=30) == 0
    assert daemon.events("forced_stop")
    var = tmp_path / "var"
    seen = {p.name for p in files(var / "done")} | {p.name for p in files(incoming)}
    seen |= {p.name for p in files(var / "work" / "processing")}
    assert seen == {f"{i:02d}.jpg" for i in range(60)}
