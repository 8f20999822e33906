"""`inferd status [--config F] [--json]`: how a running daemon is doing, from its state file.

The daemon keeps `paths.work/inferd.status.json` (daemon/state.py); this reads it, checks that
the process that wrote it is still the one running (its pid, start time and boot id), and
prints a short summary, or the object itself with --json. No connection to the daemon is
needed, so it works with the metrics endpoint off, and it reads nothing but that one file.

Exit statuses follow the LSB's for `status`: 0 running (also while it starts or drains);
3 not running: no state file, a daemon that stopped, or a state file left by a process that is
gone (killed, crashed; LSB's 1, "dead and pid file exists", is also given by 3 here, as
`systemctl status` does, so scripts have one code to test); 4 unknown: the config or the file
cannot be read (under systemd the work directory is the inferd group's: run it as a member).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import state
from daemon.config import ConfigError, load

EXIT_RUNNING = 0
EXIT_NOT_RUNNING = 3
EXIT_UNKNOWN = 4
STALE_AFTER_S = 3 * state.HEARTBEAT_S  # a live daemon that has not written for this long is stuck


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("config.toml"), help="config file (default ./config.toml)")
    p.add_argument("--json", action="store_true", help="print the state as one JSON object")


def main(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"inferd status: {exc}\n")
        return EXIT_UNKNOWN
    file = state.path(config.paths.work)
    try:
        found = state.read(file)
    except FileNotFoundError:
        return report(args, {"running": False, "state_file": str(file)}, f"inferd is not running: no {file}")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"inferd status: cannot read {file}: {exc}\n")
        return EXIT_UNKNOWN
    running = found.get("phase") != state.Phase.STOPPED.value and state.is_alive(found)
    now = datetime.now(UTC)
    age_s = (now - _when(found["updated_at"])).total_seconds() if found.get("updated_at") else None
    view = {"running": running, "state_file": str(file), "updated_s_ago": age_s, **found}
    if running:
        return report(args, view, "\n".join(summary(view, now, args.config)))
    if found.get("phase") == state.Phase.STOPPED.value:
        line = f"inferd is not running: it stopped at {_clock(found.get('stopped_at'))}"
    else:
        line = (
            f"inferd is not running: pid {found['pid']} ended without stopping (killed or crashed);"
            f" its last state was written at {_clock(found.get('updated_at'))}"
        )
    return report(args, view, f"{line} ({_counts(found)})")


def report(args: argparse.Namespace, view: dict[str, Any], text: str) -> int:
    sys.stdout.write((json.dumps(view, indent=2) if args.json else text) + "\n")
    return EXIT_RUNNING if view["running"] else EXIT_NOT_RUNNING


def summary(s: dict[str, Any], now: datetime, config: Path) -> list[str]:
    """The human summary of a running daemon's state `s`."""
    since = s.get("serving_since") or s["started_at"]
    doing = "serving" if s["phase"] == "serving" else s["phase"]
    lines = [
        f"inferd is running: pid {s['pid']}, {doing} since {_clock(since)}"
        f" (up {duration((now - _when(s['started_at'])).total_seconds())})",
        f"  config        {s.get('config')}",
    ]
    if s.get("config") and Path(s["config"]) != config.absolute():
        lines.append(f"  note          this state was written by the daemon of {s['config']}, not {config}")
    lines.append("  devices       " + (", ".join(map(_device, s.get("devices", []))) or "none"))
    if "done" in s:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(s["failed_by_reason"].items()))
        lines += [
            f"  images        {s['done']} done, {s['failed']} failed" + (f" ({reasons})" if reasons else "")
            + f", {s['in_flight']} in flight",
            "  queues        " + ", ".join(f"{q} {n}" for q, n in s["queues"].items()),
            f"  throughput    {s['images_per_s_1min']:.1f} img/s over the last {duration(s['rate_window_s'])}",
        ]  # fmt: skip
    if e := s.get("last_error"):
        lines.append(f"  last error    {_clock(e['ts'])} {e['event']} {_fields(e)}")
    if f := s.get("last_failure"):
        lines.append(f"  last failure  {_clock(f['ts'])} {f.get('path')}: {f.get('reason')} ({f.get('error')})")
    if s.get("metrics"):
        lines.append(f"  metrics       {s['metrics']}")
    age = s.get("updated_s_ago")
    lines.append(f"  state file    {s['state_file']}" + (f", written {duration(age)} ago" if age is not None else ""))
    if age is not None and age > STALE_AFTER_S:
        lines.append(f"  warning       not updated for {duration(age)}: its event loop may be stuck")
    return lines


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 04 min, 3 d 02 h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def _device(d: dict[str, Any]) -> str:
    extra = [f"pid {d['pid']}"] if d.get("pid") else []
    if d.get("restarts"):
        extra.append(f"{d['restarts']} restart" + ("s" if d["restarts"] > 1 else ""))
    return f"{d['device']} {d['state']}" + (f" ({', '.join(extra)})" if extra else "")


def _counts(s: dict[str, Any]) -> str:
    text = f"{s.get('done', 0)} done, {s.get('failed', 0)} failed"
    if s.get("in_flight") and s.get("phase") != state.Phase.STOPPED.value:
        text += f", {s['in_flight']} in flight (taken up again at the next start)"
    return text


def _fields(e: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in e.items() if k not in ("ts", "level", "event"))


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _clock(iso: str | None) -> str:
    return _when(iso).strftime("%Y-%m-%d %H:%M:%S UTC") if iso else "an unknown time"
