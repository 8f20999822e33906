"""Generated images that compress like photos: the bench's inputs, and the tests' photo-like ones."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """An image that compresses like a photo: a smooth colour field, shapes and mild sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        dx, dy = int(rng.integers(width // 20, width // 4 + 1)), int(rng.integers(height // 20, height // 4 + 1))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + dx, y + dy), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image)
    out = np.empty_like(pixels)
    for top in range(0, height, 1024):  # in strips: a 2048x12000 image would need GBs of float noise at once
        strip = pixels[top : top + 1024].astype(np.float32)
        strip += rng.standard_normal(strip.shape, dtype=np.float32) * 6
        out[top : top + 1024] = np.clip(strip, 0, 255)
    return Image.fromarray(out)


def generate(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    """`count` distinct photo-like JPEGs (quality 90), made once and shared by every mode; with
    `--workdir`, a later run of the same size and seed finds them there."""
    from concurrent.futures import ThreadPoolExecutor

    from daemon.local import cores

    folder = folder / f"{size[0]}x{size[1]}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img-{i:05d}.jpg" for i in range(count)]

    def make(i: int) -> None:
        if not paths[i].exists():  # written under another name, then renamed: it exists whole
            tmp = paths[i].with_suffix(".tmp")
            photo_like(*size, seed=seed * 1_000_003 + i).save(tmp, "JPEG", quality=90)
            tmp.rename(paths[i])

    with ThreadPoolExecutor(cores()) as pool:  # NumPy, resizing and encoding release the GIL
        list(pool.map(make, range(count)))
    return paths
