"""The database sink on real SQLite files: rows equal the JSON results, one row per source
whatever happens (re-drop, kill -9 of the process group, a locked database), exit 78 on a bad URL."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import Daemon, assets, free_port, http_get, write_config

from daemon import config
from daemon.config import ConfigError

RunDaemon = Callable[..., Daemon]


def rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def detections_by_source(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    found: dict[str, list[tuple[Any, ...]]] = {}
    for source, *detection in rows(
        db,
        "SELECT i.source, d.class_id, d.class_name, d.confidence, d.x1, d.y1, d.x2, d.y2, d.payload"
        " FROM images i JOIN detections d ON d.image_id = i.id ORDER BY i.source, d.id",
    ):
        found.setdefault(source, []).append(tuple(detection))
    return found


def from_json(output: Path, source: str) -> list[tuple[Any, ...]]:
    document = json.loads((output / (source + ".json")).read_text())
    return [(d["class_id"], d["class_name"], d["confidence"], *d["box_xyxy"], None) for d in document["detections"]]


def readme_queries(dialect: str) -> list[str]:
    """The documented SQL (docs/results.md) for `dialect` ("sqlite" or "postgresql"), 'person' read as
    the default model's class 'Normal', in order: at least 3 detections, per hour, failures by reason."""
    text = (Path(__file__).parent.parent / "docs" / "results.md").read_text()
    block = text.split("```sql\n", 1)[1].split("```", 1)[0]
    queries = []
    for chunk in block.split(";"):
        comment = " ".join(line for line in chunk.splitlines() if line.startswith("--")).lower()
        sql = "\n".join(line for line in chunk.splitlines() if not line.startswith("--")).strip()
        both = "same sql" in comment or "both" in comment
        if sql and (both or dialect in comment):
            queries.append(sql.replace("'person'", "'Normal'"))
    return queries


def check_readme_queries(run: Callable[[str], list[tuple[Any, ...]]], dialect: str) -> None:
    """The default model on bus.jpg (4 people at >= 0.5), zidane.jpg (2) and bad.jpg (failed)."""
    crowded, hourly, reasons = readme_queries(dialect)
    assert run(crowded) == [("bus.jpg", 4)]
    assert sum(images for _, images, _ in run(hourly)) == 3 and sum(failed for *_, failed in run(hourly)) == 1
    assert [(reason, n) for reason, n, _ in run(reasons)] == [("not_an_image", 1)]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.slow
def test_rows_equal_the_json_results_and_a_redrop_replaces_them(tmp_path: Path, daemon_factory: RunDaemon) -> None:
    """The embedded default model (real detections) and the default database URL."""
    config_path = write_config(tmp_path)
    var = tmp_path / "var"
    incoming = var / "incoming"
    (incoming / "sub").mkdir(parents=True)
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    shutil.copyfile(assets() / "zidane.jpg", incoming / "sub" / "zidane.jpg")
    (incoming / "bad.jpg").write_bytes(b"not a jpeg")
    first = daemon_factory(config_path, "--once")
    assert first.proc.wait(120) == 0, first.stderr()
    db = var / "results.sqlite3"  # the default: sqlite:///var/results.sqlite3, relative to the config file

    images = {r[0]: r[1:] for r in rows(db, "SELECT source, status, reason, width, height, task, id FROM images")}
    assert set(images) == {"bus.jpg", "sub/zidane.jpg", "bad.jpg"}
    assert images["bus.jpg"][:5] == ("done", None, 810, 1080, "detect")
    assert images["sub/zidane.jpg"][:5] == ("done", None, 1280, 720, "detect")
    assert images["bad.jpg"][:2] == ("failed", "not_an_image")
    found = detections_by_source(db)
    for source in ("bus.jpg", "sub/zidane.jpg"):
        expected = from_json(var / "output", source)
        assert expected, "the default model finds people in both photos"
        assert found[source] == expected  # rounded alike: 1e-6 confidence, 0.01 px
    assert "bad.jpg" not in found
    assert [v for v, _ in rows(db, "SELECT version, description FROM inferd_migrations")] == [1]
    timings = rows(db, "SELECT decode_ms, infer_ms, write_ms, total_ms FROM images WHERE source = 'bus.jpg'")[0]
    assert all(t is not None and t > 0 for t in timings)

    # The same name dropped again: its rows are replaced, not added to.
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    again = daemon_factory(config_path, "--once")
    assert again.proc.wait(120) == 0, again.stderr()
    assert rows(db, "SELECT count(*) FROM images") == [(3,)]
    assert rows(db, "SELECT id FROM images WHERE source = 'bus.jpg'") == [(images["bus.jpg"][5],)]  # kept its id
    assert detections_by_source(db) == found
    assert rows(db, "PRAGMA foreign_key_check") == []
    check_readme_queries(lambda sql: rows(db, sql), "sqlite")


