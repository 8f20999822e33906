"""Command line: `inferd run | check | status | bench`, exit statuses, process-wide setup.

Exit statuses: 0 success; 1 runtime failure, or a start that may succeed later (a model load
that timed out, a device process that died while loading); 2 usage error; 78 (EX_CONFIG) a bad
configuration or a model that can never load. Each error carries its own (`daemon.errors`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import structlog
import uvloop

from daemon import __version__, logs
from daemon.config import Config, load, prepare_dirs
from daemon.errors import EXIT_CONFIG as EXIT_CONFIG  # re-exported for callers of the old name
from daemon.errors import EXIT_RUNTIME, EXIT_USAGE, ConfigError, DeviceStartError
from daemon.notify import Notifier
from daemon.threads import name_os_thread


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="inferd", description="Continuous YOLO inference on a hot folder.")
    top.add_argument("--version", action="version", version=f"inferd {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="watch incoming/ and process every image dropped there")
    run.add_argument("--config", type=Path, default=Path("config.toml"), help="config file (default ./config.toml)")
    run.add_argument("--once", action="store_true", help="process what is in incoming/, then exit 0 when drained")
    check = sub.add_parser("check", help="validate the config, export the model (cached), load it on each device")
    check.add_argument("--config", type=Path, default=Path("config.toml"), help="config file (default ./config.toml)")
    from daemon import status

    status.add_arguments(sub.add_parser("status", help="how the daemon of a config is doing (exit 3: not running)"))
    # Its options are the bench's own (bench/cli.py, in a checkout): main() hands it the words after `bench`.
    sub.add_parser("bench", help="measure inferd against the seed designs and the model bound (from a checkout)")
    return top


def setup(config_path: Path) -> Config:
    """Load and validate the config, create the directories, point Ultralytics at our own dirs."""
    config = load(config_path)
    prepare_dirs(config.paths, claim_by_copy=config.intake.claim_by_copy)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config.paths.work / "ultralytics"))
    logs.configure(config.log, process="main", background=True)
    return config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before anything imports Ultralytics (also in spawned workers, which inherit the environment):
    # no network probe, no pip installs at run time.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")  # its banners bypass logging handlers at import
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "status":
        from daemon import status

        return status.main(args)
    from daemon.service import Service

    try:
        config = setup(args.config)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            # aiofiles' and asyncio.to_thread's threads, named for the OS (bench --modes pipeline)
            runner.get_loop().set_default_executor(ThreadPoolExecutor(initializer=name_os_thread, initargs=("io",)))
            if args.command == "check":
                return runner.run(check(config))
            notifier = Notifier.from_environ(os.environ)
            return runner.run(Service(config, once=args.once, notifier=notifier).run())
    except ConfigError as exc:
        sys.stderr.write(f"inferd: {exc}\n")
        return exc.exit_status
    except DeviceStartError as exc:
        structlog.get_logger("daemon.cli").error("start_failed", error=str(exc), permanent=exc.permanent)
        sys.stderr.write(f"inferd: cannot start: {exc}\n")
        return exc.exit_status


def bench(argv: list[str]) -> int:
    """`inferd bench`: the bench is not part of the installed package but lives beside it in a
    checkout (bench/), which it measures; run from anywhere, it is found there."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "bench" / "cli.py").is_file():
        sys.stderr.write(f"inferd bench: runs from a checkout of inferd (bench/ beside daemon/); {checkout} has none\n")
        return EXIT_USAGE
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from bench import cli

    return cli.main(argv)


async def check(config: Config) -> int:
    """Load the model on every configured device and report what was found."""
    from daemon import export
    from daemon.fleet import Fleet
    from daemon.local import resolve_decode
    from daemon.metrics import Metrics
    from daemon.tasks import checkpoint

    log = structlog.get_logger("daemon.cli")
    config = checkpoint.resolve_config(config)
    config = await export.resolve(config)  # the measured choice: logged as runtime_tuned, with its table
    from daemon import sinks

    for sink in sinks.make(config.output, lambda name, up, error: None):
        try:
            await sink.check()
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the check reports it
            log.error("check_failed", key="output.database", error=f"{type(exc).__name__}: {exc}")
            return EXIT_RUNTIME
        finally:
            await sink.close()
        log.info("check_database", database=config.output.database.redacted if config.output.database else None)
    fleet = Fleet(Metrics(), lambda: config, lambda: None, lambda up, error: None)  # local devices, or the cluster's
    try:
        devices = await fleet.resolve(config)
        config = resolve_decode(config, devices)
        for plan in await fleet.prepare(config, devices):  # builds the cache: a later start finds it
            log.info(
                "check_model",
                device=plan.device,
                runtime=plan.runtime,
                precision=plan.precision,
                artefact=plan.artefact,
            )
        made = fleet.make(config, devices)
        try:
            for device in made:
                info = await device.start(config.pipeline.worker_start_timeout_s)
                log.info("check_device", **msgspec.structs.asdict(info))
        finally:
            await asyncio.gather(*(d.stop(10) for d in made))
    finally:
        await fleet.close()
    log.info("check_passed", config=str(config.source), devices=devices)
    return 0
