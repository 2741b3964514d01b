"""Helpers shared by the benchmarks: a folder of realistic JPEGs, a timer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def make_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs: random crops of the committed photos at typical web sizes (400-800 px, q90)."""
    photos = [Image.open(p).convert("RGB") for p in sorted((REPO / "fixtures" / "images").rglob("*.jpg"))]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        target = (int(rng.integers(400, 800)), int(rng.integers(300, 600)))
        path = folder / f"{i // 100:03d}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + cw, y + ch)).resize(target, Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn, count: int) -> float:
    """Images per second of ``fn()`` processing ``count`` images (CUDA synchronized)."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)