@pytest.mark.slow
def test_kill_9_of_the_process_group_leaves_each_source_once(tmp_path: Path, daemon_factory: RunDaemon) -> None:
    """The default model on real photos: detections to double, were a batch committed twice."""
    # imgsz 320: the default model still finds people and a bus in them, at a quarter of the compute
    config_path = write_config(tmp_path, model={"imgsz": 320}, pipeline={"max_pending": 12, "max_batch": 4})
    var = tmp_path / "var"
    incoming = var / "incoming"
    incoming.mkdir(parents=True)
    names = {f"img{i:02d}.jpg" for i in range(40)}
    for i, name in enumerate(sorted(names)):
        shutil.copyfile(assets() / ("bus.jpg", "zidane.jpg")[i % 2], incoming / name)
    rng = random.Random(14)
    for _ in range(2):
        # The daemon leads a process group of its own (conftest), device processes included.
        daemon = daemon_factory(config_path)
        needed = rng.randint(3, 12)
        daemon.wait_for(lambda r, d=daemon, n=needed: r["event"] == "image_done" and len(d.events("image_done")) >= n)
        os.killpg(daemon.proc.pid, signal.SIGKILL)  # power loss, as far as processes can tell
        daemon.kill()
        assert len(files(var / "done")) < len(names), "the stream finished before the kill; kill sooner"
    final = daemon_factory(config_path, "--once")
    assert final.proc.wait(300) == 0, final.stderr()

    db = var / "results.sqlite3"
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    sources = [s for (s,) in rows(db, "SELECT source FROM images WHERE status = 'done'")]
    assert sorted(sources) == sorted(names) == files(var / "done")  # each source exactly once
    assert rows(db, "SELECT count(*) FROM images") == [(len(names),)]
    found = detections_by_source(db)
    assert sum(len(v) for v in found.values()) > 0
    for name in names:  # no detection doubled by a batch done twice
        assert found.get(name, []) == from_json(var / "output", name)


