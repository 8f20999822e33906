"""A real Ray cluster for the tests: `ray start` nodes as separate processes.

Each node is `ray start --block` in a process group of its own, so stopping it (SIGTERM, or
SIGKILL for a crash) ends exactly its processes, never another cluster's on this machine (`ray
stop` would end every Ray process of the user). Every port a node opens is picked free, so two
clusters can run side by side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))
RUNNING = "Ray runtime started"  # what `ray start` logs once its processes run


class Node:
    def __init__(self, args: list[str], temp_dir: Path, log: Path) -> None:
        self.args = args
        self.temp_dir = temp_dir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts_seen = 0  # "Ray runtime started" lines in the log so far

    def start(self) -> None:
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
        }
        extra = [f"{k}={v}" for k, v in ports.items()]
        # The actors unpickle tests/faulty_model.py's model by name, as local device processes do.
        path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")) if p)
        # The node's own temp dir: its actors' model cache (tempfile.gettempdir()/inferd-models) is
        # this cluster's, made fresh each session and removed with it.
        tmp = self.temp_dir.parent / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": path, "TMPDIR": str(tmp)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}", *self.args, *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_started(self, timeout_s: float) -> None:
        """Until this node's log says "Ray runtime started" (a new line since this start)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while self.log.read_text(errors="replace").count(RUNNING) <= self.starts_seen:
            try:
                code = self.proc.wait(timeout=0.2)  # a wait on the process, which may exit
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ray start not up in {timeout_s} s: {self.log.read_text()[-2000:]}") from None
                continue
            raise RuntimeError(f"ray start exited {code}: {self.log.read_text()[-2000:]}")
        self.starts_seen += 1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """End every process of this node (its process group); SIGKILL by default (a crash)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):  # workers that outlived the raylet
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


class RayCluster:
    """A head (`--num-cpus`, no dashboard) and optional worker nodes, all local processes."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must be short
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        head = [
            "--head",
            f"--port={self.port}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-port={free_port()}",
        ]
        self.head = Node(head, self.root / "head", self.root / "head.log")
        self.workers: list[Node] = []

    def start(self, timeout_s: float = 120) -> RayCluster:
        self.head.start()
        try:
            self.wait_up(timeout_s)
        except BaseException:  # a fixture whose setup fails gets no teardown: leave no head behind
            self.stop()
            raise
        return self

    def wait_up(self, timeout_s: float = 120) -> None:
        """Until `ray start` logs that the node's processes run (each wait is on the process:
        one that exits fails at once)."""
        self.head.wait_started(timeout_s)

    def add_node(self, num_cpus: int = 1, resources: str = "") -> Node:
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={resources}")
        node = Node(args, self.root / f"node{len(self.workers)}", self.root / f"node{len(self.workers)}.log")
        node.start()
        self.workers.append(node)
        return node

    def stop(self) -> None:
        """SIGKILL every node: a test cluster keeps nothing worth a graceful stop (`ray start
        --block` takes ~30 s to end on SIGTERM)."""
        for node in self.workers:
            node.kill()
        self.head.kill()
        shutil.rmtree(self.root, ignore_errors=True)
