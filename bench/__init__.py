"""`inferd bench`: inferd measured against seed 002's designs and the model's own bound.

It lives beside the package, not in it: a checkout runs it (`inferd bench`, `python -m daemon
bench`), an installed wheel has no bench. Read top to bottom:

- cli.py       options, the run of every mode asked for, the plain-text report
- images.py    the generated photo-like JPEGs (the tests draw theirs from it too)
- harness.py   the daemon as a child process, its JSON log lines as they come (the tests' too)
- baselines.py seed 002's and seed 000's loops on Ultralytics' `predict`
- bound.py     the daemon's own Runner on ready tensors: the ceiling
- runs.py      `inferd run --once`, latency and backlog runs of the real daemon
- plot.py      the report as a PNG
"""

from __future__ import annotations

from typing import Any


class BenchError(Exception):
    """A run did not complete as it must (missing results, bad exit status); no number is reported."""


def rate(images: int, seconds: float, **extra: Any) -> dict[str, Any]:
    """A mode's result: images, seconds, images/s and whatever else it measured."""
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, **extra}


def torch_device(name: str) -> str:
    """cpu:1 names the daemon's second CPU process; to torch (and Ultralytics) it is the CPU."""
    return "cpu" if name.startswith("cpu") else name
