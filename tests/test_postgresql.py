"""The database sink on a real PostgreSQL server, started by the tests: one per test session,
in a temporary directory, listening on a unix socket only (initdb runs as an unprivileged user)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, assets, free_port, photo_like, write_config
from test_database import check_readme_queries

RunDaemon = Callable[..., Daemon]


@dataclass
class Postgres:
    root: Path  # data/ and the socket live here
    port: int
    bindir: Path
    as_user: tuple[str, ...]  # the prefix that runs a command as the server's owner

    def url(self, database: str) -> str:
        return f"postgresql://inferd@/{database}?host={self.root}&port={self.port}"

    def pg_ctl(self, *args: str) -> None:
        log = self.root / "server.log"
        command = [str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(log), "-w", *args]
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-k {self.root} -p {self.port} -c listen_addresses='' -c fsync=off"
        self.pg_ctl("-o", options, "start")

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "stop")

    def query(self, database: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []


def find_bindir() -> Path | None:
    for candidate in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]:
        if candidate:
            return Path(candidate).resolve().parent
    return None


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pytest.importorskip("psycopg", reason="the postgresql extra (psycopg 3) is not installed: run .ci/setup")
    bindir = find_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("PostgreSQL is not installed (.ci/run installs postgresql-15 with apt-get as root)")
    as_user: tuple[str, ...] = ()
    root = Path(tempfile.mkdtemp(prefix="inferd-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ("runuser", "-u", "postgres", "--")
    server = Postgres(root, free_port(), bindir, as_user)
    initdb = [str(bindir / "initdb"), "-D", str(root / "data"), "-U", "inferd", "--auth=trust", "-E", "UTF8"]
    subprocess.run([*as_user, *initdb, "--no-sync"], check=True, capture_output=True, timeout=120)
    server.start()
    try:
        yield server
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def database(postgres: Postgres, name: str) -> str:
    postgres.query("postgres", f"CREATE DATABASE {name}")
    return postgres.url(name)


@pytest.mark.slow
def test_rows_equal_the_json_results(tmp_path: Path, daemon_factory: RunDaemon, postgres: Postgres) -> None:
    url = database(postgres, "e2e")
    config_path = write_config(tmp_path, output={"database": url})
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")
    shutil.copyfile(assets() / "zidane.jpg", incoming / "zidane.jpg")
    (incoming / "bad.jpg").write_bytes(b"not a jpeg")
    for _ in range(2):  # the second run re-drops bus.jpg: its rows are replaced
        daemon = daemon_factory(config_path, "--once")
        assert daemon.proc.wait(120) == 0, daemon.stderr()
        shutil.copyfile(assets() / "bus.jpg", incoming / "bus.jpg")

    images = postgres.query("e2e", "SELECT source, status, reason, width, height, task FROM images ORDER BY source")
    assert images == [
        ("bad.jpg", "failed", "not_an_image", None, None, None),
        ("bus.jpg", "done", None, 810, 1080, "detect"),
        ("zidane.jpg", "done", None, 1280, 720, "detect"),
    ]
    for source in ("bus.jpg", "zidane.jpg"):
        found = postgres.query(
            "e2e",
            "SELECT d.class_id, d.class_name, d.confidence, d.x1, d.y1, d.x2, d.y2, d.payload"
            " FROM detections d JOIN images i ON i.id = d.image_id WHERE i.source = %s ORDER BY d.id",
            source,
        )
        document = json.loads((tmp_path / "var" / "output" / (source + ".json")).read_text())
        expected = [
            (d["class_id"], d["class_name"], d["confidence"], *d["box_xyxy"], None) for d in document["detections"]
        ]
        assert found and found == expected
    assert postgres.query("e2e", "SELECT version FROM inferd_migrations") == [(1,)]
    check_readme_queries(lambda sql: postgres.query("e2e", sql), "postgresql")


@pytest.mark.slow
def test_a_server_restart_mid_stream_loses_and_duplicates_nothing(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path, postgres: Postgres
) -> None:
    url = database(postgres, "restart")
    config_path = write_config(
        tmp_path,
        model={"weights": str(tiny_weights), "devices": ["cpu"]},
        pipeline={"max_pending": 8, "max_batch": 4},
        output={"database": url},
    )
    daemon = daemon_factory(config_path)
    daemon.wait_event("database_connected")
    incoming = tmp_path / "var" / "incoming"
    photo_like(320, 240, seed=1).save(tmp_path / "photo.jpg", quality=85)
    names = sorted(f"{i:02d}.jpg" for i in range(30))
    for name in names:
        shutil.copyfile(tmp_path / "photo.jpg", incoming / name)
    daemon.wait_for(lambda r: r["event"] == "image_done" and len(daemon.events("image_done")) >= 3)
    postgres.stop()
    try:
        daemon.wait_event("database_failed")
        done = {r["path"] for r in daemon.events("image_done")}
        assert len(done) < len(names), "the stream finished before the restart; drop more"
    finally:
        postgres.start()
    daemon.wait_event("database_recovered", timeout_s=120)
    for name in names:
        daemon.wait_event("image_done", path=name, timeout_s=180)
    assert daemon.stop() == 0
    assert [s for (s,) in postgres.query("restart", "SELECT source FROM images ORDER BY source")] == names
    assert sorted(p.name for p in (tmp_path / "var" / "done").iterdir()) == names
