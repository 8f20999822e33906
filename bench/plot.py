"""`inferd bench --plot PATH`: the bench's report as one PNG, read at a glance.

Left, img/s per mode (inferd in its own colour, the bound drawn as the ceiling it is); right,
where an image's time went in the daemon (the median of each stage). The title names the
machine, the model, the images and the ratios. matplotlib's object API on its Agg canvas: no
pyplot, so no GUI backend is chosen, no $DISPLAY is needed and no global state is changed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAGES = ("queue_ms", "decode_ms", "batch_wait_ms", "infer_ms", "write_ms", "total_ms")
COLOURS = {"inferd": "#d62728", "bound": "#bbbbbb"}
BASELINE = "#1f77b4"
DPI = 120


def machine(devices: list[str]) -> str:
    """'Intel(R) Xeon(R) ... (2 cores)' and the GPU names: what the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [f"{cpu} ({os.cpu_count()} cores)"]
    if any(d.startswith("cuda") for d in devices):
        import torch

        names = [torch.cuda.get_device_name(int(d.partition(":")[2] or 0)) for d in devices if d.startswith("cuda")]
        parts += [f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)]
    return ", ".join(parts)


def title(report: dict[str, Any]) -> str:
    s = report["setup"]
    model = Path(s["weights"]).name
    lines = [
        f"inferd bench: {s['count']} images {s['size']}, {model}, imgsz {s['imgsz']}, batch {s['max_batch']},"
        f" decode {s['decode']}",
        f"{s.get('machine') or machine(s['devices'])}; devices {','.join(s['devices'])}",
    ]
    if ratios := report.get("ratios"):
        lines.append("   ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> Figure:
    """Write the report's chart to `path` (PNG) and return the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes: dict[str, dict[str, Any]] = report["modes"]
    medians = {k: v for k, v in modes.get("inferd", {}).get("medians", {}).items() if k in STAGES}
    panels = 1 + bool(medians)
    figure = Figure(figsize=(6.5 * panels, 1.6 + 0.45 * max(len(modes), len(medians), 3)), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    _rates(axes[0], modes)
    if medians:
        batch = modes["inferd"]["medians"].get("batch")
        _stages(axes[1], medians, batch)
    figure.suptitle(title(report), fontsize=9, x=0.01, horizontalalignment="left")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return figure


def number(x: float) -> str:
    """1234 -> '1234', 56.78 -> '56.8', 0.873 -> '0.87': no exponents on a bar."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _rates(ax: Any, modes: dict[str, dict[str, Any]]) -> None:
    if not modes:  # --latency or --backlog alone
        ax.text(0.5, 0.5, "no throughput mode in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    names = list(modes)[::-1]  # the first mode on top
    rates = [modes[m]["images_per_s"] for m in names]
    labels = ["bound (ceiling)" if m == "bound" else m for m in names]
    bars = ax.barh(labels, rates, color=[COLOURS.get(m, BASELINE) for m in names])
    if "bound" in modes:
        bars[names.index("bound")].set_hatch("//")
    ax.bar_label(bars, labels=[number(r) for r in rates], padding=3, fontsize=8)
    ax.set_xlabel("images/s (higher is better)")
    ax.set_title("throughput per mode", fontsize=9)
    ax.set_xlim(0, max(rates, default=1) * 1.18)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _stages(ax: Any, medians: dict[str, float], batch: float | None) -> None:
    names = [s for s in STAGES if s in medians][::-1]
    values = [medians[s] for s in names]
    labels = [s.removesuffix("_ms") for s in names]
    bars = ax.barh(labels, values, color=["#555555" if s == "total_ms" else "#ff7f0e" for s in names])
    ax.bar_label(bars, labels=[number(v) for v in values], padding=3, fontsize=8)
    ax.set_xlabel("ms per image, median")
    batch_text = f", median batch {batch:g}" if batch is not None else ""
    ax.set_title(f"inferd: where an image's time goes{batch_text}", fontsize=9)
    ax.set_xlim(0, max(values, default=1) * 1.18)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
