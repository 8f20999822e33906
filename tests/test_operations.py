"""What an operator sees: the progress bar on a terminal, `inferd status`, the bench's chart and
the Grafana dashboard. Real daemons, a real pseudo-terminal, a real scrape."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Callable
from fcntl import ioctl
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, free_port, photo_like, write_config
from prometheus_client.parser import text_string_to_metric_families

from daemon import state, status

RunDaemon = Callable[..., Daemon]
REPO = Path(__file__).parent.parent
DASHBOARD = REPO / "grafana" / "inferd.json"
TIMEOUT_S = 120


def drop(incoming: Path, good: int, bad: int = 0) -> list[str]:
    """`good` small JPEGs and `bad` files that are not images, each renamed into place whole."""
    incoming.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(good + bad):
        name = f"img{i}.jpg" if i < good else f"bad{i}.jpg"
        tmp = incoming / f".{name}.tmp"
        if i < good:
            photo_like(160, 120, seed=i).save(tmp, "JPEG", quality=90)
        else:
            tmp.write_bytes(b"this is not an image")
        tmp.rename(incoming / name)
        names.append(name)
    return names


class Terminal:
    """`command` with stdout and stderr on a pseudo-terminal 150 columns wide, read as it writes."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
        self.proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, close_fds=True)
        os.close(slave)
        self.out = bytearray()
        self.ended = False

    def read_until(self, predicate: Callable[[str], bool], timeout_s: float = TIMEOUT_S) -> str:
        """Read until `predicate(all output so far)` holds, or (predicate None) until end of file."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self.text) and not self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not seen within {timeout_s} s; the terminal ends with {bytes(self.out[-800:])!r}")
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    chunk = b""
                self.out += chunk
                self.ended = not chunk
        return self.text

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    def finish(self, timeout_s: float = TIMEOUT_S) -> tuple[int, str]:
        """Its exit status and everything it wrote, once it has closed the terminal."""
        self.read_until(lambda _: False, timeout_s)
        return self.proc.wait(timeout_s), self.text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def screen_lines(text: str) -> list[str]:
    """What is left on each terminal line: a carriage return starts the line over."""
    lines = []
    for line in text.split("\n"):
        segments = [s for s in line.split("\r") if s.strip()]
        if segments:
            lines.append(segments[-1])
    return lines


def segments(text: str) -> list[str]:
    return [s for line in text.split("\n") for s in line.split("\r")]


def test_once_on_a_terminal_shows_a_bar(tmp_path: Path, tiny_weights: Path) -> None:
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "imgsz": 160}, log={"format": "auto"})
    drop(tmp_path / "var" / "incoming", good=4, bad=1)
    terminal = Terminal([sys.executable, "-m", "daemon", "run", "--once", "--config", str(config)], tmp_path)
    try:
        code, out = terminal.finish()
    finally:
        terminal.close()
    assert code == 0, out[-2000:]
    final = screen_lines(out)
    last_bar = [line for line in final if line.startswith("inferd ") and "ETA" in line][-1]
    assert "5/5" in last_bar and "100%" in last_bar and "img/s" in last_bar, last_bar
    assert "1 failed" in last_bar and "0 in flight" in last_bar, last_bar
    assert sum("image_done" in line for line in final) == 4
    assert any("image_failed" in line for line in final)
    assert "daemon_stopped" in final[-1] and "inferd " not in final[-1]


def test_status_line_on_a_terminal_and_log_lines_above_it(tmp_path: Path, tiny_weights: Path) -> None:
    """Files dropped while the status line is drawn: each log line they bring prints whole, above it."""
    config = write_config(tmp_path, model={"weights": str(tiny_weights), "imgsz": 160}, log={"format": "auto"})
    terminal = Terminal([sys.executable, "-m", "daemon", "run", "--config", str(config)], tmp_path)
    try:
        terminal.read_until(lambda out: "devices up" in out)
        names = drop(tmp_path / "var" / "incoming", good=3, bad=1)
        terminal.read_until(lambda out: "0 in flight, 3 done, 1 failed," in out)
        terminal.proc.send_signal(signal.SIGTERM)
        code, out = terminal.finish()
    finally:
        terminal.close()
    assert code == 0, out[-2000:]
    lines = [s for s in segments(out) if "devices up" in s]
    assert lines[0].startswith("inferd: 0 in flight, 0 done, 0 failed, 0.0 img/s, 1/1 devices up"), lines[0]
    logged = [s for s in segments(out) if "image_done" in s or "image_failed" in s]
    assert len(logged) == len(names)
    for segment in logged:  # a log line glued to the status line would share its segment
        assert "devices up" not in segment and segment.startswith("["), segment
    assert "daemon_stopped" in screen_lines(out)[-1]


def wait_for_state(file: Path, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> dict[str, Any]:
    """The state file's content once `predicate` holds, woken by the file's changes."""
    from watchfiles import watch

    def current() -> dict[str, Any] | None:
        try:
            found = state.read(file)
        except (OSError, ValueError):
            return None
        return found if predicate(found) else None

    deadline = time.monotonic() + timeout_s
    if (found := current()) is not None:
        return found
    for _ in watch(file.parent, debounce=20, rust_timeout=1000, yield_on_timeout=True, recursive=False):
        if (found := current()) is not None:
            return found
        if time.monotonic() > deadline:
            break
    raise TimeoutError(f"{file} did not reach the expected state in {timeout_s} s: {current() or file.read_text()}")


def inferd_status(config: Path, *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stderr == "", proc.stderr
    return proc.returncode, proc.stdout


def test_status_of_two_instances_then_stopped_then_stale(
    tmp_path: Path, daemon_factory: RunDaemon, tiny_weights: Path
) -> None:
    port = free_port()
    model = {"weights": str(tiny_weights), "imgsz": 160}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config_a = write_config(tmp_path / "a", model=model, metrics={"listen": f"127.0.0.1:{port}"})
    config_b = write_config(tmp_path / "b", model=model)
    a, b = daemon_factory(config_a), daemon_factory(config_b)
    a.wait_event("daemon_started")
    b.wait_event("daemon_started")
    names = drop(tmp_path / "a" / "var" / "incoming", good=2, bad=1)
    for name in names[:2]:
        a.wait_event("image_done", path=name)
    a.wait_event("image_failed", path=names[2])
    file_a = tmp_path / "a" / "var" / "work" / state.FILE_NAME
    wait_for_state(file_a, lambda s: s.get("done") == 2 and s.get("failed") == 1)

    code, text = inferd_status(config_a)
    assert code == 0, text
    assert text.startswith(f"inferd is running: pid {a.proc.pid}, serving since "), text
    assert "2 done, 1 failed (not_an_image 1), 0 in flight" in text
    assert "cpu:0 up (pid " in text and f"metrics       http://127.0.0.1:{port}/metrics" in text
    assert re.search(r"last failure +\S+ \S+ UTC bad2\.jpg: not_an_image", text), text
    assert "img/s over the last" in text and "jobs 0, ready 0, outcomes 0, batching 0" in text

    code, text = inferd_status(config_a, "--json")
    view = json.loads(text)
    assert code == 0 and view["running"] is True and view["phase"] == "serving"
    assert view["pid"] == a.proc.pid and view["config"] == str(config_a)
    assert (view["done"], view["failed"], view["failed_by_reason"]) == (2, 1, {"not_an_image": 1})
    assert [(d["device"], d["state"]) for d in view["devices"]] == [("cpu:0", "up")]
    assert view["images_per_s_1min"] > 0 and view["last_failure"]["path"] == "bad2.jpg"

    # The other instance's own file: its pid, nothing of a's; a device process killed there is its last error.
    os.kill(b.wait_event("daemon_started")["pids"][0], signal.SIGKILL)
    b.wait_event("worker_restarted")
    file_b = tmp_path / "b" / "var" / "work" / state.FILE_NAME
    wait_for_state(file_b, lambda s: s["devices"][0]["restarts"] == 1 and s["devices"][0]["state"] == "up")
    code, text = inferd_status(config_b, "--json")
    other = json.loads(text)
    assert code == 0 and other["pid"] == b.proc.pid and other["done"] == 0 and other["state_file"] != view["state_file"]
    assert other["last_error"]["event"] == "worker_exited" and other["last_error"]["device"] == "cpu:0"
    code, text = inferd_status(config_b)
    assert "cpu:0 up (pid " in text and ", 1 restart)" in text and "last error" in text and "worker_exited" in text

    scrape_and_check_dashboard(port)

    running = file_a.read_text()
    assert a.stop() == 0
    code, text = inferd_status(config_a)
    assert code == 3 and text.startswith("inferd is not running: it stopped at "), text
    assert "(2 done, 1 failed)" in text
    code, text = inferd_status(config_a, "--json")
    assert code == 3 and json.loads(text)["running"] is False and json.loads(text)["phase"] == "stopped"

    file_a.write_text(running)  # as a daemon killed by SIGKILL leaves it
    code, text = inferd_status(config_a)
    assert code == 3 and f"pid {a.proc.pid} ended without stopping" in text, text
    # A live process that took the pid over is not the daemon: its start time differs.
    file_a.write_text(json.dumps({**json.loads(running), "pid": os.getpid()}))
    code, text = inferd_status(config_a)
    assert code == 3 and "ended without stopping" in text, text
    assert b.stop(signal.SIGINT) == 0


def test_status_without_a_state_file_or_a_config(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, text = inferd_status(config)
    assert code == 3 and text == f"inferd is not running: no {tmp_path / 'var' / 'work' / state.FILE_NAME}\n"
    assert json.loads(inferd_status(config, "--json")[1])["running"] is False
    (tmp_path / "var" / "work").mkdir(parents=True)
    (tmp_path / "var" / "work" / state.FILE_NAME).write_text("{half a fi")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "status", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 4 and "cannot read" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "status", "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 4 and "does not exist" in proc.stderr


def test_last_problems_keep_the_last_error_and_failure() -> None:
    import logging

    problems = state.LastProblems()

    def log(level: int, msg: object) -> None:
        assert problems.filter(logging.LogRecord("daemon", level, "", 0, msg, None, None))

    log(logging.ERROR, {"event": "internal_error", "stage": "results", "exc_info": ValueError("boom"), "ts": "t1"})
    log(logging.WARNING, {"event": "image_failed", "path": "a.jpg", "reason": "not_an_image", "ts": "t2"})
    log(logging.WARNING, {"event": "reload_needs_restart", "keys": ["paths.incoming"]})
    assert problems.error == {
        "ts": "t1",
        "level": "error",
        "event": "internal_error",
        "stage": "results",
        "exception": "ValueError: boom",
    }
    assert problems.failure == {
        "ts": "t2",
        "level": "warning",
        "event": "image_failed",
        "path": "a.jpg",
        "reason": "not_an_image",
    }
    log(logging.CRITICAL, "a plain stdlib line")
    assert problems.error is not None and problems.error["event"] == "a plain stdlib line"


def test_durations_read_as_a_person_says_them() -> None:
    assert [status.duration(s) for s in (4.25, 42, 185, 7440, 266400)] == [
        "4.2 s",
        "42 s",
        "3 min 05 s",
        "2 h 04 min",
        "3 d 02 h",
    ]


PROMQL_WORDS = frozenset(
    {"sum", "count", "avg", "min", "max", "rate", "irate", "increase", "histogram_quantile", "label_values"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
)


def queried_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values query) reads."""
    expr = re.sub(r"label_values\(([^,]+),\s*\w+\)", r"\1", expr)  # its second argument is a label
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL_WORDS


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p["targets"]]
    queries += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return queries