@pytest.mark.slow
def test_a_locked_database_pauses_intake_and_then_everything_lands(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    port = free_port()
    config_path = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"]},
        pipeline={"max_pending": 3},
        metrics={"listen": f"127.0.0.1:{port}"},
        output={"database": "sqlite:///results/inferd.sqlite3"},
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    daemon = daemon_factory(config_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    daemon.wait_event("database_connected")
    db = tmp_path / "results" / "inferd.sqlite3"
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
        incoming = tmp_path / "var" / "incoming"
        names = [f"{i}.jpg" for i in range(8)]
        for name in names:
            shutil.copyfile(assets() / "bus.jpg", incoming / name)
        failed = daemon.wait_event("database_failed")
        assert "locked" in failed["error"] and failed["retry_in_s"] == 0.5
        daemon.wait_for(lambda r: r["event"] == "database_failed" and r["attempt"] == 2)  # retried, not given up
        while True:
            message = notify.recv(4096).decode()
            if message.startswith("STATUS=database unavailable"):
                break
        status, body = http_get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503 and "database" in body
        assert files(tmp_path / "var" / "done") == []  # nothing released before its rows are committed
        # Intake paused: at most max_pending claimed, the rest still waits in incoming/.
        assert len(files(tmp_path / "var" / "work" / "processing")) <= 3
        assert len(files(incoming)) >= len(names) - 3
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    daemon.wait_event("database_recovered")
    for name in names:
        daemon.wait_event("image_done", path=name, timeout_s=180)
    status, _ = http_get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200
    _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert 'inferd_sink_up{sink="database"} 1.0' in text
    counter = 'inferd_sink_failures_total{sink="database"}'
    failures = next(line for line in text.splitlines() if line.startswith(counter))
    assert float(failures.split()[-1]) >= 2
    assert daemon.stop() == 0
    notify.close()
    assert sorted(s for (s,) in rows(db, "SELECT source FROM images")) == sorted(names)
    assert files(tmp_path / "var" / "done") == sorted(names)


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("mysql://user@host/db", "postgresql://user@host/db"),
        ("sqlite://relative.sqlite3", "sqlite:///relative/path.sqlite3"),
        ("sqlite:///", "sqlite:///relative/path.sqlite3"),
        ("postgresql://user@host:port/db", "postgresql://user@host:5432/db"),
        ("postgresql://user@/db?host=/run&port=x", "?port=5432"),
        ("results.sqlite3", '"sqlite:///var/results.sqlite3"'),
    ],
)
def test_a_bad_url_names_the_key_and_the_fix(tmp_path: Path, url: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse({"output": {"database": url}}, base=tmp_path)
    assert err.value.key == "output.database" and fix in str(err.value)


def test_urls_resolve_like_the_other_paths(tmp_path: Path) -> None:
    cfg = config.parse({}, base=tmp_path)
    assert cfg.output.database is not None and cfg.output.database.path == tmp_path / "var" / "results.sqlite3"
    absolute = config.parse({"output": {"database": "sqlite:////srv/r.sqlite3"}}, base=tmp_path).output.database
    assert absolute is not None and absolute.path == Path("/srv/r.sqlite3")
    assert config.parse({"output": {"database": ""}}, base=tmp_path).output.database is None
    pg = config.parse({"output": {"database": "postgresql://bob:secret@db.lan:5433/inferd"}}, base=tmp_path)
    assert pg.output.database is not None and pg.output.database.dialect == "postgresql"
    assert pg.output.database.redacted == "postgresql://bob:***@db.lan:5433/inferd"


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_bad_url_stops_the_start_with_exit_78(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, output={"database": "mongodb://localhost/results"})
    result = run_cli(tmp_path, "run", "--once", "--config", str(config_path))
    assert result.returncode == 78
    assert "output.database" in result.stderr and "Fix:" in result.stderr


def test_a_missing_driver_stops_the_start_with_exit_78(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked" / "psycopg"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("no module named psycopg (blocked by the test)")\n')
    config_path = write_config(tmp_path, output={"database": "postgresql://inferd@/inferd?host=/nowhere"})
    result = run_cli(
        tmp_path, "run", "--once", "--config", str(config_path), env={"PYTHONPATH": str(tmp_path / "blocked")}
    )
    assert result.returncode == 78, result.stderr
    assert "output.database" in result.stderr and "psycopg" in result.stderr and "pip install" in result.stderr


def outcome(name: str, boxes: int) -> Any:
    import numpy as np

    from daemon.jobs import Inferred, Job, ModelInfo, Prepared
    from daemon.tasks.detect import Boxes

    job = Job(PurePosixPath(name), Path("/nowhere") / name, timings_ms={"decode": 1.0, "infer": 2.0})
    prepared = Prepared(job, np.zeros((1, 1, 3), np.uint8), 640, 480, 1, (1.0, 1.0), (0, 0))
    rows = np.array([[10, 20, 30, 40, 0.9, 0]] * boxes, dtype=np.float32).reshape(-1, 6)
    return Inferred(prepared, Boxes(rows), "cpu:0", 4, ModelInfo("m.pt", {0: "person"}, 640, False))


def test_rows_the_database_refuses_fail_alone_and_the_rest_of_the_batch_commits(tmp_path: Path) -> None:
    """In process: one batch of four, one row breaking a CHECK constraint, one name not UTF-8."""
    import asyncio
    import dataclasses

    from daemon.checks import DatabaseUrl
    from daemon.sinks import SinkError
    from daemon.sinks.database import _Pending, open_database
    from daemon.sinks.rows import image_row

    path = tmp_path / "r.sqlite3"
    states: list[bool] = []
    db = open_database(DatabaseUrl("sqlite", path, str(path)), fsync=False, on_state=lambda up, e: states.append(up))

    async def main() -> list[BaseException | None]:
        runner = asyncio.create_task(db.run())
        loop = asyncio.get_running_loop()
        bad = dataclasses.replace(image_row(outcome("bad.jpg", 1)), status="half-done")
        futures = [loop.create_future() for _ in range(4)]
        for name, future in zip(("a.jpg", "b.jpg", "c\udcff.jpg"), futures, strict=False):  # c: not UTF-8
            await db._queue.put(_Pending(image_row(outcome(name, 2)), future))
        await db._queue.put(_Pending(bad, futures[3]))  # all four queued: one batch
        results = await asyncio.gather(*futures, return_exceptions=True)
        runner.cancel()
        await db.close()
        return results

    results = asyncio.run(main())
    assert results[:3] == [None, None, None] and isinstance(results[3], SinkError)
    assert "CHECK constraint" in str(results[3])
    assert rows(path, "SELECT source, status FROM images ORDER BY source") == [
        ("a.jpg", "done"),
        ("b.jpg", "done"),
        ("c\\xff.jpg", "done"),  # the byte that is not UTF-8, escaped
    ]
    assert rows(path, "SELECT count(*) FROM detections") == [(6,)]
    assert states == [True]


def test_a_reload_keeps_the_running_database_and_says_a_restart_is_needed(tmp_path: Path) -> None:
    from daemon import reload
    from daemon.local import resolve_decode

    running = resolve_decode(config.parse({}, base=tmp_path), ["cpu:0"])  # as the service resolved it
    new = config.parse({"output": {"database": "sqlite:///other.sqlite3", "fsync": False}}, base=tmp_path)
    plan = reload.plan(running, new, ["cpu:0"])
    assert (plan.ignored, plan.changed, plan.roll) == (["output.database"], ["output.fsync"], False)
    assert plan.new.output.database == running.output.database and plan.new.output.fsync is False


def test_every_task_gives_rows_from_its_json_result() -> None:
    """The rows of a segment, pose, obb and classify result: box columns in source pixels, the
    task's geometry in payload, classify's top 5 as ranked rows over the whole image."""
    import numpy as np

    from daemon.jobs import Inferred, Job, ModelInfo, Prepared
    from daemon.sinks.rows import image_row
    from daemon.tasks.classify import Probs
    from daemon.tasks.obb import Rotated
    from daemon.tasks.pose import Keypoints
    from daemon.tasks.segment import Masks

    box = np.array([[10, 20, 110, 220, 0.9, 0]], np.float32)
    payloads = {
        "segment": Masks(box, [np.array([[10, 20], [110, 20], [60, 220]], np.float32)]),
        "pose": Keypoints(box, np.array([[[15, 25, 0.8], [100, 200, 0.4]]], np.float32)),
        "obb": Rotated(np.array([[60, 120, 100, 50, np.pi / 2, 0.8, 0]], np.float32)),
        "classify": Probs(np.array([1, 0]), np.array([0.7, 0.3], np.float32)),
    }
    rows = {}
    for task, payload in payloads.items():
        job = Job(PurePosixPath(f"{task}.jpg"), Path("/nowhere"))
        prepared = Prepared(job, np.zeros((1, 1, 3), np.uint8), 640, 480, 1, (1.0, 1.0), (0, 0))
        row = image_row(Inferred(prepared, payload, "cpu:0", 1, ModelInfo("m.pt", {0: "a", 1: "b"}, 640, False)))
        assert row.task == task
        rows[task] = row.detections
    (seg,), (pose,), (obb,) = rows["segment"], rows["pose"], rows["obb"]
    assert (seg.x1, seg.y1, seg.x2, seg.y2) == (10, 20, 110, 220) and len(seg.payload["polygon"]) == 3
    assert pose.payload["keypoints"][0] == [15.0, 25.0, 0.8]
    assert (obb.x1, obb.y1, obb.x2, obb.y2) == pytest.approx((35, 70, 85, 170), abs=0.01)  # turned a quarter
    assert obb.payload["xywhr"][:4] == [60, 120, 100, 50] and len(obb.payload["corners"]) == 4
    assert [(d.class_name, d.confidence, d.payload) for d in rows["classify"]] == [
        ("b", pytest.approx(0.7), {"rank": 1}),
        ("a", pytest.approx(0.3), {"rank": 2}),
    ]
    assert all((d.x1, d.y1, d.x2, d.y2) == (0, 0, 640, 480) for d in rows["classify"])
