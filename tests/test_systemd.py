"""The systemd units: accepted by systemd's own parser, and the settings the daemon relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"
SERVICE = UNITS / "inferd.service"
TEMPLATE = UNITS / "inferd@.service"


def directives(unit: Path) -> dict[str, list[str]]:
    """Key -> values in order, comments and section headers skipped."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify(unit: Path, tmp_path: Path, name: str) -> None:
    """`systemd-analyze verify` on a copy whose ExecStart names an existing binary.

    verify exits 0 on mere warnings (unknown key, unparsable value), so --recursive-errors=no
    makes warnings about the named unit fail it, and its output must not mention the unit at all.
    Lines about other units on the machine are not ours to judge.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", unit.read_text())
    (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--recursive-errors=no", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    stem = name.split("@")[0]
    ours = [line for line in output.splitlines() if stem in line or str(tmp_path) in line]
    assert result.returncode == 0 and not ours, output


def test_service_verifies(tmp_path: Path) -> None:
    verify(SERVICE, tmp_path, "inferd.service")


def test_template_verifies(tmp_path: Path) -> None:
    verify(TEMPLATE, tmp_path, "inferd@cameras.service")


def test_verify_catches_a_typo(tmp_path: Path) -> None:
    broken = tmp_path / "src" / "inferd.service"
    broken.parent.mkdir()
    broken.write_text(SERVICE.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    with pytest.raises(AssertionError, match="kill mode"):
        verify(broken, tmp_path, "inferd.service")


@pytest.mark.parametrize("unit", [SERVICE, TEMPLATE], ids=lambda p: p.name)
def test_settings_the_daemon_relies_on(unit: Path) -> None:
    d = directives(unit)
    single = {key: values[-1] for key, values in d.items()}
    assert single["Type"] == "notify"
    assert single["NotifyAccess"] == "main"
    assert single["RestartPreventExitStatus"] == "78"  # errors.EXIT_CONFIG
    assert single["Restart"] == "on-failure"
    assert single["WatchdogSec"] == "30"
    assert single["KillMode"] == "mixed"
    assert single["CapabilityBoundingSet"] == ""
    assert single["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert single["DevicePolicy"] == "closed"
    assert "char-nvidia-uvm rw" in d["DeviceAllow"]
    assert "PrivateDevices" not in d  # it would hide the GPUs
    # The drain (30 s) and the device processes' stop (10 s) fit in the stop timeout.
    assert int(single["TimeoutStopSec"]) >= 30 + 10
    # Model load (worker_start_timeout_s, 120 s) fits in the start timeout.
    assert int(single["TimeoutStartSec"]) > 120
    assert single["ExecStart"].split()[1:3] == ["run", "--config"]
    assert single["ExecStartPre"] == "-+/usr/bin/nvidia-modprobe -u -c=0"  # /dev/nvidia-uvm, outside the sandbox


def test_template_is_per_instance() -> None:
    single = {key: values[-1] for key, values in directives(TEMPLATE).items()}
    assert single["ExecStart"].endswith("--config /etc/inferd/%i.toml")
    assert single["StateDirectory"] == "inferd/%i"
    assert single["WorkingDirectory"] == "/var/lib/inferd/%i"
    assert single["ReadWritePaths"] == "/var/lib/inferd/%i"
    assert "RemoveIPC" not in single  # instances share the user; see the unit's comment


@pytest.mark.parametrize("name", ["ray-head.service", "ray-node.service"])
def test_ray_units_verify(tmp_path: Path, name: str) -> None:
    verify(UNITS / name, tmp_path, name)
