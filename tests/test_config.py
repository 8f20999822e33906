"""Config validation: every kind of bad config names the key, says the fix, and exits 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config
from daemon.errors import EXIT_CONFIG


def parse(text: str, tmp_path: Path) -> config.Config:
    import tomllib

    return config.parse(tomllib.loads(text), base=tmp_path)


def test_defaults_resolve_against_the_config_directory(tmp_path: Path) -> None:
    cfg = parse("", tmp_path)
    assert cfg.paths.incoming == tmp_path / "var" / "incoming"
    assert cfg.model.devices == ("auto",)
    assert (cfg.model.runtime, cfg.model.precision) == (config.Runtime.AUTO, config.Precision.AUTO)
    assert cfg.output.on_success is config.OnSuccess.MOVE
    assert cfg.pipeline.preprocess_threads == 0  # auto


def test_repository_config_is_valid_and_documents_every_key() -> None:
    root = Path(__file__).parent.parent
    text = (root / "config.toml").read_text()
    cfg = config.load(root / "config.toml")
    assert cfg.model.weights == config.DEFAULT_WEIGHTS
    for section, keys in config.DEFAULTS.items():
        assert f"[{section}]" in text
        for key in keys:
            line = next(line for line in text.splitlines() if line.startswith(f"{key} "))
            assert "#" in line, f"{section}.{key} has no comment in config.toml"


@pytest.mark.parametrize(
    ("text", "key", "fix"),
    [
        ("[model]\nwieghts = 'x'", "model.wieghts", "remove it or use one of"),
        ("[modle]\nweights = 'x'", "modle", "use one of"),
        ("[model]\nimgsz = 'big'", "model.imgsz", "whole number"),
        ("[model]\nimgsz = 100", "model.imgsz", "multiple of 32"),
        ("[model]\nconf = 1.5", "model.conf", "between 0.0 and 1.0"),
        ("[model]\ndevices = ['gpu0']", "model.devices", '["cuda:0", "cuda:1"]'),
        ("[model]\ndevices = ['cpu', 'cpu']", "model.devices", "each device once"),
        ("[pipeline]\nmax_batch = 0", "pipeline.max_batch", "between 1 and 256"),
        ("[pipeline]\nreduced_decode = 'yes'", "pipeline.reduced_decode", "true or false"),
        ("[output]\nformats = ['xml']", "output.formats", "entries from"),
        ("[output]\nformats = []", "output.formats", "at least one"),
        ("[output]\non_success = 'archive'", "output.on_success", "one of"),
        ("[log]\nformat = 'xml'", "log.format", "one of"),
        ("paths = 3", "paths", "[paths]"),
        ("[model]\nhalf = true", "model.half", 'precision = "fp16"'),
        ("[model]\nhalf = 'auto'", "model.half", 'precision = "auto"'),
        ("[model]\nruntime = 'tensorflow'", "model.runtime", "'openvino'"),
        ("[model]\nprecision = 'int4'", "model.precision", "'bf16'"),
        ("[model]\nprecision = 'int8'", "model.calibration", "a folder of images"),  # INT8 is calibrated on it
        ("[model]\ncalibration = 'no-such-folder'", "model.calibration", "a folder of images"),
        ("[model]\ncalibration = 3", "model.calibration", "quote it"),
    ],
)
def test_bad_values_name_key_and_fix(tmp_path: Path, text: str, key: str, fix: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        parse(text, tmp_path)
    assert err.value.key == key
    assert fix in str(err.value)


def test_directory_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    cfg = parse("[paths]\noutput = 'afile/out'", tmp_path)
    with pytest.raises(config.ConfigError) as err:
        config.prepare_dirs(cfg.paths)
    assert err.value.key == "paths.output"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[model]\nimgsz = 'big'\n", "model.imgsz"),
        ("[model\n", "not valid TOML"),
        ("[paths]\nincoming = 'f/in'\n", "paths.incoming"),
        ("[model]\nhalf = true\n", 'precision = "fp16"'),
    ],
)
def test_cli_exits_78_with_the_message(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "f").write_text("a file, not a directory")
    (tmp_path / "bad.toml").write_text(text)
    for command in ("run", "check"):
        result = run_cli(command, "--config", "bad.toml", cwd=tmp_path)
        assert result.returncode == EXIT_CONFIG, result.stderr
        assert needle in result.stderr
        assert "Fix:" in result.stderr or "TOML" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("run", "--config", "nope.toml", cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG
    assert "nope.toml does not exist" in result.stderr


def test_version_and_help(tmp_path: Path) -> None:
    from daemon import __version__

    assert run_cli("--version", cwd=tmp_path).stdout.strip() == f"inferd {__version__}"
    helped = run_cli("--help", cwd=tmp_path)
    assert helped.returncode == 0
    for command in ("run", "check", "bench"):
        assert command in helped.stdout


@pytest.mark.parametrize(
    ("text", "key", "fix"),
    [
        ("[cluster]\nbackend = 'slurm'", "cluster.backend", "'ray'"),
        ("[cluster]\nbackend = 'ray'\naddress = 'headnode'", "cluster.address", '"host:6379"'),
        ("[cluster]\naddress = 'ray://head:99999'", "cluster.address", '"ray://host:10001"'),
        ("[cluster]\naddress = 6379", "cluster.address", '"auto"'),
        ("[cluster]\nactors_per_gpu = 0", "cluster.actors_per_gpu", "between 1 and 16"),
        ("[cluster]\ncpu_actors = -1", "cluster.cpu_actors", "between 0 and 256"),
        ("[cluster]\ncpus_per_actor = 'two'", "cluster.cpus_per_actor", "a number"),
        ("[cluster]\nresources = { inferd = 0 }", "cluster.resources", "ray start --resources"),
        ("[cluster]\nresources = { GPU = 1 }", "cluster.resources", "cluster.actors_per_gpu"),
        ("[cluster]\nbackend = 'ray'\n[model]\ndevices = ['cuda:0']", "model.devices", "one actor per GPU"),
        ("[cluster]\nmax_restarts = 3", "cluster.max_restarts", "remove it or use one of"),
    ],
)
def test_bad_cluster_values_name_key_and_fix(tmp_path: Path, text: str, key: str, fix: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        parse(text, tmp_path)
    assert err.value.key == key
    assert fix in str(err.value)


def test_int8_runs_on_the_ray_backend(tmp_path: Path) -> None:
    """The nodes calibrate it on the images sent with the load (daemon.tuning.node): not refused."""
    cfg = parse("[cluster]\nbackend = 'ray'\n[model]\nprecision = 'int8'\ncalibration = '.'", tmp_path)
    assert cfg.model.precision is config.Precision.INT8 and cfg.cluster.backend is config.Backend.RAY


def test_cluster_addresses(tmp_path: Path) -> None:
    for address in ("", "auto", "10.1.2.3:6379", "head.example:6379", "ray://head:10001"):
        cfg = parse(f"[cluster]\nbackend = 'ray'\naddress = '{address}'", tmp_path)
        assert (cfg.cluster.backend, cfg.cluster.address) == (config.Backend.RAY, address)
    cfg = parse("[cluster]\nresources = { inferd = 1 }", tmp_path)
    assert cfg.cluster.backend is config.Backend.LOCAL and cfg.cluster.resources == (("inferd", 1.0),)


def test_the_local_backend_never_imports_ray(tmp_path: Path) -> None:
    """The daemon's modules, the cluster package included, import no ray: only its driver process does."""
    code = (
        "import sys, daemon.cli, daemon.service, daemon.local, daemon.cluster, daemon.config as c;"
        "daemon.cluster.Cluster(c.load(None));"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_ray_backend_without_ray_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from daemon import cluster

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(config.ConfigError) as err:
        cluster.Cluster(parse("[cluster]\nbackend = 'ray'", tmp_path))
    assert err.value.key == "cluster.backend" and "pip install 'inferd[ray]'" in str(err.value)
