"""`inferd bench`: its plumbing on tiny inputs with a random-init model. No timing thresholds:
the numbers depend on the machine; what is tested is that every one is measured and reported."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import bench
from bench import cli, cpu, fake_model, images, pipeline, runs


def run_bench(tmp_path: Path, weights: Path, models: Path, *args: str) -> tuple[dict[str, Any], str]:
    """`python -m daemon bench` on 320x240 images, with the session's model cache; returns the JSON
    report and the printed table."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "daemon", "bench", "--size", "320x240", "--weights", str(weights)]
    command += ["--devices", "cpu", "--workdir", str(tmp_path / "work"), "--json", str(report)]
    command += ["--models", str(models), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text()), proc.stdout


def test_options() -> None:
    args = cli.parser().parse_args(["--size", "2048x12000", "--backlog", "10000,1000", "--modes", "naive"])
    assert (args.size, args.backlog, args.modes, args.count, args.batch) == (
        (2048, 12000),
        [1000, 10000],
        ("naive",),
        50,
        8,
    )
    for bad in (["--size", "12"], ["--modes", "naive,fast"], ["--count", "0"], ["--backlog", "0"], ["--rate", "x"]):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(bad)


@pytest.mark.parametrize("package", ["daemon", "bench"])
def test_parser_imports_no_model_code(package: str) -> None:
    """`inferd --help` and `inferd bench --help` stay fast: building the parser imports neither
    torch nor Ultralytics."""
    code = f"import sys; from {package} import cli; cli.parser(); print({{'torch', 'ultralytics'}} & set(sys.modules))"
    checkout = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=checkout)
    assert out.stdout.strip() == "set()"


def test_bench_runs_from_the_checkout_wherever_it_is_called(tmp_path: Path) -> None:
    """The bench is not in the installed package: `inferd bench` finds it beside daemon/."""
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "bench", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: inferd bench") and "--modes" in proc.stdout


def test_generated_images_compress_like_photos() -> None:
    """Neither noise (~0.9 bytes/pixel at quality 90) nor flat (~0.02): photos are ~0.1-0.5."""
    image = images.photo_like(320, 240, seed=7)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=90)
    assert 0.08 < len(jpeg.getvalue()) / (320 * 240) < 0.6
    assert images.photo_like(320, 240, seed=7).tobytes() == image.tobytes()


@pytest.mark.slow
def test_throughput_modes_are_measured_and_compared(tmp_path: Path, tiny_weights: Path, bench_models: Path) -> None:
    report, table = run_bench(tmp_path, tiny_weights, bench_models, "--count", "3")
    modes = report["modes"]
    assert list(modes) == list(cli.DEFAULT_MODES)
    processes = len(report["setup"]["devices"])  # the bound runs one Runner per device process
    assert modes["bound"]["threads"].startswith(f"{processes}x")
    for mode, result in modes.items():
        images = 3 * processes if mode == "bound" else 3
        assert result["images"] == images
        assert result["images_per_s"] > 0
        assert result["images_per_s"] == pytest.approx(images / result["seconds"])
        assert mode in table
    for other in ("naive", "naive_export", "seed002", "seed000", "bound"):
        expected = modes["inferd"]["images_per_s"] / modes[other]["images_per_s"]
        assert report["ratios"][f"inferd/{other}"] == pytest.approx(expected)
    assert modes["bound"]["input_shape"] == "640x480"
    bounds = report["bounds"]  # every candidate this machine has, the daemon's (measured) choice first
    assert next(iter(bounds)) == modes["bound"]["runtime"] and {"torch fp32", "openvino fp32"} <= set(bounds)
    fastest = max(bounds.values(), key=lambda b: b["images_per_s"])
    assert bounds[report["fastest_bound"]] is fastest
    assert report["ratios"]["inferd/fastest_bound"] == pytest.approx(
        modes["inferd"]["images_per_s"] / fastest["images_per_s"]
    )
    assert modes["naive_export"]["runtime"] == "openvino fp32"  # Ultralytics' own export, as a user makes it
    assert report["tuned"] and any("(chosen)" in line for line in report["tuned"])  # the measured choice
    assert report["single_image_ms"] > 0
    for mode in ("naive", "naive_export", "seed002", "seed000"):  # each wrote its own labels
        assert len(list((tmp_path / "work" / mode).glob("*.txt"))) == 3
    assert len(list((tmp_path / "work" / "inferd" / "output").glob("*.json"))) == 3