def test_dashboard_is_grafana_json_with_a_query_per_panel() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["schemaVersion"] >= 36
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "job", "instance"]
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert queried_metrics(target["expr"]), target["expr"]
            assert '{job=~"$job", instance=~"$instance"}' in target["expr"], target["expr"]
    assert queried_metrics('histogram_quantile(0.5, sum by (le, stage) (rate(x_bucket{a="b"}[5m])))') == {"x_bucket"}


def scrape_and_check_dashboard(port: int) -> None:
    """Every metric the dashboard queries is in a scrape of the running daemon."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    exported = set()
    for family in text_string_to_metric_families(exposition):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        exported |= {family.name + s for s in suffixes} | {s.name for s in family.samples}
    wanted = set().union(*map(queried_metrics, dashboard_queries()))
    assert wanted and wanted <= exported, sorted(wanted - exported)
    assert {"inferd_images_done_total", "inferd_stage_seconds_bucket", "process_resident_memory_bytes"} <= wanted


@pytest.mark.slow
def test_bench_plot_writes_a_png_headless(tmp_path: Path, tiny_weights: Path, bench_models: Path) -> None:
    """A GUI backend asked for and no display: the chart is drawn on Agg all the same."""
    plot = tmp_path / "bench.png"
    command = [sys.executable, "-m", "daemon", "bench", "--size", "160x120", "--count", "3", "--imgsz", "160"]
    command += ["--weights", str(tiny_weights), "--devices", "cpu", "--modes", "naive,inferd"]
    command += ["--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "r.json"), "--plot", str(plot)]
    command += ["--models", str(bench_models)]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"
    proc = subprocess.run(command, capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "inferd/naive" in proc.stdout and proc.stderr == ""  # no bar: stderr is not a terminal
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800 and height >= 300 and len(png) > 10_000
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["setup"]["machine"]
    # The same chart in a fresh interpreter: drawn on an Agg canvas, pyplot never imported.
    code = (
        "import json, sys; from pathlib import Path; from bench import plot;"
        f"f = plot.chart(json.loads(Path({str(tmp_path / 'r.json')!r}).read_text()), Path({str(plot)!r}));"
        "print(type(f.canvas).__name__, 'matplotlib.pyplot' in sys.modules);"
        "print(plot.title(json.loads(Path(" + repr(str(tmp_path / "r.json")) + ").read_text())))"
    )
    checkout = str(Path(__file__).resolve().parent.parent)  # the bench is not installed: it is beside daemon/
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=checkout
    )
    assert out.returncode == 0, out.stderr
    first, *title = out.stdout.splitlines()
    assert first == "FigureCanvasAgg False"
    assert "3 images 160x120" in title[0] and report["setup"]["machine"] in title[1]
    assert title[2].startswith("inferd/naive ")