@pytest.mark.slow
def test_latency(tmp_path: Path, tiny_weights: Path, bench_models: Path) -> None:
    report, table = run_bench(tmp_path, tiny_weights, bench_models, "--latency", "--count", "3", "--rate", "4")
    latency = report["latency"]
    assert report["modes"] == {}  # --latency alone measures latency only
    assert latency["files"] == 3
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert latency["p50_over_single_image"] == pytest.approx(latency["p50_ms"] / report["single_image_ms"])
    assert "p99" in table


@pytest.mark.slow
def test_backlog(tmp_path: Path, tiny_weights: Path, bench_models: Path) -> None:
    report, table = run_bench(tmp_path, tiny_weights, bench_models, "--backlog", "40,20")
    runs = report["backlog"]["runs"]
    assert [r["images"] for r in runs] == [20, 40]
    assert all(r["rss_mib"] > 0 and r["images_per_s"] > 0 for r in runs)
    assert report["backlog"]["rss_ratio"] == pytest.approx(runs[1]["rss_mib"] / runs[0]["rss_mib"])
    assert "peak RSS" in table


@pytest.mark.slow
def test_a_daemon_that_cannot_start_fails_the_bench(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "daemon", "bench", "--size", "64x48", "--count", "1", "--modes", "inferd"]
    command += ["--weights", str(tmp_path / "missing.pt"), "--devices", "cpu", "--json", str(tmp_path / "r.json")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 1
    assert "exited with status 78" in proc.stderr
    assert not (tmp_path / "r.json").exists() and proc.stdout == ""


def test_cpu_by_stage_adds_up_to_the_process() -> None:
    """Named threads go to their stage; unnamed ones and ended ones to `other`; device processes apart."""
    before = cpu.Sample(10, 1.0, {10: ("python", 0.5), 11: ("preprocess", 0.25), 12: ("ended", 0.25)}, {20: 1.0})
    after = cpu.Sample(
        10, 3.0, {10: ("python", 1.5), 11: ("preprocess", 0.5), 13: ("io", 0.25), 14: ("python", 0.5)}, {20: 2.0}
    )
    usage = cpu.usage(before, after, images=4)
    assert usage["main_ms_per_image"] == pytest.approx(500)
    stages = usage["by_stage_ms_per_image"]
    assert list(stages) == list(cpu.ORDER)
    assert stages == pytest.approx({"loop": 250, "decode": 62.5, "io": 62.5, "log": 0, "database": 0, "other": 125})
    assert usage["threads"] == {"loop": 1, "decode": 1, "io": 1, "log": 0, "database": 0, "other": 1}
    assert usage["device_ms_per_image"] == pytest.approx(250)


def test_threads_get_os_names_the_bench_can_read() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from daemon.threads import name_os_thread

    with ThreadPoolExecutor(1, initializer=name_os_thread, initargs=("preprocess",)) as pool:
        tid = pool.submit(threading.get_native_id).result()
        assert cpu.sample(os.getpid()).threads[tid][0] == "preprocess"


def test_the_instant_model_answers_five_boxes_in_the_heads_shape() -> None:
    import torch

    x = torch.zeros(3, 3, 64, 96)
    out = fake_model.prediction(3, 64, 96, 80, torch.tensor([8.0, 16.0, 32.0]), x)
    assert out.shape == (3, 84, 8 * 12 + 4 * 6 + 2 * 3)
    assert int((out[:, 4:].amax(dim=1) > 0.25).sum()) == 3 * len(fake_model.BOXES)


@pytest.mark.slow
def test_pipeline_mode_reports_the_main_process_cpu_by_stage(
    tmp_path: Path, tiny_weights: Path, bench_models: Path
) -> None:
    count = 24
    earlier = tmp_path / "before.json"  # an earlier run, as --json wrote it: this one is compared with it
    earlier.write_text(
        json.dumps(
            {"pipeline": {d: {"images_per_s": 2.0, "cpu": {"main_ms_per_image": 4.0}} for d in ("host", "device")}}
        )
    )
    args = ("--modes", "pipeline", "--count", str(count), "--imgsz", "64", "--compare", str(earlier))
    report, table = run_bench(tmp_path, tiny_weights, bench_models, *args)
    assert report["modes"] == {}  # the pipeline has its own section: its model is a stand-in
    pipeline = report["pipeline"]
    for decode in ("host", "device"):
        run = pipeline[decode]
        assert run["images"] == count and run["images_per_s"] == pytest.approx(count / run["seconds"])
        usage = run["cpu"]
        stages = usage["by_stage_ms_per_image"]
        assert list(stages) == list(cpu.ORDER)
        assert sum(stages.values()) == pytest.approx(usage["main_ms_per_image"])
        assert usage["main_ms_per_image"] > 0 and stages["loop"] > 0
        # the daemon named its threads: each stage is found
        assert usage["threads"]["loop"] == 1 and usage["threads"]["log"] == 1 and usage["threads"]["database"] == 1
        assert usage["threads"]["decode"] >= 1 and usage["threads"]["io"] >= 1
        assert usage["device_processes"] >= 1 and usage["device_ms_per_image"] >= 0
        output = tmp_path / "work" / f"pipeline-{decode}" / "output"
        for i in range(count):  # every image's files, with the instant model's boxes in them
            name = f"img-{i:05d}.jpg"
            assert len((output / f"{name}.txt").read_text().splitlines()) == len(fake_model.BOXES)
            assert len(json.loads((output / f"{name}.json").read_text())["detections"]) == len(fake_model.BOXES)
        assert f"  {decode} " in table
        assert pipeline["compared"][decode] == pytest.approx(
            {"images_per_s": run["images_per_s"] / 2, "main_ms_per_image": usage["main_ms_per_image"] / 4}
        )
        assert f"{decode} against --compare: images/s x" in table
    assert "pipeline: every stage real but the model" in table


def test_compare_needs_a_pipeline_report() -> None:
    with pytest.raises(bench.BenchError, match="no pipeline section"):
        pipeline.compare({}, {"modes": {}})


@pytest.mark.slow
def test_cluster_mode_reports_the_ray_path_against_local(
    tmp_path: Path, tiny_weights: Path, bench_models: Path, ray_head: Any
) -> None:
    report, table = run_bench(
        tmp_path, tiny_weights, bench_models, "--cluster", ray_head.address, "--count", "6", "--imgsz", "64"
    )
    section = report["cluster"]
    assert section["address"] == ray_head.address and not report["modes"]
    for backend in ("local", "ray"):
        assert section[backend]["images"] == 6 and section[backend]["images_per_s"] > 0
    ms = 1000 / section["ray"]["images_per_s"] - 1000 / section["local"]["images_per_s"]
    assert section["overhead_ms_per_image"] == pytest.approx(ms)
    assert "overhead of the Ray path" in table


def test_a_rerun_in_the_same_workdir_starts_clean_and_shares_the_models(tmp_path: Path) -> None:
    """`--workdir` kept: the second run's folders are new (no FileExistsError, no stale results),
    and every run finds the bench's one model cache."""
    args = cli.parser().parse_args(["--count", "1"])
    first = runs.new_run(tmp_path, "inferd", args)
    Path(first["paths"]["incoming"]).mkdir()
    (Path(first["paths"]["output"]) / "old").mkdir(parents=True)
    (tmp_path / "work" / "models" / "entry").write_text("exported once")
    again = runs.new_run(tmp_path, "inferd", args)
    assert again == first
    assert not Path(again["paths"]["incoming"]).exists() and not Path(again["paths"]["output"]).exists()
    assert (Path(again["paths"]["work"]) / "models" / "entry").read_text() == "exported once"
    shared = tmp_path / "shared"
    runs.share_models(tmp_path / "other", shared)
    assert (tmp_path / "other" / "work" / "models").resolve() == shared.resolve()
